"""Peak resident memory and CPU tokens/s of a LoRA training, two stages, today's way against the new one.

    python benchmarks/memory.py --reps 1 --warmup 0 --stage2-steps 0   # SmolLM2-135M's shape, batch 8 x 512: the
                                           # recorded run, ~11 min on 2 shared cores (the defaults, 5 timed steps
                                           # after 1 warm-up per variant, take an hour there: for a faster machine)
    python benchmarks/memory.py --quick    # a 2-layer model, batch 2 x 64: checks the code paths, not the targets

Each variant runs in a child process of its own, one after the other, so its peak resident memory (VmHWM of
/proc/self/status) is its own. A child loads the base once and trains two stages in a row, the way `compare`
and `run` do (reference, then the final training): a fresh LoRA adapter (the paper's r=64 on every linear), the
forgetting objective through `make_trainer`, AdamW, fp32 (this CPU has no native bf16, so `precision: auto` is
fp32 here). Variants:

    old     each stage trains a deep copy of the base (`copy.deepcopy`, what `BaseModel.fresh` gave every stage)
    new     each stage trains LoRA on the shared, frozen base (`BaseModel.for_training`: `share_weights`)
    new+gc  as new, with gradient checkpointing (training.gradient_checkpointing: true)
    +lean   the child first calls `memory.lean_allocator()` (what the command line does): glibc hands freed
            buffers of 4 MiB and more back at once instead of keeping them resident on its heap

tokens/s: the first stage's steps after --warmup untimed ones (--reps of them, min/median/max of the step
times), tokens = batch x length (every sequence is full length: no padding). The second stage builds its model
and runs --stage2-steps steps. Resident memory is also read once each stage's model and Trainer exist (VmRSS).
With --profile the new variant's last step of stage 1 runs under torch.profiler, and the share of CPU time in
matrix products is printed (where the time goes). See docs/performance.md for the run and its settings: at
8 x 512 a step takes minutes on a shared 2-core CPU, so the recorded run times one step per variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from tokenforget.config import LoraSettings, ModelConfig, ObjectiveConfig, TrainingConfig  # noqa: E402
from tokenforget.model.loading import BaseModel, add_lora  # noqa: E402
from tokenforget.model.memory import lean_allocator  # noqa: E402
from tokenforget.runfolder import release_memory  # noqa: E402
from tokenforget.training.trainer import make_trainer, training_arguments  # noqa: E402

VARIANTS = ("old", "new", "new+gc", "new+lean", "new+gc+lean")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}


def save_model(folder: Path, quick: bool) -> None:
    """A random Llama of SmolLM2-135M's shape (30 layers, hidden 576, MLP 1536, 9 heads, 3 KV heads, tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    layers, hidden, mlp, heads, kv = (2, 64, 128, 4, 2) if quick else (30, 576, 1536, 9, 3)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=True,
                      max_position_embeddings=2048)
    LlamaForCausalLM(cfg).save_pretrained(folder)


class _Tok:  # the bits of a tokenizer the Trainer and collators use
    pad_token_id = 0


def _trainer(model: torch.nn.Module, batch: int, length: int, gc: bool, tmp: Path):
    import datasets

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49152, (batch, length), generator=g)
    cls = torch.where(torch.rand(batch, length, generator=g) < 0.7, 1, -1)
    cls[:, : int(0.4 * length)] = 0  # a 40% prompt
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "token_class": cls.tolist()})
    tcfg = TrainingConfig(max_steps=1000, warmup_ratio=0.0, batch_size=batch, gradient_checkpointing=gc)
    args = training_arguments(tcfg, tmp, seed=0, bf16=False, disable_tqdm=True)
    t = make_trainer(model, _Tok(), data, args, ObjectiveConfig(mode="forget", t_min=0.1, t_max=0.25))
    t.create_optimizer_and_scheduler(num_training_steps=1000)
    if gc:  # what Trainer.train() does first; steps are driven by hand here
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    return t, next(iter(t.get_train_dataloader()))


def _step(trainer, batch) -> None:
    samples, n_items = trainer.get_batch_samples(iter([batch]), 1, trainer.args.device)
    trainer.training_step(trainer.model, samples[0], n_items)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad()


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def vm_hwm_bytes() -> int:
    """Peak resident memory of this process so far."""
    return _status_bytes("VmHWM")


def vm_rss_bytes() -> int:
    return _status_bytes("VmRSS")


