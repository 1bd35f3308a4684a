"""Performance ratios of tokenforget against its baselines, measured side by side in one run.

    python benchmarks/run.py            # full sizes (SmolLM2-135M when installed), ~10 min on 2 cores
    python benchmarks/run.py --quick    # small sizes, for CI: checks the code paths, not the targets
    python benchmarks/run.py --only demo   # one section (train classes scoring demo memory partition packing)

Every timing: warm-up excluded, >= 5 repetitions (3 in --quick), min / median / max printed, the
baseline timed in the same process, interleaved with ours. Ratios use medians. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from tokenforget.config import LoraSettings, ModelConfig, ObjectiveConfig, TrainingConfig  # noqa: E402
from tokenforget.model.loading import add_lora, cpu_flags, cpu_has_bf16, load_model  # noqa: E402
from tokenforget.stages.partition import flat_token_classes  # noqa: E402
from tokenforget.stages.partition_streaming import streaming_threshold  # noqa: E402
from tokenforget.model.batching import length_grouped_batches, pad_batch  # noqa: E402
from tokenforget.stages.score import score_tokens  # noqa: E402
from tokenforget.training.trainer import PackedTokenClassCollator, TokenClassCollator, make_trainer, training_arguments  # noqa: E402


@dataclass
class Row:
    metric: str
    ours: str
    baseline: str
    ratio: float
    target: str
    ok: bool | None  # None: informational


@dataclass
class Timing:
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def __str__(self) -> str:
        return f"{min(self.times):.3f}/{self.median:.3f}/{max(self.times):.3f}s"


def interleaved(fns: list[Callable[[], None]], reps: int) -> list[Timing]:
    """Time each fn `reps` times after one warm-up call, alternating between them."""
    for fn in fns:
        fn()
    out: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            out[i].append(time.perf_counter() - t)
    return [Timing(t) for t in out]


# ------------------------------------------------------------------------------------------ models and data


def bench_model(quick: bool) -> torch.nn.Module:
    """SmolLM2-135M (GGUF) when installed and not --quick; else a random Llama of SmolLM2's vocabulary."""
    if not quick:
        try:
            return load_model(ModelConfig(name_or_path="smollm2"))
        except Exception as e:  # noqa: BLE001
            print(f"(SmolLM2 not available: {e}; using a random model of its shape)")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    layers, hidden = (2, 128) if quick else (30, 576)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=hidden * 8 // 3, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 192), tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


class _Tok:  # the bits of a tokenizer the Trainer and collators use
    pad_token_id = 0


