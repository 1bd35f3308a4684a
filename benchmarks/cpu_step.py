"""A LoRA training step on CPU with peft's dropout against `tokenforget.model.cpu_dropout`, interleaved in one process.

    python benchmarks/cpu_step.py                      # SmolLM2-135M's shape, batch 8 x 96 (the demo's size)
    python benchmarks/cpu_step.py --length 512 --reps 3
    python benchmarks/cpu_step.py --quick              # a 2-layer model: checks the code path

One model (a random Llama of SmolLM2-135M's shape, `benchmarks/memory.py`), one LoRA adapter (r=64, alpha 16,
dropout 0.1 on every linear), one Trainer with the forgetting objective; before each step the adapter's dropout
modules are set to one variant, alternating which goes first, so both see the same load. --warmup steps of each
are not timed. Prints min/median/max step time per variant and the ratio of medians (ours / peft's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from memory import _step, _trainer, save_model  # noqa: E402

from tokenforget.config import LoraSettings, ModelConfig  # noqa: E402
from tokenforget.model.cpu_dropout import CPUDropout  # noqa: E402
from tokenforget.model.loading import BaseModel  # noqa: E402


def set_dropout(model: torch.nn.Module, ours: bool, p: float) -> None:
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if isinstance(drops, torch.nn.ModuleDict):
            for name in drops:
                drops[name] = CPUDropout(p) if ours else torch.nn.Dropout(p)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=96)
    ap.add_argument("--reps", type=int, default=5, help="timed steps of each variant")
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args()
    if a.quick:
        a.batch, a.length, a.reps = 2, 32, 2
    p = 0.1
    times: dict[str, list[float]] = {"peft": [], "ours": []}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "model", a.quick)
        base = BaseModel(ModelConfig(name_or_path=str(Path(tmp) / "model"), precision="fp32"))
        model = base.for_training(LoraSettings(dropout=p))
        trainer, batch = _trainer(model, a.batch, a.length, False, Path(tmp) / "out")
        for i in range(a.warmup + a.reps):
            order = ("peft", "ours") if i % 2 == 0 else ("ours", "peft")
            for name in order:
                set_dropout(model, name == "ours", p)
                model.train()
                t0 = time.perf_counter()
                _step(trainer, batch)
                if i >= a.warmup:
                    times[name].append(time.perf_counter() - t0)
    tokens = a.batch * a.length
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  torch {torch.__version__}, {torch.get_num_threads()} threads; LoRA "
          f"r=64 dropout {p}, batch {a.batch} x {a.length}, {a.reps} timed steps each after {a.warmup} warm-up")
    print("| dropout | step s min/median/max | tokens/s (median) |")
    print("|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {min(t):.3f}/{statistics.median(t):.3f}/{max(t):.3f} | {tokens / statistics.median(t):.0f} |")
    print(f"ratio ours / peft (median step time): {statistics.median(times['ours']) / statistics.median(times['peft']):.3f}")


if __name__ == "__main__":
    main()