def child(a: argparse.Namespace) -> dict:
    """One variant: load the base, train two stages in a row; peak memory and the timed step times."""
    if a.child.endswith("+lean"):
        assert lean_allocator(), "lean_allocator: not glibc, or MALLOC_MMAP_THRESHOLD_ set"
    base = BaseModel(ModelConfig(name_or_path=a.model_dir, precision="fp32"))
    base.load()
    loaded = vm_hwm_bytes()
    lora = LoraSettings()  # the paper's r=64, alpha 16, dropout 0.1 on every linear
    times: list[float] = []
    matmul_share = None
    built: list[int] = []  # resident bytes once each stage's model and Trainer exist, before its first step
    for stage, steps in ((1, a.warmup + a.reps), (2, a.stage2_steps)):
        torch.manual_seed(stage)
        model = add_lora(copy.deepcopy(base.load()), lora) if a.child == "old" else base.for_training(lora)
        with tempfile.TemporaryDirectory() as tmp:
            trainer, batch = _trainer(model, a.batch, a.length, "+gc" in a.child, Path(tmp))
            built.append(vm_rss_bytes())
            for i in range(steps):
                profile = a.profile and a.child == "new" and stage == 1 and i == steps - 1
                t0 = time.perf_counter()
                if profile:  # timed too: the profiler's overhead is small next to a step's matmuls
                    matmul_share = _profiled(lambda: _step(trainer, batch))
                else:
                    _step(trainer, batch)
                if stage == 1 and i >= a.warmup:
                    times.append(time.perf_counter() - t0)
            del trainer, model, batch
        release_memory()
    return {"variant": a.child, "vm_hwm": vm_hwm_bytes(), "after_load": loaded, "built": built, "times": times,
            "matmul_share": matmul_share}


def _profiled(fn) -> float:
    """Share of the step's self CPU time spent in matrix products (mm, addmm, bmm, SDPA kernels)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total


def parent(a: argparse.Namespace) -> None:
    t_start = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, load average {os.getloadavg()[0]:.1f}  torch {torch.__version__}", end="")
    import transformers

    print(f", transformers {transformers.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp), a.quick)
        rows = []
        for v in a.variants:
            cmd = [sys.executable, __file__, "--child", v, "--model-dir", tmp, "--batch", str(a.batch),
                   "--length", str(a.length), "--reps", str(a.reps), "--stage2-steps", str(a.stage2_steps),
                   "--warmup", str(a.warmup)]
            cmd += ["--profile"] if a.profile else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    tokens = a.batch * a.length
    old_tps = tokens / statistics.median(rows[0]["times"])  # the first variant is the anchor
    print(f"LoRA r=64 training, batch {a.batch} x {a.length}, two stages, fp32, {a.reps} timed step(s) after "
          f"{a.warmup} warm-up, {a.stage2_steps} step(s) in stage 2")
    print("| variant | peak RSS (VmHWM) | RSS: base loaded / stage 1 built / stage 2 built | step s min/median/max "
          "(n) | tokens/s (median) | vs old |")
    print("|---|---|---|---|---|---|")
    gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
    for r in rows:
        t = r["times"]
        tps = tokens / statistics.median(t)
        print(f"| {r['variant']} | {gib(r['vm_hwm'])} GiB | {gib(r['after_load'])} / "
              f"{' / '.join(gib(b) for b in r['built'])} GiB | {min(t):.2f}/{statistics.median(t):.2f}/{max(t):.2f}"
              f" ({len(t)}) | {tps:.0f} | {tps / old_tps:.2f}x |")
    by = {r["variant"]: r for r in rows}
    new = by.get("new", rows[-1])
    if new["matmul_share"] is not None:
        print(f"Profile of one new step: {100 * new['matmul_share']:.0f}% of CPU time in matrix products "
              "(mm, addmm, bmm, SDPA)")
    best = min(r["vm_hwm"] for r in rows if r["variant"] != "old")
    print(f"Targets: peak <= 3 GiB: {'met' if best <= 3 * 2**30 else 'not met'} (best new {best / 2**30:.2f} GiB); "
          f"tokens/s >= 1.5x old: {'met' if tokens / statistics.median(new['times']) >= 1.5 * old_tps else 'not met'}")
    print(f"Wall time {time.time() - t_start:.0f} s, load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=5, help="timed steps in stage 1")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    ap.add_argument("--stage2-steps", type=int, default=1)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--length", type=int, default=None)
    ap.add_argument("--profile", action="store_true", help="profile the new variant's last step (its memory and "
                    "time then include the profiler's: measure without it for the figures)")
    ap.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    ap.add_argument("--child", choices=VARIANTS)
    ap.add_argument("--model-dir")
    a = ap.parse_args()
    a.batch = a.batch or (2 if a.quick else 8)
    a.length = a.length or (64 if a.quick else 512)
    if a.child:
        print(json.dumps(child(a)))
    else:
        parent(a)


if __name__ == "__main__":
    main()
