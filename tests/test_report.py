"""The HTML report: its parts against hand-worked values, then the page built from a tiny run."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import datasets
import numpy as np
import pytest
from browser import chromium, chromium_missing
from conftest import TINY_RUN_EXAMPLES, write_jsonl

from tokenforget.cli import main
from tokenforget.stages.demo_task import make_examples
from tokenforget.report.html import colour_scale, results_tables, script_json, top_tokens, training_table
from tokenforget.report.plots import clip_range, curve
from tokenforget.report.reading import FlatTokens, ReportError, read_run, token_pieces, visible

N_EXAMPLES = TINY_RUN_EXAMPLES


# ---------------------------------------------------------------- parts, by hand


def test_token_pieces_split_multibyte_characters(tiny_tokenizer):
    """' café ✓' is ['Ġ','c','a','f','Ã','©','Ġ','â','ľ','ĵ'] in the tiny vocabulary: é is 2 byte tokens and
    ✓ 3, so the character goes to the token that completes it and the tokens before it get ''."""
    ids = tiny_tokenizer.encode(" café ✓", add_special_tokens=False)
    assert len(ids) == 10
    assert token_pieces(tiny_tokenizer, ids) == [" ", "c", "a", "f", "", "é", " ", "", "", "✓"]


def test_token_pieces_join_to_the_decoded_text(tiny_tokenizer):
    text = "Mia has 12 apples. ✓ The answer is 24.\nDone"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    pieces = token_pieces(tiny_tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    cut = ids[: ids.index(tiny_tokenizer.encode("✓", add_special_tokens=False)[1]) + 1]  # ends inside ✓
    assert "".join(token_pieces(tiny_tokenizer, cut)) == tiny_tokenizer.decode(cut)


def test_visible_whitespace():
    assert visible(" a\n\tb") == "␣a↵⇥b"
    assert visible("") == "∅"


def test_top_tokens_by_hand(tiny_tokenizer):
    """ids 5,5,7,5,7,9 with classes +,-,-,+,-,+: learned 5 twice (of its 3 uses: 67%) then 9 once (100%);
    forgotten 7 twice (100%) then 5 once (33%)."""
    flat = FlatTokens(ids=np.array([5, 5, 7, 5, 7, 9]), corrupt=np.zeros(6, bool),
                      token_class=np.array([1, -1, -1, 1, -1, 1]))
    pos, neg = top_tokens(flat, tiny_tokenizer, 1), top_tokens(flat, tiny_tokenizer, -1)
    label = {i: visible(tiny_tokenizer.decode([i])) for i in (5, 7, 9)}
    assert pos.rows == [[label[5], 2, "67%"], [label[9], 1, "100%"]]
    assert neg.rows == [[label[7], 2, "100%"], [label[5], 1, "33%"]]
    assert top_tokens(flat, tiny_tokenizer, 1, k=1).rows == [[label[5], 2, "67%"]]


def test_colour_scale_is_the_95th_percentile_distance_from_the_cut():
    """Scores 0..20 and cut 1: the distances sorted are 0, 1, 1, 2, ..., 19 (21 values); numpy's linear
    95th percentile is the one at rank 0.95 * 20 = 19 (from 0): 18."""
    scores = np.arange(21.0)
    assert colour_scale(scores, 1.0) == pytest.approx(18.0)
    assert colour_scale(np.zeros(4), 0.0) == 1.0  # no spread: no division by zero


def test_curves_skip_nan_and_summary_entries():
    """The Trainer's last entry (train_loss, no `loss`) is a summary, not a step; step 1 had no negative
    token (loss_neg NaN), so the negative curve starts at step 2."""
    history = [
        {"step": 1, "loss": 3.0, "loss_pos": 3.0, "loss_neg": float("nan"), "lambda": 0.0},
        {"step": 2, "loss": 2.0, "loss_pos": 2.5, "loss_neg": 4.0, "lambda": 0.125},
        {"step": 2, "train_loss": 2.5},
    ]
    assert curve(history, "loss") == ([1, 2], [3.0, 2.0])
    assert curve(history, "loss_neg") == ([2], [4.0])
    assert training_table({"train-forget": history}).rows == [["train-forget", 2, 2.0, 2.5, 4.0, 0.125]]


def test_clip_range_drops_half_a_percent_each_side():
    """0..1000: numpy's linear quantiles at 0.005 and 0.995 are 5 and 995."""
    assert clip_range(np.arange(1001.0)) == (5.0, 995.0)
    assert clip_range(np.full(10, 2.0)) == (1.5, 2.5)  # one value: a unit-wide range around it


