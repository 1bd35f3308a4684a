"""Memory of one training process: its estimate from the model's config alone (no weights are loaded), and
the allocator setting that keeps the resident peak near it on Linux (`lean_allocator`).

For a decoder of L layers, hidden size h, MLP size f, vocabulary V, with P base parameters, a micro-batch of
B sequences of T tokens, weights in w bytes (4 fp32, 2 bf16) and activations in a bytes (2 under bf16
autocast, else 4):

    weights     = P x w
    training    = 16 x P_train            LoRA: the adapter's fp32 weights, gradients and AdamW's two moments
                = 12 x P                  full fine-tuning: gradients and the two moments (weights counted above)
    activations = B x T x L x (6h + 4f + D) x a + 2 x 256 x V x 4
                                          without gradient checkpointing
                = B x T x L x h x a + B x T x (6h + 4f + D) x a + 2 x 256 x V x 4
                                          with it (each layer's input, and one layer recomputed at a time)

P and P_train are counted exactly, on an empty (meta-device) instance of the architecture: P_train = sum over
the LoRA-targeted linear layers of r x (in + out). The per-token, per-layer activation count is a rough one
for a Llama-style block under autograd: the two norms' inputs and outputs and the attention output (6h with q,
k, v counted as h), the MLP's gate, up, activation and product (4f), and D = the in-features of the targeted
linears (LoRA's dropout keeps a copy of each input; 0 without LoRA). The head's cross-entropy runs in chunks
of 256 rows (`model.head_ce.linear_cross_entropy`): one chunk of fp32 logits and their softmax, 2 x 256 x V x 4 bytes.
Not counted: the framework itself (the Python process, torch and transformers: about 0.5-1 GB resident on a
CPU), allocator fragmentation, the data set, evaluation. A guide for batch size and max_length, not a bound:
for SmolLM2-135M's shape at 8 x 512 in fp32 it gives 7.6 GiB without and 1.4 GiB with gradient checkpointing.
benchmarks/memory.py measured peaks of 10.5 GiB and 6.7 GiB with glibc's default allocator settings: the gap
was freed activation buffers that glibc kept resident, which `lean_allocator` hands back (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from typing import Any, Union

import torch

from tokenforget.config.model import LoraSettings, ModelConfig
from tokenforget.config.training import TrainingConfig

CE_CHUNK_ROWS = 256  # rows of logits at a time in model.head_ce.linear_cross_entropy
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)
LEAN_MMAP_THRESHOLD = 4 << 20  # bytes: activation-sized buffers and up; smaller ones stay on the (faster) heap


def lean_allocator(threshold: int = LEAN_MMAP_THRESHOLD) -> bool:
    """Have glibc serve every allocation of `threshold` bytes or more with its own mmap, unmapped when freed,
    so a freed activation buffer leaves the resident memory at once. Returns whether the setting was made.

    Why: glibc starts at a 128 KiB mmap threshold and raises it to the size of each mmapped buffer freed (up to
    32 MiB); from then on activation-sized tensors come from the heap, whose freed pages stay resident. A LoRA
    training of SmolLM2-135M's shape at 8 x 512 with gradient checkpointing peaked at 6.7 GiB resident for about
    1.5 GiB of live tensors (docs/performance.md). Setting the threshold switches that adjustment off.

    Process-wide, so it belongs at the start of a program: the command line calls it first (`tokenforget.cli`);
    call it at the top of your own script. A no-op returning False where the C library is not glibc (macOS,
    musl) and when `MALLOC_MMAP_THRESHOLD_` is set in the environment (the user's own choice wins).
    """
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1  # glibc's mallopt returns 1 on success


@dataclass
class Shape:
    """What the estimate needs of a model: sizes from its config, parameter counts from an empty instance."""

    layers: int
    hidden: int
    mlp: int
    vocab: int
    params: int
    lora_params: int  # r x (in + out) summed over the targeted linears (0 without LoRA)
    lora_inputs: int  # in-features summed over the targeted linears (0 without LoRA)
    tied: bool = True  # the output head is the input embedding (counted once in `params`)


@dataclass
class MemoryEstimate:
    """Bytes, by part (see the module docstring for the formulas)."""

    weights: int
    training: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.training + self.activations

    def describe(self, batch: int, length: int) -> str:
        return (f"{batch} x {length} tokens: weights {size(self.weights)} + trainable weights, gradients, AdamW "
                f"{size(self.training)} + activations {size(self.activations)} = {size(self.total)}")


def size(n: int) -> str:
    """Bytes as GB (from 1 GB) or MB, two decimals: 3_702_784 -> '3.70 MB'."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


def estimate(shape: Shape, lora: bool, batch: int, length: int, weight_bytes: int, act_bytes: int,
             checkpointing: bool) -> MemoryEstimate:
    """The estimate of the module docstring for one micro-batch of `batch` x `length` tokens."""
    training = 16 * shape.lora_params if lora else 12 * shape.params
    per_layer = 6 * shape.hidden + 4 * shape.mlp + (shape.lora_inputs // shape.layers if lora else 0)
    tokens = batch * length
    if checkpointing:
        act = tokens * shape.layers * shape.hidden * act_bytes + tokens * per_layer * act_bytes
    else:
        act = tokens * shape.layers * per_layer * act_bytes
    head = 2 * CE_CHUNK_ROWS * shape.vocab * 4
    return MemoryEstimate(shape.params * weight_bytes, training, act + head)


# ---------------------------------------------------------------- sharding and cost (the dry run's --plan-gpus)
#
# Memory per GPU under a sharding of N GPUs (`sharded`), from the one-process estimate above:
#     ddp          weights + training + activations                       (every GPU holds everything)
#     zero2        weights + training / N + activations                   (gradients, optimizer states sharded)
#     zero3, fsdp  weights / N + training / N + activations + gathered    (parameters sharded too)
#     gathered   = 2 x max(one layer's parameters, V x h) x w             (the unit being used and the next one,
#                                                                          prefetched; the head's unit is V x h)
# Model FLOPs of a stage (`stage_flops`), per token of a sequence of T tokens (PaLM, Chowdhery et al. 2022, app. B):
#     forward  F = 2 x P_matmul + 4 x L x h x T     P_matmul = P, less the input embedding when the head is untied
#                                                   (a lookup costs no FLOPs); 4 L h T: the attention scores and
#                                                   their product with the values, no saving for the causal mask
#     scoring      F per forward (2 forwards: the base and the reference)
#     training     3F full fine-tuning (forward, gradients of activations and of weights)
#                  2F LoRA (the frozen weights get no gradient; the adapters' are ~r/h of it and not counted)
#                  + F with gradient checkpointing (each layer's forward again in the backward)
# Wall time = FLOPs / (N x peak bf16 dense FLOP/s x MFU), MFU the stated share of the peak a run reaches.
# An estimate for planning: no padding waste beyond the tokens given, no communication time, no data loading.

SHARDINGS = ("ddp", "zero2", "zero3", "fsdp")  # the names command_config.PlanConfig accepts


@dataclass(frozen=True)
class GPU:
    """What the cost plan needs of a GPU: its name, the dense bf16 peak and its memory (vendor data sheets)."""

    name: str
    peak_flops: float  # FLOP/s, dense bf16 tensor cores (no sparsity)
    memory: float  # bytes


GPUS = {  # the names command_config.PlanConfig accepts
    "h100": GPU("NVIDIA H100 SXM 80GB", 989e12, 80e9),
    "h200": GPU("NVIDIA H200 SXM 141GB", 989e12, 141e9),
    "a100": GPU("NVIDIA A100 SXM 80GB", 312e12, 80e9),
    "l40s": GPU("NVIDIA L40S 48GB", 362e12, 48e9),
    "a10g": GPU("NVIDIA A10G 24GB", 70e12, 24e9),
}


def matmul_params(shape: Shape) -> int:
    """Parameters that take part in a matrix product per token: every one, less the input embedding when the head
    is a separate matrix (a tied head is the embedding, used once as a matrix)."""
    return shape.params - (0 if shape.tied else shape.vocab * shape.hidden)


def forward_flops_per_token(shape: Shape, seq_len: float) -> float:
    """F = 2 x P_matmul + 4 x L x h x T (see the block comment above)."""
    return 2 * matmul_params(shape) + 4 * shape.layers * shape.hidden * seq_len


def training_passes(lora: bool, checkpointing: bool) -> int:
    """Forward-equivalents per token of a training step: 3 full, 2 LoRA, one more with gradient checkpointing."""
    return (2 if lora else 3) + int(checkpointing)


def stage_flops(shape: Shape, tokens: float, seq_len: float, passes: float) -> float:
    """Model FLOPs of a stage that runs `passes` forward-equivalents over `tokens` tokens of mean length `seq_len`."""
    return passes * tokens * forward_flops_per_token(shape, seq_len)


def wall_seconds(flops: float, gpu: GPU, gpus: int, mfu: float) -> float:
    return flops / (gpus * gpu.peak_flops * mfu)


def forward_estimate(shape: Shape, batch: int, length: int, weight_bytes: int, act_bytes: int) -> MemoryEstimate:
    """A scoring forward under no_grad: the weights, one layer's activations at a time, one CE chunk."""
    act = batch * length * (6 * shape.hidden + 4 * shape.mlp) * act_bytes + 2 * CE_CHUNK_ROWS * shape.vocab * 4
    return MemoryEstimate(shape.params * weight_bytes, 0, act)


def sharded(est: MemoryEstimate, shape: Shape, sharding: str, gpus: int, weight_bytes: int) -> MemoryEstimate:
    """Bytes per GPU of the one-process estimate `est` under `sharding` over `gpus` GPUs (block comment above)."""
    if sharding == "ddp":
        return est
    if sharding == "zero2":
        return MemoryEstimate(est.weights, est.training // gpus, est.activations)
    layer = (shape.params - shape.vocab * shape.hidden) // shape.layers  # a decoder layer's parameters
    gathered = 2 * max(layer, shape.vocab * shape.hidden) * weight_bytes
    return MemoryEstimate(est.weights // gpus + gathered, est.training // gpus, est.activations)


def model_shape(config: Any, lora: LoraSettings) -> Shape:
    """The `Shape` of a transformers config: an instance on the meta device (no memory) is counted."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())  # tied weights once
    targets = _lora_targets(model, lora.target_modules) if lora.enabled else []
    hidden = config.hidden_size
    return Shape(
        layers=config.num_hidden_layers, hidden=hidden, mlp=getattr(config, "intermediate_size", None) or 4 * hidden,
        vocab=config.vocab_size, params=params,
        lora_params=sum(lora.r * (m.in_features + m.out_features) for m in targets),
        lora_inputs=sum(m.in_features for m in targets),
        tied=model.get_output_embeddings() is None
        or model.get_output_embeddings().weight is model.get_input_embeddings().weight,
    )


def _lora_targets(model: torch.nn.Module, target: Union[str, list[str]]) -> list[torch.nn.Linear]:
    """The linear layers peft's `target_modules` names: `all-linear` (every one but the output head), a
    regular expression over the full module name, or a list of names matched on the last part(s)."""
    import re

    head = model.get_output_embeddings()
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or m is head:
            continue
        if target == "all-linear":
            hit = True
        elif isinstance(target, str):
            hit = re.fullmatch(target, name) is not None
        else:
            hit = any(name == t or name.endswith(f".{t}") for t in target)
        if hit:
            out.append(m)
    return out


def config_shape(model_cfg: ModelConfig, lora: LoraSettings) -> Shape:
    """The `Shape` of the configured model, from its config file alone (no weights are read)."""
    from transformers import AutoConfig

    from tokenforget.model.loading import resolve_model

    path, gguf = resolve_model(model_cfg)
    kwargs = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    return model_shape(config, lora)


def training_estimate(shape: Shape, model_cfg: ModelConfig, lora: LoraSettings, tcfg: TrainingConfig, length: int,
                      bf16: bool) -> MemoryEstimate:
    """`estimate` for one training micro-batch of the configured precision and settings."""
    return estimate(shape, lora.enabled, tcfg.batch_size, length, weight_bytes(model_cfg), 2 if bf16 else 4,
                    tcfg.gradient_checkpointing)


def weight_bytes(model_cfg: ModelConfig) -> int:
    return 2 if model_cfg.weights == "bf16" else 4


def run_estimate(model_cfg: ModelConfig, lora: LoraSettings, tcfg: TrainingConfig, length: int, bf16: bool) -> str:
    """One line for the dry run: the estimate for a training micro-batch, from the model's config file."""
    est = training_estimate(config_shape(model_cfg, lora), model_cfg, lora, tcfg, length, bf16)
    gc = ", gradient checkpointing" if tcfg.gradient_checkpointing else ""
    return f"Memory estimate of one training process ({'LoRA' if lora.enabled else 'full'}{gc}), micro-batch " \
           f"{est.describe(tcfg.batch_size, length)} (formula: tokenforget.model.memory; framework not counted)"
