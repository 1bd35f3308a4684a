"""The benchmark script runs end to end in quick mode and prints every row (no timing is asserted)."""

import subprocess
import sys
from pathlib import Path

import json


def test_quick_benchmark_prints_every_ratio(tmp_path):
    script = Path(__file__).parents[1] / "benchmarks" / "run.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    metrics = " ".join(r["metric"] for r in rows)
    for needle in ("train step", "token-class work", "scoring tokens/s", "padding share", "peak memory, train",
                   "peak memory, score", "partition of", "streaming partition", "packed / padded"):
        assert needle in metrics
    assert all(r["ratio"] == r["ratio"] for r in rows)  # no NaN
    # Not timing: memory and exactness targets hold at any machine load.
    memory = [r for r in rows if "peak memory" in r["metric"]]
    assert all(r["ok"] for r in memory)


def test_gpu_benchmark_quick_mode_on_cpu(tmp_path):
    """benchmarks/gpu.py --quick on this CPU (tiny Llama, 2 x 32 tokens): both settings timed against the plain
    step, and the model FLOPs per token as worked by hand for TINY (no timing is asserted).

    N (matmul weights) per layer: q 64x64 + k 64x32 + v 64x32 + o 64x64 + gate, up, down 3 x 64x128 = 36,864;
    2 layers + lm_head 1000x64: N = 137,728. F = 2 N + 4 L T d = 275,456 + 4 x 2 x 32 x 64 = 291,840.
    LoRA: 2 F = 583,680; full fine-tuning: 3 F = 875,520."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--json", str(tmp_path / "gpu.json")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["fused_backend"] == "chunked" and report["peak_flops"] is None  # CPU: no kernel, no MFU
    lora, full = report["results"]
    assert (lora["flops_per_token"], full["flops_per_token"]) == (583_680, 875_520)
    for r in (lora, full):
        assert r["tokens_per_step"] == 64 and set(r["steps"]) == {"plain", "forget (chunked head)"}
        assert all(len(s["seconds"]) == 5 for s in r["steps"].values())
        assert 0 < r["ratios"]["forget (chunked head)"] < float("inf")


def test_memory_benchmark_quick_mode_prints_every_variant():
    """benchmarks/memory.py --quick: each variant in a child process, its peak memory and step times printed
    (no figure is asserted: the quick model is too small for the difference to show)."""
    script = Path(__file__).parents[1] / "benchmarks" / "memory.py"
    out = subprocess.run([sys.executable, str(script), "--quick", "--reps", "1", "--warmup", "0",
                          "--stage2-steps", "1", "--profile"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "GiB" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["old", "new", "new+gc", "new+lean", "new+gc+lean"]
    assert "of CPU time in matrix products" in out.stdout and "Targets: peak <= 3 GiB" in out.stdout


def test_cpu_step_benchmark_quick_mode_times_both_dropouts():
    """benchmarks/cpu_step.py --quick: peft's dropout and ours, interleaved, a row each and their ratio."""
    script = Path(__file__).parents[1] / "benchmarks" / "cpu_step.py"
    out = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1].strip() for line in out.stdout.splitlines() if line.startswith("| ") and not line.startswith("| dropout")]
    assert rows == ["peft", "ours"]
    assert float(out.stdout.split("ratio ours / peft (median step time):")[1]) > 0