def test_script_json_cannot_end_the_script_element():
    out = script_json({"t": ["</script><b>"]})
    assert "</" not in out and json.loads(out) == {"t": ["</script><b>"]}
    with pytest.raises(ValueError):
        script_json({"s": float("nan")})  # JSON.parse would reject NaN: fail here, not in the browser


def test_results_tables_of_a_demo_file():
    doc = {
        "models": {
            "base": {"accuracy": 0.125, "stderr": 0.0477, "n": 48, "gold_nll": 0.81234, "sample": "x"},
            "forget": {"accuracy": 0.25, "stderr": 0.0625, "n": 48, "gold_nll": 0.5, "sample": "y"},
        },
        "detection": {"auroc": 0.9, "recall": 0.8, "precision": 0.3, "corrupt_share": 0.05, "n_corrupt": 40, "n_tokens": 800},
    }
    models, det = results_tables(doc)
    assert models.header == ["model", "answer accuracy", "gold NLL (nats/token, lower is better)"]
    assert models.rows == [["base", "0.125 ± 0.048 (n=48)", 0.81234], ["forget", "0.250 ± 0.062 (n=48)", 0.5]]
    assert det.rows == [[0.9, 0.8, 0.3, 0.05]] and det.note == "40 known corrupted of 800 response tokens"


def test_the_demo_table_in_words():
    """Two models on 4 problems: sft right on 1 0 1 0, v on 1 1 1 1; d = 0 1 0 1, mean 0.5, se sqrt(1/3)/2 = 0.289, so
    1.7 se: not distinguishable. The gold NLL over the first 2 problems says so in its column's name."""
    from tokenforget.report.summary import demo_table

    m = {"sft": {"accuracy": 0.5, "stderr": 0.289, "n": 4, "nll_n": 2, "gold_nll": 0.25, "correct": [1, 0, 1, 0]},
         "v": {"accuracy": 1.0, "stderr": 0.0, "n": 4, "nll_n": 2, "gold_nll": 0.125, "correct": [1, 1, 1, 1]}}
    text = demo_table({"models": m, "descriptions": {"sft": "the baseline", "v": "a setting"}})
    assert "gold NLL (nats/token, first 2)" in text and "+0.500 ± 0.289" in text
    assert "not distinguishable from sft at n = 4" in text and "  v: a setting" in text
    del m["sft"]["nll_n"], m["v"]["nll_n"]  # results written before the cut: every problem
    old = demo_table({"models": m})
    assert "gold NLL (nats/token)" in old and "first" not in old


def test_results_tables_pass_through():
    table = {"title": "Compare, 3 seeds", "header": ["mode", "GSM8K"], "rows": [["forget", "0.31 ± 0.02"]], "note": "n=3"}
    (t,) = results_tables({"tables": [table], "models": {"ignored": {"accuracy": 1.0}}})
    assert (t.title, t.header, t.rows, t.note) == ("Compare, 3 seeds", ["mode", "GSM8K"], [["forget", "0.31 ± 0.02"]], "n=3")


