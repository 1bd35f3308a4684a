"""Forget step vs plain SFT step on a GPU: throughput, tokens/s and MFU, side by side in one run.

    python benchmarks/gpu.py --json gpu.json    # CUDA: a random Llama-3.2-1B-shaped model, bf16 weights
    python benchmarks/gpu.py --quick            # any machine: a tiny model, checks the code paths, not the target

The plain step is MEASURING.md's baseline: the same model copy, batch, precision and Trainer settings with the
model's own loss (`labels` to the forward, transformers' cross-entropy over full logits). Ours is the forget
objective through `ForgettingTrainer` (per-token CE on the `hidden` path; a fused kernel when `fused_ce` finds
one, and then also once with the chunked head forced, to show what the kernel buys). Interleaved, warm-up
excluded, min / median / max over the repetitions; ratios use medians. Target: forget / plain <= 1.03.

MFU = tokens/s x model FLOPs per token / the GPU's peak dense bf16 FLOP/s (`PEAK_TFLOPS`, or --peak-tflops).
Model FLOPs per token (PaLM's convention, https://arxiv.org/abs/2204.02311 appendix B, no recomputation):
forward F = 2 N + 4 L T d, with N the weights of every matmul (decoder linears and the lm_head; not the
embedding lookup), L layers, T the sequence length, d the attention width (the 4 L T d of QK^T and AV, counted
without the causal halving). Training: 3 F with every weight trained (forward, input and weight gradients);
2 F with LoRA (forward and input gradients; the adapters' own FLOPs, r / d of the linears', are left out).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).parent))

from run import Timing, TokenClassCollator, _LabelCollator, _step, _trainer, interleaved, machine, toy_examples  # noqa: E402

from tokenforget.config import LoraSettings  # noqa: E402
from tokenforget.model import head_ce as fused_ce  # noqa: E402
from tokenforget.model.loading import add_lora  # noqa: E402

# Llama-3.2-1B's shape (its config.json on the Hub), weights random: no download, the same FLOPs.
LLAMA_3_2_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                    rope_theta=500000.0, max_position_embeddings=131072)
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=256)
# Peak dense bf16 tensor-core FLOP/s from the vendors' data sheets (SXM parts), by a name in the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}
TARGET = 1.03


def build_model(shape: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A randomly initialised Llama of `shape`, built directly on `device` in `dtype` (sdpa attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(LlamaConfig(**shape), dtype=dtype, attn_implementation="sdpa")


def flops_per_token(model: torch.nn.Module, seq: int, full: bool) -> float:
    """Model FLOPs of one trained token (module docstring): 3 F (full) or 2 F (LoRA), F = 2 N + 4 L T d."""
    cfg = model.config
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # decoder + lm_head
    forward = 2 * n + 4 * cfg.num_hidden_layers * seq * cfg.num_attention_heads * cfg.head_dim
    return (3 if full else 2) * forward


def peak_flops(override: Optional[float]) -> Optional[float]:
    """The GPU's peak dense bf16 FLOP/s: --peak-tflops, else PEAK_TFLOPS by device name, else None."""
    if override:
        return override * 1e12
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


@contextlib.contextmanager
def chunked_head() -> Iterator[None]:
    """Force `fused_ce`'s chunked path (ours, `losses.linear_cross_entropy`) inside the block."""
    chosen = fused_ce.fused_backend
    fused_ce.fused_backend = lambda *_: "chunked"
    try:
        yield
    finally:
        fused_ce.fused_backend = chosen


def forced_chunked(step):
    def run() -> None:
        with chunked_head():
            step()
    return run


def measure(base, setting: str, lora: LoraSettings, examples, reps: int, tmp: Path, flops: float,
            peak: Optional[float]) -> dict:
    """Time plain, forget (and forget with the chunked head, when a fused kernel is in use) on copies of
    `base`; return every timing, tokens/s, MFU and the ratios."""
    dev = next(base.parameters()).device
    backend = fused_ce.fused_backend(dev)
    plain = _trainer(add_lora(copy.deepcopy(base), lora), examples, None, True, tmp / "plain")
    ours = _trainer(add_lora(copy.deepcopy(base), lora), examples, "forget", True, tmp / "forget")
    steps = {"plain": _step(plain, _LabelCollator()(examples)), f"forget ({backend} head)": _step(ours, TokenClassCollator(0)(examples))}
    if backend != "chunked":
        steps["forget (chunked head)"] = forced_chunked(steps[f"forget ({backend} head)"])
    timings = dict(zip(steps, interleaved(list(steps.values()), reps)))
    tokens = sum(len(e["input_ids"]) for e in examples)
    out = {"setting": setting, "tokens_per_step": tokens, "flops_per_token": flops, "steps": {}}
    for name, t in timings.items():
        tps = tokens / t.median
        out["steps"][name] = {"seconds": t.times, "min_median_max": str(t), "tokens_per_s": tps,
                              "mfu": None if peak is None else tps * flops / peak}
    out["ratios"] = {name: timings[name].median / timings["plain"].median for name in timings if name != "plain"}
    out["target"] = f"forget / plain <= {TARGET}"
    del plain, ours
    return out


def print_result(r: dict) -> None:
    print(f"\n{r['setting']}: {r['tokens_per_step']} tokens per step, {r['flops_per_token'] / 1e9:.2f} GFLOP per token")
    for name, s in r["steps"].items():
        mfu = "-" if s["mfu"] is None else f"{s['mfu']:.1%}"
        ratio = r["ratios"].get(name)
        print(f"  {name:24s} {s['min_median_max']:>24s}  {s['tokens_per_s']:>10,.0f} tok/s  MFU {mfu:>6s}"
              + ("" if ratio is None else f"  / plain {ratio:.3f}"))


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a tiny model and batch (CPU is fine): code paths only")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s, for MFU")
    args = ap.parse_args(argv)
    t0 = time.time()
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        ap.error("no CUDA GPU visible: use --quick for the CPU check of the code paths")
    dev = torch.device("cuda" if cuda else "cpu")
    shape, bsz, seq, reps = (TINY, 2, 32, 5) if args.quick else (LLAMA_3_2_1B, args.batch, args.seq, args.reps)
    print(machine(), flush=True)
    base = build_model(shape, dev, torch.bfloat16)
    examples = toy_examples(bsz, seq, seq, vocab=shape["vocab_size"])
    tmp = Path("/tmp/tokenforget-gpu-bench")
    peak = peak_flops(args.peak_tflops)
    results = []
    for setting, lora in [("LoRA r=64 on all linear layers", LoraSettings(r=64, alpha=16, dropout=0.0)),
                          ("full fine-tuning", LoraSettings(enabled=False))]:
        flops = flops_per_token(base, seq, full=not lora.enabled)
        results.append(measure(base, setting, lora, examples, reps, tmp / setting.split()[0], flops, peak))
        print_result(results[-1])
        if cuda:
            torch.cuda.empty_cache()
    report = {"command": " ".join(["python", "benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "model": "random Llama-3.2-1B shape" if not args.quick else "tiny random Llama", "shape": shape,
              "batch": bsz, "seq": seq, "reps": reps, "weights": "bf16", "peak_flops": peak,
              "fused_backend": fused_ce.fused_backend(dev), "results": results, "wall_s": time.time() - t0}
    print(f"wall time {report['wall_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
