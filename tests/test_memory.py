"""Precision and memory: stages share the base's weights without changing them; attention and precision
settings; the dry run's memory estimate, worked out by hand."""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

import pytest
import torch
from conftest import forbid_loading
from transformers import AutoModelForCausalLM, LlamaConfig

from tokenforget.cli import main, parse_config
from tokenforget.config import ConfigError, LoraSettings, ModelConfig, RunConfig
from tokenforget.model import loading as models
from tokenforget.model.loading import BaseModel, add_lora, share_weights
from tokenforget.model.memory import Shape, estimate, model_shape
from tokenforget.pipeline.resolver import Run


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name and bytes), in name order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_a_stage_never_changes_the_weights_the_next_one_starts_from(config: Path, monkeypatch):  # noqa: F811
    """Stage A (the reference), B (train-sft, its adapter merged into a saved model), C (train-dft): each
    starts from the original base weights, by hash, and every stage's base shares the one copy in memory."""
    _, cfg, _ = parse_config(["run", str(config)])
    run = Run(cfg)
    base = run.base.load()
    original = weights_digest(base)
    starts: list[str] = []
    frozen = BaseModel.frozen

    def recorded(self: BaseModel) -> torch.nn.Module:
        model = frozen(self)
        starts.append(weights_digest(model))
        assert all(p.data_ptr() == q.data_ptr() for p, q in zip(model.parameters(), base.parameters()))  # no copy
        return model

    monkeypatch.setattr(BaseModel, "frozen", recorded)
    run.reference()
    run.train("sft")
    assert (run.stage_dir("train-sft") / "model" / "config.json").is_file()  # merged: save_merged is on
    run.train("dft")
    assert starts == [original] * 3
    assert weights_digest(base) == original


def test_shared_base_trains_the_same_adapter_as_a_deep_copy(config: Path, monkeypatch):  # noqa: F811
    """The adapter trained on the shared base is bit-identical to the one trained on a deep copy (the old way)."""
    _, cfg, _ = parse_config(["run", str(config)])
    new = Run(cfg).train("sft") / "adapter" / "adapter_model.safetensors"
    cfg.run_dir = str(Path(cfg.run_dir).with_name("deep-copy"))
    monkeypatch.setattr(BaseModel, "frozen", BaseModel.fresh)
    old = Run(cfg).train("sft") / "adapter" / "adapter_model.safetensors"
    assert new.read_bytes() == old.read_bytes()


def test_full_fine_tuning_trains_a_copy(tiny_model_dir: Path):
    """Without LoRA every weight trains, so the stage gets a deep copy: the base's storage is not the copy's."""
    base = BaseModel(ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"))
    model = base.for_training(LoraSettings(enabled=False))
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(), base.load().parameters()))