def test_end_summary_prints_only_the_losses_a_mode_has(tmp_path: Path):
    """The last log entry with a loss gives the final values, to 4 decimals. `sft` has no negative tokens, so
    its loss_neg is logged as NaN and not printed (nor a lambda, which it does not log). `forget` at
    lambda 0.25: loss = 2.0 - 0.25 x 3.0 = 1.25."""
    from types import SimpleNamespace

    from tokenforget.report.summary import run_summary

    histories = {
        "train-sft": [{"loss": 9.0, "loss_pos": 9.0, "loss_neg": float("nan"), "step": 1},
                      {"loss": 2.5, "loss_pos": 2.5, "loss_neg": float("nan"), "n_pos": 10, "n_neg": 0, "step": 2},
                      {"train_runtime": 1.0, "step": 2}],
        "train-forget": [{"loss": 1.25, "loss_pos": 2.0, "loss_neg": 3.0, "lambda": 0.25, "step": 2}],
    }
    for stage, history in histories.items():
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "log_history.json").write_text(json.dumps(history))  # NaN written as NaN, as the Trainer's
    run = SimpleNamespace(root=tmp_path, rounds=1, skipped=[], stage_dir=lambda name: tmp_path / name)
    lines = run_summary(run, list(histories)).splitlines()
    assert [line for line in lines if "final" in line] == [
        "train-sft: final loss=2.5000  loss_pos=2.5000",
        "train-forget: final loss=1.2500  loss_pos=2.0000  loss_neg=3.0000  lambda=0.2500",
    ]


def test_not_a_run_folder(tmp_path: Path, capsys):
    with pytest.raises(ReportError):
        read_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    assert "config.json and data/" in capsys.readouterr().err


# ---------------------------------------------------------------- the report of a tiny run


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    """The shared tiny run (conftest.tiny_run): forget and sft trained, every step logged, demo_results.json."""
    return tiny_run


@pytest.fixture(scope="module")
def page(run_dir: Path) -> Path:
    assert main(["report", str(run_dir), "--max_samples", "15"]) == 0
    return run_dir / "report" / "report.html"


def embedded(page: Path) -> dict:
    text = page.read_text()
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S)
    return json.loads(m.group(1))


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_run_writes_the_report(run_dir: Path):
    assert (run_dir / "report" / "report.html").is_file()  # by `run` itself, before any `report` command


def test_report_files(page: Path):
    out = page.parent
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "score_histogram.png", "training_curves.png"]
    assert png_size(out / "score_histogram.png") == (990, 715)  # 9 x 6.5 inches at 110 dpi (2 panels: corrupt data)
    assert png_size(out / "training_curves.png") == (1100, 660)  # 10 x 6 inches at 110 dpi


def test_page_is_self_contained(page: Path):
    html = page.read_text()
    assert not re.search(r'(src|href)="(?!#|data:)', html)  # only in-page anchors and data: URIs
    assert "<link" not in html and "@import" not in html
    assert html.count('src="data:image/png;base64,') == 2


def test_page_embeds_max_samples_and_says_so(page: Path):
    data = embedded(page)
    assert data["meta"]["n_examples"] == N_EXAMPLES and len(data["samples"]) == 15
    assert f"the first 15 of {N_EXAMPLES} examples" in page.read_text()


def test_embedded_numbers_are_the_run_folders(run_dir: Path, page: Path):
    tokens = datasets.load_from_disk(str(run_dir / "data" / "tokens"))
    scores = datasets.load_from_disk(str(run_dir / "scores" / "scores"))
    classes = datasets.load_from_disk(str(run_dir / "partition" / "classes"))
    for row, s in enumerate(embedded(page)["samples"]):
        assert s["i"] == tokens[row]["example"] and s["m"] == tokens[row]["response_mask"]
        assert s["c"] == classes[row]["token_class"]
        assert s["s"] == [round(v, 4) for v in scores[row]["score"]]
        assert s["b"] == [round(v, 4) for v in scores[row]["ce_base"]]
        assert ("k" in s) == any(tokens[row]["corrupt"])


