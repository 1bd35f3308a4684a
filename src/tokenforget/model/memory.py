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
of 256 rows (`losses.linear_cross_entropy`): one chunk of fp32 logits and their softmax, 2 x 256 x V x 4 bytes.
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

from tokenforget.config import LoraSettings, ModelConfig, TrainingConfig

CE_CHUNK_ROWS = 256  # rows of logits at a time in losses.linear_cross_entropy
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


def run_estimate(model_cfg: ModelConfig, lora: LoraSettings, tcfg: TrainingConfig, length: int, bf16: bool) -> str:
    """One line for the dry run: the estimate for a training micro-batch, from the model's config file."""
    from transformers import AutoConfig

    from tokenforget.model.loading import resolve_model

    path, gguf = resolve_model(model_cfg)
    kwargs = {"gguf_file": gguf} if gguf else {}
    config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code, **kwargs)
    shape = model_shape(config, lora)
    est = estimate(shape, lora.enabled, tcfg.batch_size, length, 2 if model_cfg.weights == "bf16" else 4,
                   2 if bf16 else 4, tcfg.gradient_checkpointing)
    gc = ", gradient checkpointing" if tcfg.gradient_checkpointing else ""
    return f"Memory estimate of one training process ({'LoRA' if lora.enabled else 'full'}{gc}), micro-batch " \
           f"{est.describe(tcfg.batch_size, length)} (formula: tokenforget.model.memory; framework not counted)"
