// tokenforget report: renders the examples from the JSON in #report-data (paging, search, tooltips).
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const meta = data.meta;
  const samples = data.samples;
  const texts = samples.map((s) => s.t.join("").toLowerCase());
  const $ = (id) => document.getElementById(id);
  const list = $("sample-list"), tip = $("tip"), search = $("search"), perPage = $("per-page");
  const onlyCorrupt = $("only-corrupt"), showPrompt = $("show-prompt");
  const RGB = { pos: "46,158,79", neg: "214,69,61", resp: "90,120,200" };
  const LABEL = { pos: "learned (+1)", neg: "forgotten (−1)", resp: "response (not partitioned)" };
  let matches = samples.map((_, n) => n);  // positions in `samples` that pass the filters
  let page = 0;

  function kind(s, j) {
    if (!s.m[j]) return "prompt";
    if (!s.c) return "resp";
    return s.c[j] > 0 ? "pos" : s.c[j] < 0 ? "neg" : "resp";
  }

  // Opacity grows with the distance of the score from the cut; full at the 95th percentile distance.
  function strength(s, j) {
    if (!s.s || s.s[j] === null) return 0.35;
    return 0.15 + 0.75 * Math.min(1, Math.abs(s.s[j] - meta.threshold) / meta.scale);
  }

  function tokenSpan(s, j) {
    const span = document.createElement("span");
    const k = kind(s, j);
    span.className = "tok " + k + (s.k && s.k[j] ? " corrupt" : "");
    const text = s.t[j];
    span.textContent = k !== "prompt" && text.includes("\n") ? text.replace(/\n/g, "↵\n") : text;
    if (k !== "prompt") {
      span.style.backgroundColor = "rgba(" + RGB[k] + "," + strength(s, j).toFixed(2) + ")";
      span.dataset.j = String(j);
    }
    return span;
  }

  function count(s, value) {
    return s.c ? s.c.filter((c, j) => s.m[j] && c === value).length : 0;
  }

  function renderSample(n) {
    const s = samples[n];
    const box = document.createElement("article");
    box.className = "sample";
    box.dataset.n = String(n);
    const head = document.createElement("div");
    head.className = "sample-head";
    const title = document.createElement("b");
    title.textContent = "example #" + s.i;
    const nResp = s.m.filter(Boolean).length;
    let facts = " · " + nResp + " response tokens";
    if (s.c) facts += " · " + count(s, 1) + " learned · " + count(s, -1) + " forgotten";
    if (s.k) facts += " · " + s.k.filter(Boolean).length + " known corrupted";
    head.append(title, facts);
    const body = document.createElement("div");
    body.className = "tokens";
    const frag = document.createDocumentFragment();
    for (let j = 0; j < s.t.length; j++) frag.appendChild(tokenSpan(s, j));
    body.appendChild(frag);
    box.append(head, body);
    return box;
  }

  function filter() {
    const q = search.value.trim().toLowerCase();
    const byIndex = /^#\d+$/.test(q) ? Number(q.slice(1)) : null;
    matches = [];
    samples.forEach((s, n) => {
      if (onlyCorrupt && onlyCorrupt.checked && !s.k) return;
      if (byIndex !== null ? s.i === byIndex : texts[n].includes(q)) matches.push(n);
    });
    page = 0;
    render();
  }

  function render() {
    const per = Number(perPage.value);
    const pages = Math.max(1, Math.ceil(matches.length / per));
    page = Math.min(page, pages - 1);
    const shown = matches.slice(page * per, (page + 1) * per);
    list.replaceChildren(...shown.map(renderSample));
    list.classList.toggle("hide-prompt", !showPrompt.checked);
    const of = matches.length === samples.length ? samples.length + " examples" : matches.length + " matching examples";
    $("page-status").textContent = matches.length
      ? "examples " + (page * per + 1) + "–" + (page * per + shown.length) + " of " + of + " · page " + (page + 1) + " of " + pages
      : "no example matches";
    $("prev").disabled = page === 0;
    $("next").disabled = page >= pages - 1;
    hideTip();
  }

  function fmt(v) {
    return v === null || v === undefined ? "–" : v.toFixed(4);
  }

  function tipLine(label, value) {
    const line = document.createElement("div");
    line.textContent = label + " " + value;
    return line;
  }

  function showTip(el) {
    const s = samples[Number(el.closest(".sample").dataset.n)];
    const j = Number(el.dataset.j);
    const token = document.createElement("div");
    token.className = "tip-token";
    token.textContent = JSON.stringify(s.t[j]) + " · " + LABEL[kind(s, j)];
    const lines = [token];
    if (s.s) lines.push(tipLine("score", fmt(s.s[j])), tipLine("base CE", fmt(s.b[j])), tipLine("reference CE", fmt(s.r[j])));
    if (s.k && s.k[j]) lines.push(tipLine("known corrupted", "(marked in the data)"));
    tip.replaceChildren(...lines);
    tip.hidden = false;
    const r = el.getBoundingClientRect();
    const left = Math.min(r.left, document.documentElement.clientWidth - tip.offsetWidth - 8);
    tip.style.left = Math.max(0, left) + window.scrollX + "px";
    tip.style.top = r.bottom + window.scrollY + 6 + "px";
  }

  function hideTip() {
    tip.hidden = true;
  }

  // A demo's trained settings (data.views): whose token classes colour the examples, and what that setting is.
  const views = data.views || {};
  const view = $("view");
  function showView() {
    const v = views[view.value];
    samples.forEach((s, n) => { s.c = v.c[n]; });
    LABEL.neg = v.neg + " (−1)";
    $("neg-label").textContent = v.neg;
    $("view-what").textContent = v.what;
    render();
  }
  if (view) {
    // open on the first setting that sets tokens aside (the demo's point), else the first
    const first = Object.keys(views).find((k) => views[k].c.some((c) => c.includes(-1)));
    if (first) view.value = first;
    view.addEventListener("change", showView);
  }

  list.addEventListener("mouseover", (ev) => {
    const el = ev.target.closest(".tok[data-j]");
    if (el) showTip(el); else hideTip();
  });
  list.addEventListener("mouseleave", hideTip);
  search.addEventListener("input", filter);
  perPage.addEventListener("change", () => { page = 0; render(); });
  showPrompt.addEventListener("change", render);
  if (onlyCorrupt) onlyCorrupt.addEventListener("change", filter);
  $("prev").addEventListener("click", () => { page -= 1; render(); });
  $("next").addEventListener("click", () => { page += 1; render(); });
  if (view) showView(); else render();
})();