def test_page_has_the_tables(run_dir: Path, page: Path):
    html = page.read_text()
    assert "0.125 ± 0.048 (n=48)" in html  # the results file
    assert "Most frequent positive tokens" in html and "Most frequent negative tokens" in html
    stats = json.loads((run_dir / "partition" / "stats.json").read_text())
    assert f"{stats['n_positive']} learned" in html and f"{stats['n_negative']} forgotten" in html
    assert "train-forget" in html and "train-sft" in html


def test_report_of_a_comparison_folder(run_dir: Path, tmp_path: Path):
    """A `compare` folder has config.json, seed-<s>/ run folders and compare_results.json, but no data/:
    the page shows compare's own tables, and the lowest seed's examples and curves."""
    import shutil

    from tokenforget.commands.compare import summarize
    from tokenforget.report.tables import compare_tables

    root = tmp_path / "cmp"
    for seed in (2, 10):
        shutil.copytree(run_dir, root / f"seed-{seed}", ignore=shutil.ignore_patterns("report", "demo_results.json"))
    shutil.copy(run_dir / "config.json", root / "config.json")
    entry = lambda v: {"value": v, "stderr": 0.01, "n": 8, "metric": "exact_match", "higher_is_better": True, "kind": "accuracy"}  # noqa: E731
    per_seed = {s: {m: {"gsm8k": entry(v)} for m, v in (("base", 0.1), ("sft", 0.2), ("forget", 0.3))} for s in ("2", "10")}
    results = {**summarize(per_seed, ["base", "sft", "forget"]), "machine": "test machine", "wall_s": 60.0,
               "samples": {"sft": {"gsm8k": [["The answer is 7."]]}}}
    (root / "compare_results.json").write_text(json.dumps(results))
    assert main(["report", str(root)]) == 0
    html = (root / "report" / "report.html").read_text()
    for t in compare_tables(results):
        assert t["title"] in html
    assert "+0.1000 ± 0.0000" in html  # forget - sft, both seeds
    assert "seed-2/ (the comparison&#x27;s first seed)" in html  # 2 < 10 as numbers, not as text
    assert "from compare_results.json, 1.0 min wall time, test machine" in html
    assert "The answer is 7." in html
    assert len(embedded(root / "report" / "report.html")["samples"]) == N_EXAMPLES
    assert main(["report", str(root / "seed-10")]) == 0  # a seed folder shows its comparison too
    assert compare_tables(results)[0]["title"] in (root / "seed-10" / "report" / "report.html").read_text()


def test_report_without_partition(tmp_path: Path, tiny_model_dir: Path):
    """An `sft`-only run has tokens but no scores: the page still builds, and says what is missing."""
    data = write_jsonl(tmp_path / "train.jsonl", make_examples(8, seed=0, noise=0.0))
    args = ["train", "--run_dir", str(tmp_path / "run"), "--model.name_or_path", str(tiny_model_dir),
            "--model.precision", "fp32", "--data.path", str(data), "--train.objective.mode", "sft",
            "--train.training.batch_size", "4", "--lora.r", "4", "--report_to", "[none]"]
    assert main(args) == 0
    assert main(["report", str(tmp_path / "run")]) == 0
    html = (tmp_path / "run" / "report" / "report.html").read_text()
    assert "No scores yet" in html and len(embedded(tmp_path / "run" / "report" / "report.html")["samples"]) == 8


# ---------------------------------------------------------------- the page in a real browser

@pytest.fixture(scope="module")
def browser(page: Path):
    """Headless Chromium on the report page (one browser for the module: it takes a second to start).

    Skips when Chromium is absent, unless TOKENFORGET_REQUIRE_BROWSER is set (CI), where it fails.
    """
    missing = chromium_missing()
    if missing:
        (pytest.fail if os.environ.get("TOKENFORGET_REQUIRE_BROWSER") else pytest.skip)(missing)
    with chromium() as driver:
        driver.get(page.as_uri())
        yield driver