def test_share_weights_keeps_ties_and_flags_apart(tiny_model_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    copy = share_weights(model)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # tied stays tied
    assert copy.lm_head.weight is not model.lm_head.weight
    assert copy.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    add_lora(copy, LoraSettings(r=4, alpha=8))  # peft freezes the copy's base parameters
    assert all(p.requires_grad for p in model.parameters())


def test_attention_and_precision_settings_are_checked(tiny_model_dir: Path, monkeypatch):
    path = str(tiny_model_dir)
    eager = models.load_model(ModelConfig(name_or_path=path, precision="fp32", attn_implementation="eager"))
    assert eager.config._attn_implementation == "eager"
    assert models.load_model(ModelConfig(name_or_path=path, precision="fp32")).config._attn_implementation == "sdpa"
    if importlib_missing("flash_attn"):
        with pytest.raises(ConfigError, match="'model.attn_implementation': flash_attention_2 needs the flash-attn"):
            ModelConfig(attn_implementation="flash_attention_2")
    with pytest.raises(ConfigError, match="'model.weights': bf16 weights train in bf16 autocast"):
        ModelConfig(weights="bf16", precision="fp32")
    with pytest.raises(ConfigError, match="'model.weights': bf16 weights are a frozen base for LoRA"):
        RunConfig(model=ModelConfig(weights="bf16"), lora=LoraSettings(enabled=False))
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="'model.weights': bf16 weights need native bf16"):
        models.load_model(ModelConfig(name_or_path=path, weights="bf16"))
    with pytest.raises(ConfigError, match="'model.precision': fp16 .* is for CUDA GPUs"):
        models.use_bf16("fp16")


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def test_cli_refuses_fp16_and_flash_attention_on_this_machine_with_exit_2(config: Path, capsys):  # noqa: F811
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on a CUDA machine")
    assert main(["run", str(config), "--model.precision", "fp16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.precision" in err[0]
    if importlib_missing("flash_attn"):
        assert main(["run", str(config), "--model.attn_implementation", "flash_attention_2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "model.attn_implementation" in err[0]


def test_bf16_weights_give_a_bf16_base_and_fp32_adapter(tiny_model_dir: Path, monkeypatch):
    """The path for hardware with native bf16 (not this CPU: the check is faked): the frozen base loads in
    bf16, peft keeps the adapter in fp32, and a step under bf16 autocast gives gradients to the adapter only."""
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    base = BaseModel(ModelConfig(name_or_path=str(tiny_model_dir), weights="bf16"))
    model = base.for_training(LoraSettings(r=4, alpha=8))
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    ids = torch.tensor([[5, 6, 7, 8]])
    with models.autocast(True):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert all((p.grad is not None) == ("lora_" in n) for n, p in model.named_parameters())


# The tiny model of conftest.build_tiny: a Llama of 2 layers, hidden 32, MLP 64, 4 heads of 8, 2 KV heads, tied.
TINY = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=True)


def test_shape_of_the_tiny_model_by_hand():
    """Per layer: q 32x32 = 1024, k and v 32x16 = 512 each, o 1024, gate/up/down 32x64 = 2048 each, two norms
    32 each: 9280; P = 400x32 (tied embedding) + 2 x 9280 + 32 (final norm) = 31392.
    LoRA r=4 per layer: q 4(32+32) = 256, k and v 4(32+16) = 192, o 256, gate and up 4(32+64) = 384, down 384:
    2048, so 4096; inputs per layer 6 x 32 + 64 = 256, so 512."""
    shape = model_shape(TINY, LoraSettings(r=4, alpha=8))
    assert shape == Shape(layers=2, hidden=32, mlp=64, vocab=400, params=31392, lora_params=4096, lora_inputs=512)
    assert model_shape(TINY, LoraSettings(enabled=False)).lora_params == 0
    assert model_shape(TINY, LoraSettings(r=4, target_modules=["q_proj", "v_proj"])).lora_params == 2 * (256 + 192)


def test_estimate_by_hand():
    """Batch 4 x 128 tokens in fp32, LoRA r=4: weights 31392 x 4 = 125568; training 16 x 4096 = 65536;
    per token and layer 6x32 + 4x64 + 512/2 = 704 elements, 512 tokens x 2 layers x 704 x 4 bytes = 2883584,
    plus the head's CE chunk 2 x 256 x 400 x 4 = 819200: activations 3702784.
    Gradient checkpointing: 512 x 2 x 32 x 4 = 131072 (layer inputs) + 512 x 704 x 4 = 1441792 (one layer)
    + 819200 = 2392064. Full fine-tuning: training 12 x 31392 = 376704, per token and layer 448 (no LoRA
    copies): 512 x 2 x 448 x 4 + 819200 = 2654208. bf16 weights and autocast halve weights and activations."""
    shape = Shape(layers=2, hidden=32, mlp=64, vocab=400, params=31392, lora_params=4096, lora_inputs=512)
    est = estimate(shape, lora=True, batch=4, length=128, weight_bytes=4, act_bytes=4, checkpointing=False)
    assert (est.weights, est.training, est.activations, est.total) == (125568, 65536, 3702784, 3893888)
    gc = estimate(shape, lora=True, batch=4, length=128, weight_bytes=4, act_bytes=4, checkpointing=True)
    assert gc.activations == 2392064
    full = estimate(shape, lora=False, batch=4, length=128, weight_bytes=4, act_bytes=4, checkpointing=False)
    assert (full.training, full.activations) == (376704, 2654208)
    half = estimate(shape, lora=True, batch=4, length=128, weight_bytes=2, act_bytes=2, checkpointing=False)
    assert (half.weights, half.activations) == (62784, 2883584 // 2 + 819200)


def test_dry_run_prints_the_estimate_without_loading_weights(config: Path, capsys, monkeypatch):  # noqa: F811
    """The fixture's run: batch 4, max_length 128, LoRA r=4 on the tiny model (the numbers of the test above,
    if its tokenizer has 400 tokens)."""
    with monkeypatch.context() as m:
        forbid_loading(m, AutoModelForCausalLM)
        assert main(["run", str(config), "--dry-run"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Memory estimate")]
    assert len(lines) == 1  # reference and final training have the same batch size
    assert "micro-batch 4 x 128 tokens: weights 0.13 MB + trainable weights, gradients, AdamW 0.07 MB" in lines[0]
    assert "activations 3.70 MB = 3.89 MB" in lines[0]


# A fresh interpreter frees a 16 MiB buffer, allocates and frees another, and prints how much of it is still
# resident. glibc's default raises its mmap threshold to 16 MiB at the first free, so the second buffer comes
# from the heap and its pages stay (the trim threshold rose with it, to 32 MiB): +16 MiB. With lean_allocator
# both buffers are mmapped and unmapped when freed: +0 (a page or two of the allocator's own).
_RESIDENT_AFTER_FREE = """
import sys, torch
from tokenforget.model.memory import lean_allocator
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) * 1024
print("lean" if sys.argv[1] == "lean" and lean_allocator() else "default")
n = 16 << 20
x = torch.ones(n // 4); del x
before = rss()
y = torch.ones(n // 4); del y
print(rss() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                    reason="glibc's allocator on Linux")
def test_lean_allocator_returns_a_freed_16_mib_buffer_that_glibcs_default_keeps_resident(monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    src = str(Path(__file__).resolve().parents[1] / "src")  # this checkout's code, not an installed copy
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    kept = {}
    for mode in ("default", "lean"):
        out = subprocess.run([sys.executable, "-c", _RESIDENT_AFTER_FREE, mode], capture_output=True, text=True,
                             check=True, env=env).stdout.split()
        assert out[0] == mode  # lean_allocator made the setting
        kept[mode] = int(out[1])
    assert kept["default"] >= 15 << 20  # the control: without the setting the freed buffer stays
    assert kept["lean"] < 1 << 20


def test_lean_allocator_leaves_a_users_own_threshold_alone(monkeypatch):
    from tokenforget.model.memory import lean_allocator

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert lean_allocator() is False


def test_every_command_sets_the_lean_allocator_before_its_work(tmp_path, monkeypatch):
    """The command line makes the process-wide setting before a command runs (and not for a bad config)."""
    import tokenforget.cli as cli
    import tokenforget.model.memory as memory

    calls: list[str] = []
    monkeypatch.setattr(memory, "lean_allocator", lambda: calls.append("lean") or True)
    monkeypatch.setitem(cli.COMMANDS, "report", (*cli.COMMANDS["report"][:2], lambda cfg: calls.append("report")))
    assert main(["report", "--run_dir", str(tmp_path / "nowhere"), "--max_samples", "-1"]) == 2
    assert calls == []
    assert main(["report", "--run_dir", str(tmp_path)]) == 0
    assert calls == ["lean", "report"]


def test_precision_auto_is_fp32_on_a_cpu_without_native_bf16(monkeypatch):
    """`precision: auto` on a CPU: bf16 autocast only with AVX512-BF16 or AMX among its flags, fp32 on an
    AVX2-only or AVX-512 CPU without them, and fp32 wherever TOKENFORGET_CPU_BF16=0 hides them."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(models.CPU_BF16_ENV, raising=False)
    for flags, bf16 in ((["sse4_2", "avx2", "fma"], False), (["avx2", "avx512f", "avx512bw"], False),
                        (["avx2", "avx512f", "avx512_bf16"], True), (["avx2", "amx_tile", "amx_bf16"], True)):
        monkeypatch.setattr(models, "cpu_flags", lambda flags=flags: flags)
        assert models.use_bf16("auto") is bf16, flags
        assert models.use_bf16("fp32") is False
    monkeypatch.setenv(models.CPU_BF16_ENV, "0")
    assert models.use_bf16("auto") is False


def test_cpu_flags_read_the_flags_line(monkeypatch, tmp_path):
    """The flags line of /proc/cpuinfo, word by word: `avx512_bf16` is found, a flag that only contains a
    wanted name as a substring is not taken for it."""
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some amx_bf16 CPU\nflags\t\t: fpu avx2 avx512f xamx_bf16x\n")
    real_path = models.Path
    monkeypatch.setattr(models, "Path", lambda p: real_path(cpuinfo) if p == "/proc/cpuinfo" else real_path(p))
    assert models.cpu_flags() == ["fpu", "avx2", "avx512f", "xamx_bf16x"]
    assert not models.cpu_has_bf16()


class LargestAllocation(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the bytes of the largest tensor any op returns inside the mode (views included: an upper bound)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def test_chunked_ce_never_holds_more_than_one_chunk_of_logits():
    """The memory claim of the chunked CE, counted exactly instead of measured (a peak RSS moves with the CPU's
    kernels and the allocator): forward and backward of N = 1,024 rows over V = 1,000 in chunks of 256, the
    largest tensor any op makes is one fp32 chunk of logits, 256 x 1,000 x 4 = 1,024,000 bytes. The full-logits
    baseline makes 1,024 x 1,000 x 4 = 4,096,000."""
    from tokenforget.model.head_ce import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(1024, 64, requires_grad=True)
    w = (0.02 * torch.randn(1000, 64)).requires_grad_()
    t = torch.randint(0, 1000, (1024,))
    with LargestAllocation() as ours:
        linear_cross_entropy(h, w, t, chunk_size=256).mean().backward()
    with LargestAllocation() as naive:
        torch.nn.functional.cross_entropy(h @ w.T, t).backward()
    assert (ours.largest, naive.largest) == (1_024_000, 4_096_000)
