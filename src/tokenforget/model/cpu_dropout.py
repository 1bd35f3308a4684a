"""LoRA's dropout on CPU with its masks drawn by numpy, kept as one byte per element.

Why: peft applies dropout to the input of every adapted linear (seven per Llama block), and torch draws a CPU
dropout mask with `bernoulli_`, which took 6 ms for each 8 x 109 x 576 mask (12 ns an element) on this 2-core
AMD EPYC: 16% of a LoRA training step of SmolLM2-135M by torch.profiler, a fifth with the mask's float multiplies
(docs/performance.md). Here each mask
comes from numpy's PCG64 (16 random bits per element), seeded by one draw from torch's generator, so
`torch.manual_seed` / the Trainer's seed make it reproducible, and gradient checkpointing, which restores torch's
RNG state before recomputing a layer, recomputes the same mask. The mask is saved for the backward pass as bool
(1 byte an element; torch's dropout keeps a float mask, 4).

An element is dropped with probability round(p x 65536) / 65536 (p = 0.1: 0.100006), kept ones are scaled by
1 / (1 - p), as in `torch.nn.functional.dropout`. On other devices, in eval mode and for p = 0 the module is
torch's dropout itself.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LEVELS = 1 << 16  # one uint16 per element


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """Bool tensor of `shape`, False with probability round(p x 65536) / 65536; seeded from torch's CPU generator."""
    seed = int(torch.randint(0, 2**62, (1,)))
    n = int(np.prod(shape))
    bits = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(2 * n), dtype=np.uint16)
    return torch.from_numpy(bits >= round(p * LEVELS)).view(shape)


class _MaskedScale(torch.autograd.Function):
    """y = x * keep * scale; dy/dx = keep * scale. Saves only the bool mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad.mul(keep).mul_(ctx.scale), None, None


class CPUDropout(torch.nn.Module):
    """Drop-in for `torch.nn.Dropout(p)` (see the module docstring)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        return _MaskedScale.apply(x, keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Replace every `torch.nn.Dropout` in peft's `lora_dropout` dicts with `CPUDropout` of the same p.
    Returns how many were replaced."""
    replaced = 0
    for module in model.modules():
        drops = getattr(module, "lora_dropout", None)
        if not isinstance(drops, torch.nn.ModuleDict):
            continue
        for name, drop in drops.items():
            if type(drop) is torch.nn.Dropout and drop.p > 0:
                drops[name] = CPUDropout(drop.p)
                replaced += 1
    return replaced