@pytest.fixture
def fresh(browser, page: Path):
    """The page reloaded, so each test starts from page 1 with no search."""
    browser.get(page.as_uri())
    return browser


def by_css(driver, selector: str) -> list:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def status(driver) -> str:
    return by_css(driver, "#page-status")[0].text


def test_browser_loads_without_console_errors(fresh):
    logs = fresh.get_log("browser")
    assert [e for e in logs if e["level"] in ("SEVERE", "WARNING")] == []
    assert status(fresh) == "examples 1–10 of 15 examples · page 1 of 2"


def test_browser_highlights_every_response_token(fresh, run_dir: Path):
    """Page 1 shows the first 10 examples: one green span per +1 and one red span per -1 token of them."""
    classes = datasets.load_from_disk(str(run_dir / "partition" / "classes"))["token_class"][:10]
    n_pos, n_neg = sum(c.count(1) for c in classes), sum(c.count(-1) for c in classes)
    assert n_pos > 0 and n_neg > 0
    assert len(by_css(fresh, "#sample-list .tok.pos")) == n_pos
    assert len(by_css(fresh, "#sample-list .tok.neg")) == n_neg
    colour = by_css(fresh, "#sample-list .tok.neg")[0].value_of_css_property("background-color")
    assert colour.startswith("rgba(214, 69, 61,")


def test_browser_hover_shows_the_scores(fresh, run_dir: Path):
    from selenium.webdriver.common.action_chains import ActionChains

    scores = datasets.load_from_disk(str(run_dir / "scores" / "scores"))[0]
    classes = datasets.load_from_disk(str(run_dir / "partition" / "classes"))[0]["token_class"]
    j = classes.index(-1)  # the first forgotten token of example 0
    token = by_css(fresh, f'.sample[data-n="0"] .tok[data-j="{j}"]')[0]
    assert not by_css(fresh, "#tip")[0].is_displayed()
    ActionChains(fresh).move_to_element(token).perform()
    tip = by_css(fresh, "#tip")[0]
    assert tip.is_displayed()
    lines = tip.text.splitlines()
    assert lines[0].endswith("· forgotten (−1)")
    assert lines[1:4] == [f"score {round(scores['score'][j], 4):.4f}", f"base CE {round(scores['ce_base'][j], 4):.4f}",
                          f"reference CE {round(scores['ce_ref'][j], 4):.4f}"]


def test_browser_search_and_paging(fresh, page: Path):
    from selenium.webdriver.common.by import By

    by_css(fresh, "#next")[0].click()
    assert status(fresh) == "examples 11–15 of 15 examples · page 2 of 2"
    assert not by_css(fresh, "#next")[0].is_enabled()
    samples = embedded(page)["samples"]
    counts = {w: sum(w in "".join(s["t"]).lower() for s in samples) for w in ("trees", "pages", "change")}
    word, expected = max(counts.items(), key=lambda kv: kv[1])  # a word some examples have, never all 15
    assert 0 < expected < 15
    fresh.find_element(By.ID, "search").send_keys(word)
    assert len(by_css(fresh, ".sample")) == min(expected, 10)
    assert status(fresh).startswith(f"examples 1–{min(expected, 10)} of {expected} matching examples")
    fresh.find_element(By.ID, "search").clear()
    fresh.find_element(By.ID, "search").send_keys(f"#{samples[3]['i']}")
    assert [e.get_attribute("data-n") for e in by_css(fresh, ".sample")] == ["3"]
    fresh.find_element(By.ID, "search").send_keys("zz")
    assert status(fresh) == "no example matches"


def test_browser_corrupt_filter(fresh, page: Path):
    n_corrupt = sum("k" in s for s in embedded(page)["samples"])
    assert 0 < n_corrupt <= 10
    by_css(fresh, "#only-corrupt")[0].click()
    assert len(by_css(fresh, ".sample")) == n_corrupt
    assert len(by_css(fresh, "#sample-list .tok.corrupt")) == sum(sum(s.get("k", [])) for s in embedded(page)["samples"])