def toy_examples(n: int, lo: int, hi: int, seed: int = 0, vocab: int = 49152) -> list[dict[str, list[int]]]:
    """Random token sequences with a 40% prompt (class 0) and 70% / 30% learn / forget response tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi + 1))
        cls = np.where(rng.random(length) < 0.7, 1, -1)
        cls[: int(0.4 * length)] = 0
        out.append({"input_ids": rng.integers(1, vocab, length).tolist(), "token_class": cls.tolist()})
    return out


# ------------------------------------------------------------------------------------------ 1. training step


class _LabelCollator:
    def __call__(self, feats):
        ids, mask = pad_batch([f["input_ids"] for f in feats], 0)
        cls, _ = pad_batch([f["token_class"] for f in feats], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(cls == 0, -100)}


def _trainer(model, examples, mode: str | None, bf16: bool, tmp: Path, packing: bool = False):
    import datasets
    from transformers import Trainer

    data = datasets.Dataset.from_list(examples)
    args = training_arguments(TrainingConfig(max_steps=1000, warmup_ratio=0.0, batch_size=len(examples)),
                              tmp / (mode or "plain"), seed=0, bf16=bf16, disable_tqdm=True)
    if mode is None:  # plain SFT: transformers' own loss from `labels`
        t = Trainer(model=model, args=args, train_dataset=data, data_collator=_LabelCollator())
    else:
        t = make_trainer(model, _Tok(), data, args, ObjectiveConfig(mode=mode, t_min=0.1, t_max=0.25), packing=packing)
    t.create_optimizer_and_scheduler(num_training_steps=1000)
    return t


def _step(trainer, batch) -> Callable[[], None]:
    dev = trainer.args.device

    def run() -> None:
        samples, n_items = trainer.get_batch_samples(iter([batch]), 1, dev)
        trainer.training_step(trainer.model, samples[0], n_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        if dev.type == "cuda":
            torch.cuda.synchronize()  # CUDA kernels run asynchronously: time the step, not its launch

    return run


def bench_train_step(base, quick: bool, bf16: bool, tmp: Path) -> list[Row]:
    """Forget step vs a plain SFT step (model's built-in loss), same LoRA model copy, batch, precision."""
    import copy

    bsz, seq, reps = (4, 64, 3) if quick else (8, 128, 5)
    examples = toy_examples(bsz, seq, seq)
    lora = LoraSettings(r=64, alpha=16, dropout=0.1)
    plain = _trainer(add_lora(copy.deepcopy(base), lora), examples, None, bf16, tmp)
    ours = _trainer(add_lora(copy.deepcopy(base), lora), examples, "forget", bf16, tmp)
    t_plain, t_ours = interleaved([_step(plain, _LabelCollator()(examples)),
                                   _step(ours, TokenClassCollator(0)(examples))], reps)
    r = t_ours.median / t_plain.median
    return [Row(f"train step, forget / plain SFT (B={bsz}, T={seq}, LoRA r=64, {'bf16' if bf16 else 'fp32'})",
                str(t_ours), str(t_plain), r, "<= 1.03", r <= 1.03)]


def bench_packing(base, quick: bool, bf16: bool, tmp: Path) -> list[Row]:
    """Padding-free (packed) vs padded forget step on variable-length examples (informational)."""
    import copy

    bsz, lo, hi, reps = (4, 16, 64, 3) if quick else (8, 48, 200, 5)
    examples = toy_examples(bsz, lo, hi, seed=1)
    lora = LoraSettings(r=64, alpha=16, dropout=0.0)
    padded = _trainer(add_lora(copy.deepcopy(base), lora), examples, "forget", bf16, tmp / "pad")
    packed = _trainer(add_lora(copy.deepcopy(base), lora), examples, "forget", bf16, tmp / "pack", packing=True)
    t_pad, t_pack = interleaved([_step(padded, TokenClassCollator(0)(examples)),
                                 _step(packed, PackedTokenClassCollator()(examples))], reps)
    real = sum(len(e["input_ids"]) for e in examples)
    share = 1 - real / (bsz * max(len(e["input_ids"]) for e in examples))
    return [Row(f"packed / padded forget step (lengths {lo}-{hi}, padding {share:.0%})", str(t_pack), str(t_pad),
                t_pack.median / t_pad.median, "info", None)]


# ------------------------------------------------------------------------------------------ 2. per-step class work


def bench_class_work(quick: bool) -> list[Row]:
    """Ours: the classes ride in the batch; per step we count them (get_batch_samples). The authors'
    approach: per step, a Python loop over the data-set-wide list of (sample, position) pairs."""
    n_samples, n_tokens, bsz = (5_000, 300, 8) if quick else (50_000, 300, 8)
    rng = np.random.default_rng(0)
    neg = rng.random((n_samples, n_tokens)) < 0.3
    pairs = [(int(s), int(p)) for s, p in zip(*np.nonzero(neg))]  # the authors' pickled index list
    batch_ids = set(rng.choice(n_samples, bsz, replace=False).tolist())
    batch_cls = torch.as_tensor(np.where(neg[list(batch_ids)], -1, 1))

    def authors() -> None:
        mask = {}
        for s, p in pairs:  # O(data set) per step
            if s in batch_ids:
                mask.setdefault(s, []).append(p)

    def ours() -> None:
        torch.stack([(batch_cls == 1).sum(), (batch_cls == -1).sum()])  # O(batch) per step

    t_auth, t_ours = interleaved([authors, ours], 3 if quick else 5)
    return [Row(f"per-step token-class work ({n_samples:,} samples x {n_tokens} tokens)", str(t_ours), str(t_auth),
                t_ours.median / t_auth.median, "O(batch)", t_ours.median < 1e-3)]


# ------------------------------------------------------------------------------------------ 3. scoring


def bench_scoring(base, quick: bool, bf16: bool) -> list[Row]:
    """Scoring (base and reference in one pass: adapter off/on) vs bare no-grad forwards of both models."""
    import copy

    n, lo, hi, bsz, reps = (16, 32, 96, 4, 3) if quick else (48, 64, 256, 8, 5)
    examples = toy_examples(n, lo, hi, seed=2)
    ids = [e["input_ids"] for e in examples]
    masks = [[int(c != 0) for c in e["token_class"]] for e in examples]
    ref = add_lora(copy.deepcopy(base), LoraSettings(r=64, alpha=16, dropout=0.0))
    for name, p in ref.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    ref.eval()
    batches = length_grouped_batches([len(s) for s in ids], bsz)
    padded = sum(bsz_ * max(len(ids[i]) for i in b) for b in batches for bsz_ in [len(b)])
    real = sum(map(len, ids))

    def forwards(with_ce: bool) -> Callable[[], None]:
        @torch.no_grad()
        def run() -> None:
            for b in batches:
                x, m = pad_batch([ids[i] for i in b], 0)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    for adapter in (ref.disable_adapter(), contextlib.nullcontext()):
                        with adapter:
                            logits = ref(input_ids=x, attention_mask=m, use_cache=False).logits
                            if with_ce:  # transformers' per-token loss: every logit upcast, then CE
                                torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), x[:, 1:],
                                                                  reduction="none")
        return run

    def ours() -> None:
        score_tokens(ref, ids, bsz, bf16, masks=masks, progress=False)

    t_ce, t_bare, t_ours = interleaved([forwards(True), forwards(False), ours], reps)
    tput = lambda t: 2 * real / t.median  # noqa: E731  tokens/s, both models
    r, r_bare = tput(t_ours) / tput(t_ce), tput(t_ours) / tput(t_bare)
    share = 1 - real / padded
    return [
        Row(f"scoring tokens/s, both models ({n} seqs of {lo}-{hi} tokens)", f"{tput(t_ours):,.0f} tok/s ({t_ours})",
            f"forward + CE {tput(t_ce):,.0f} tok/s ({t_ce})", r, ">= 0.9", r >= 0.9),
        # Not like for like (no CE, so no log-softmax over the vocabulary): where the head matmul is cheap (AMX),
        # the log-softmax is most of scoring and this reads well under 1 (0.44 on an AMX Xeon before the fix)
        Row("scoring / bare forwards (logits only, no CE)", f"{tput(t_ours):,.0f} tok/s",
            f"{tput(t_bare):,.0f} tok/s ({t_bare})", r_bare, "info", None),
        Row("padding share of length-grouped scoring batches", f"{share:.1%}", "-", share, "< 10%", share < 0.10),
    ]