def test_browser_shows_markup_as_text(browser, run_dir: Path):
    """The `</script><b>` record is the 21st example: past max_samples=15, so build a page holding it."""
    from selenium.webdriver.common.by import By

    assert main(["report", str(run_dir), "--out_dir", str(run_dir / "all"), "--max_samples", "50"]) == 0
    browser.get((run_dir / "all" / "report.html").as_uri())
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    browser.find_element(By.ID, "search").send_keys("</script>")
    (sample,) = by_css(browser, ".sample")
    assert "</script><b>bold</b> & done" in sample.text
    assert by_css(sample, ".tokens b") == []  # the <b> is text, not an element
    browser.find_element(By.ID, "search").clear()
    browser.find_element(By.ID, "search").send_keys("café ✓")
    assert "The answer is café ✓" in by_css(browser, ".sample")[0].text


# ---------------------------------------------------------------- a demo's settings, one token view each


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, tiny_model_dir: Path) -> Path:
    """A tiny demo that trained `sft` and `verified_tail` (which ignores the tail of each answer known wrong)."""
    root = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--run_dir", str(root), "--model.name_or_path", str(tiny_model_dir), "--model.precision", "fp32",
                 "--n_train", "24", "--n_test", "2", "--max_new_tokens", "2", "--report_to", "[none]",
                 "--settings", "[sft, verified_tail]"]) == 0
    return root


def test_a_demo_report_holds_each_settings_tokens(demo_dir: Path):
    """One view per setting trained on the page's examples: sft learns every response token; verified_tail's classes
    are its partition's, its negatives ignored; each with the line that says what it is."""
    data = embedded(demo_dir / "report" / "report.html")
    views = data["views"]
    assert list(views) == ["sft", "verified_tail"]
    assert views["sft"]["c"] == [[int(m) for m in s["m"]] for s in data["samples"]]
    classes = datasets.load_from_disk(str(demo_dir / "verified_tail" / "partition" / "classes"))["token_class"]
    assert views["verified_tail"]["c"] == classes[: len(data["samples"])]
    assert views["verified_tail"]["neg"] == "ignored" and any(-1 in c for c in views["verified_tail"]["c"])
    assert views["verified_tail"]["what"].startswith("each answer graded wrong ignored from the token")
    page = (demo_dir / "report" / "report.html").read_text()
    assert "The demo trained each setting below" in page
    # the run folder is sft's: no scoring pass of its own, so no histogram is promised and none is asked for
    assert "<dt>trained settings</dt><dd>sft, verified_tail</dd>" in page and "trained variants" not in page
    assert "score histogram below" not in page and "No scores yet" not in page
    assert "Each setting scored its tokens in a folder of its own" in page


def test_browser_switches_between_the_demos_settings(browser, demo_dir: Path):
    """The page opens on the setting that sets tokens aside (verified_tail): one red span per -1 token of the shown
    examples, the legend saying `ignored`; switching to sft colours every response token green, none red."""
    from selenium.webdriver.support.ui import Select

    page = demo_dir / "report" / "report.html"
    browser.get(page.as_uri())
    assert [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")] == []
    data = embedded(page)
    shown = data["samples"][:10]
    chooser = Select(by_css(browser, "#view")[0])
    assert chooser.first_selected_option.text == "verified_tail"
    c = data["views"]["verified_tail"]["c"][: len(shown)]
    assert len(by_css(browser, "#sample-list .tok.neg")) == sum(row.count(-1) for row in c) > 0
    assert by_css(browser, "#neg-label")[0].text == "ignored"
    assert by_css(browser, "#view-what")[0].text == data["views"]["verified_tail"]["what"]
    chooser.select_by_visible_text("sft")
    assert len(by_css(browser, "#sample-list .tok.neg")) == 0
    assert len(by_css(browser, "#sample-list .tok.pos")) == sum(sum(s["m"]) for s in shown)