# ------------------------------------------------------------------------------------------ 3b. the demo's phases

DEMO_COUNTS = {"steps": 40, "scored": 160, "generated": 480, "nll": 96}  # `make demo`: sft and one setting, 240 problems


def demo_batches(tok, n: int) -> tuple[list[list[int]], list[list[int]], list[list[dict[str, str]]]]:
    """`n` of the demo task's training answers, tokenized as the demo does (its system prompt and chat template):
    input ids, response masks, and the chat prompts the evaluation generates from."""
    import tempfile

    from tokenforget.config import DataConfig
    from tokenforget.stages import data as data_mod
    from tokenforget.stages.demo_task import SYSTEM_PROMPT, make_task, write_jsonl

    noisy, _ = make_task(n, seed=0, noise=0.4)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.jsonl"
        write_jsonl(noisy, path)
        cfg = DataConfig(path=str(path), max_length=256, system_prompt=SYSTEM_PROMPT)
        records = data_mod.load_records(cfg)
        cols, _ = data_mod.tokenize_records(tok, records, cfg)
    return cols["input_ids"], cols["response_mask"], [r.messages[:-1] for r in records]


def bench_demo_phases(base, quick: bool, bf16: bool, tmp: Path) -> list[Row]:
    """`make demo`'s phases, each against one of its optimizer steps (8 answers in micro-batches of the demo's size
    through our Trainer), timed side by side: the base model's scoring pass over 16 answers, generating 64 answers
    (one batch of the evaluation: greedy, 72 new tokens at most, stopping at a settled answer) and the gold NLL of 16. A phase
    whose ratio grows has slowed against training; the last row adds them up at the demo's counts (`DEMO_COUNTS`)
    in optimizer steps, and in seconds at this machine's step. The answers are the base model's, which run to the
    72-token cap where a trained model's end near 47: the generation row is the dearer bound."""
    import copy

    from tokenforget.command_config import DemoConfig
    from tokenforget.model.loading import load_tokenizer
    from tokenforget.stages.evaluate import GENERATE_BATCH, gold_nll, generate

    try:
        tok = load_tokenizer(ModelConfig(name_or_path="smollm2"))
    except Exception as e:  # noqa: BLE001
        return [Row(f"demo phases: skipped (no SmolLM2 tokenizer: {type(e).__name__})", "-", "-", float("nan"), "info", None)]
    n_gen, reps = (8, 3) if quick else (GENERATE_BATCH, 3)
    ids, masks, prompts = demo_batches(tok, max(16, n_gen))
    demo = DemoConfig()
    mb, n_micro = demo.micro_batch_size, demo.batch_size // demo.micro_batch_size
    examples = [{"input_ids": i, "token_class": m} for i, m in zip(ids[: demo.batch_size], masks[: demo.batch_size])]
    model = add_lora(copy.deepcopy(base), LoraSettings(r=64, alpha=16, dropout=0.1))
    trainer = _trainer(model, examples[:mb], "ignore", bf16, tmp)
    micro = [TokenClassCollator(0)(examples[i : i + mb]) for i in range(0, len(examples), mb)]
    dev = trainer.args.device

    def step() -> None:  # the demo's optimizer step: its micro-batches accumulated
        for batch in micro:
            samples, n_items = trainer.get_batch_samples(iter([batch]), 1, dev)
            trainer.training_step(trainer.model, samples[0], n_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    frozen = copy.deepcopy(base).eval()
    score = lambda: score_tokens(frozen, ids[:16], 16, bf16, masks=masks[:16], progress=False, with_base=False)  # noqa: E731
    gen = lambda: generate(frozen, tok, prompts[:n_gen], 72, batch_size=GENERATE_BATCH, bf16=bf16)  # noqa: E731
    nll = lambda: gold_nll(frozen, ids[:16], masks[:16], 16, bf16, tok.pad_token_id)  # noqa: E731
    t_step, t_score, t_gen, t_nll = interleaved([step, score, gen, nll], reps)
    per = {"scored": t_score.median / 16, "generated": t_gen.median / n_gen, "nll": t_nll.median / 16}
    steps = DEMO_COUNTS["steps"] + sum(per[k] * DEMO_COUNTS[k] for k in per) / t_step.median
    rows = [Row(f"demo: {what} / one optimizer step ({demo.batch_size} answers, {n_micro} x {mb})", str(t), str(t_step),
                t.median / t_step.median,
                "info", None)
            for what, t in [("scoring 16 answers, base only", t_score), (f"generating {n_gen} answers", t_gen),
                            ("gold NLL of 16 answers", t_nll)]]
    counts = ", ".join(f"{v} {k}" for k, v in DEMO_COUNTS.items())
    return [*rows, Row(f"demo's compute in optimizer steps ({counts})", f"{steps:.0f} steps",
                       f"{steps * t_step.median:.0f} s at this step", steps, "info", None)]


# ------------------------------------------------------------------------------------------ 4. memory

MEMORY_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from tokenforget.model.head_ce import linear_cross_entropy
kind, train, bf16, B = sys.argv[2], sys.argv[3] == "train", sys.argv[4] == "bf16", int(sys.argv[5])
T, H, V = 512, 576, 49152
torch.manual_seed(0)
h = torch.randn(B * T, H, requires_grad=train)
w = torch.randn(V, H) * 0.02
t = torch.randint(0, V, (B * T,))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = rss()
# bf16 autocast only where the CPU has bf16 matmuls: elsewhere it is emulated and takes minutes
with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
    if kind == "naive":  # what transformers does: full logits, upcast, cross-entropy
        loss = torch.nn.functional.cross_entropy((h @ w.T).float(), t, reduction="none")
    else:
        loss = linear_cross_entropy(h, w, t)
    if train:
        loss.mean().backward()
def peak():  # VmHWM: this process's own high-water mark. Not ru_maxrss, which Linux carries over from
    # the parent through fork + exec, so a child of a big parent would report the parent's peak.
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
print(peak() - before)
"""


def _peak(kind: str, mode: str, bf16: bool, batch: int) -> int:
    src = str(Path(__file__).parents[1] / "src")
    args = [sys.executable, "-c", MEMORY_CHILD, src, kind, mode, "bf16" if bf16 else "fp32", str(batch)]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def bench_memory(bf16: bool, quick: bool) -> list[Row]:
    """Peak extra memory of per-token CE at vocab 49,152, sequence 512, batch 8 (4 with --quick: the naive
    logits are still 16 of the chunked CE's 256-row chunks) in bf16 autocast where the CPU has bf16, else fp32:
    the training precision either way."""
    rows, batch = [], 4 if quick else 8
    for mode in ("train", "score"):
        naive, ours = _peak("naive", mode, bf16, batch), _peak("chunked", mode, bf16, batch)
        r = ours / naive
        rows.append(Row(f"per-token CE peak memory, {mode} (V=49152, T=512, B={batch})", f"{ours / 2**20:,.0f} MiB",
                        f"{naive / 2**20:,.0f} MiB", r, "<= 0.3", r <= 0.3))
    return rows


# ------------------------------------------------------------------------------------------ 5. partition


def bench_partition(quick: bool) -> list[Row]:
    n = 2_500_000 if quick else 25_000_000
    scores = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    resp = np.ones(n, dtype=np.int8)

    def ours() -> None:
        flat_token_classes(scores, resp, 0.7)

    def sort_anchor() -> None:  # a stable sort of all scores (what a sort-based ranking costs)
        np.argsort(-scores, kind="stable")

    t_sort, t_ours = interleaved([sort_anchor, ours], 3 if quick else 5)
    rows = [Row(f"partition of {n:,} scores (exact, O(N) selection)", str(t_ours), f"stable sort {t_sort}",
                t_ours.median / t_sort.median, "<= 5 s" if not quick else "info", t_ours.median <= 5.0 if not quick else None)]
    total, shard = (20_000_000, 10_000_000) if quick else (1_000_000_000, 10_000_000)

    def shards():
        for i in range(total // shard):
            yield np.random.default_rng(1000 + i).standard_normal(shard, dtype=np.float32)

    t0 = time.perf_counter()
    cut = streaming_threshold(shards, 0.7)
    wall = time.perf_counter() - t0
    err = cut.achieved_rho - 0.7
    rows.append(Row(f"streaming partition of {total:,} simulated scores ({total // shard} shards)",
                    f"{wall:.1f} s, achieved rho {cut.achieved_rho:.6f}", "rho 0.7", err, "|rho err| < 1e-4",
                    abs(err) < 1e-4))
    return rows


# ------------------------------------------------------------------------------------------ main


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    import transformers

    return (f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}\n{precision_line()}")


VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # what sets the kernels torch and oneDNN pick


def precision_line() -> str:
    """The CPU's vector flags, the kernels torch dispatches to, and the precision `auto` chose here (a CPU
    whose bf16 is hidden by TOKENFORGET_CPU_BF16=0 or ONEDNN_MAX_CPU_ISA says so)."""
    flags = [f for f in VECTOR_FLAGS if f in cpu_flags()]
    hidden = {k: os.environ[k] for k in ("TOKENFORGET_CPU_BF16", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    chosen = "bf16 autocast" if cpu_has_bf16() or torch.cuda.is_available() else "fp32"
    return (f"CPU flags: {' '.join(flags) or 'none of ' + '/'.join(VECTOR_FLAGS)}; torch kernels: "
            f"{torch.backends.cpu.get_cpu_capability()}; precision auto: {chosen}"
            + (f" (environment: {hidden})" if hidden else ""))


def print_table(rows: list[Row]) -> None:
    header = ["metric", "ours (min/median/max)", "baseline", "ratio", "target", "ok"]
    cells = [header] + [[r.metric, r.ours, r.baseline, f"{r.ratio:.3g}", r.target,
                         "-" if r.ok is None else ("yes" if r.ok else "NO")] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    for i, c in enumerate(cells):
        print(" | ".join(x.ljust(w) for x, w in zip(c, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


SECTIONS = ("train", "classes", "scoring", "demo", "memory", "partition", "packing")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes for CI")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--only", nargs="+", default=[], metavar="SECTION",
                    help=f"run these sections only: {' '.join(SECTIONS)}")
    args = ap.parse_args()
    if unknown := set(args.only) - set(SECTIONS):
        ap.error(f"--only: unknown section(s) {sorted(unknown)}; the sections are {list(SECTIONS)}")
    torch.manual_seed(0)
    bf16 = cpu_has_bf16() or torch.cuda.is_available()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "tokenforget-bench"
    t0 = time.time()
    print(machine())
    base = bench_model(args.quick)
    sections = {  # in SECTIONS' order
        "train": lambda: bench_train_step(base, args.quick, bf16, tmp),
        "classes": lambda: bench_class_work(args.quick),
        "scoring": lambda: bench_scoring(base, args.quick, bf16),
        "demo": lambda: bench_demo_phases(base, args.quick, bf16, tmp),
        "memory": lambda: bench_memory(bf16, args.quick),
        "partition": lambda: bench_partition(args.quick),
        "packing": lambda: bench_packing(base, args.quick, bf16, tmp),
    }
    rows: list[Row] = []
    for name, section in sections.items():
        if args.only and name not in args.only:
            continue
        rows += section()
        print(f"[{time.time() - t0:.0f} s] {rows[-1].metric}: {rows[-1].ratio:.3g}", flush=True)
    print_table(rows)
    print(f"wall time {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows], indent=2))


if __name__ == "__main__":
    main()
