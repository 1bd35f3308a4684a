"""Per-token cross-entropy kernels: over logits in fp32 chunks, and the output head + CE fused.

`token_cross_entropy` / `rows_cross_entropy` take logits; `linear_cross_entropy` (ours, an autograd Function) takes
the hidden states and the head's weight and never holds the whole (N, V) logits; `head_cross_entropy` is the
`hidden` CE path: a fused CUDA kernel when one is installed, else `linear_cross_entropy`.

`head_cross_entropy` computes the same per-row CE as `linear_cross_entropy`,
CE_n = logsumexp_v y[n, v] - y[n, targets[n]] with y = logit_map(hidden @ weight.T + bias), through the
backend that `fused_backend` picks:

- `liger`: Liger-Kernel's fused linear cross-entropy (https://github.com/linkedin/Liger-Kernel), from
  version 0.8.2, the first whose `reduction="none"` folds each token's upstream gradient into the logits
  gradient before it is summed into the weight gradient (earlier versions scaled it afterwards, which is
  wrong for our per-token weights +1/N_pos, -lambda/N_neg).
- `cce`: Apple's cut cross-entropy (https://github.com/apple/ml-cross-entropy), with gradient filtering off
  (`filter_eps=None`) so that no small softmax entry is dropped from the gradient. Its PyPI release
  (25.1.1) takes no bias, so a head with a bias (Phi) stays on `chunked` when Liger is absent.
- `chunked`: ours, `linear_cross_entropy`, on any device.

Both kernels take a bias and a soft cap but no scale: y = c tanh(s z / c) and y = s z are the same with
z computed from s * hidden and s * bias, so the scale is folded into the kernel's inputs.
The kernels run on CUDA only; `pip install 'tokenforget[cuda]'` (Liger) or `'tokenforget[cce]'`.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, input_ids: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Cross-entropy of every token under the model, aligned with the tokens.

    Args:
        logits: (B, T, V) next-token logits, any float dtype; upcast to fp32 one chunk at a time.
        input_ids: (B, T) token ids.
        chunk_size: positions per fp32 chunk, so the fp32 copy of the logits is never whole.

    Returns:
        (B, T) fp32: out[b, t] = -log p(input_ids[b, t] | input_ids[b, :t]) for t >= 1; out[:, 0] = 0.
    """
    bsz, seq, vocab = logits.shape
    flat_logits = logits[:, :-1].reshape(-1, vocab)  # (B*(T-1), V), predicts tokens 1..T-1
    targets = input_ids[:, 1:].reshape(-1)  # (B*(T-1),)
    shifted = rows_cross_entropy(flat_logits, targets, chunk_size).view(bsz, seq - 1)
    return F.pad(shifted, (1, 0))  # (B, T): position 0 has no prediction



def rows_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """(N,) fp32 cross-entropy of `targets` (N,) under `logits` (N, V), upcast `chunk_size` rows at a time.

    With N = 0 the result is an empty tensor that is still part of the graph, so a batch without any
    loss token still back-propagates (a zero gradient).
    """
    chunks = [
        F.cross_entropy(logits[i : i + chunk_size].float(), targets[i : i + chunk_size], reduction="none")
        for i in range(0, max(logits.shape[0], 1), chunk_size)
    ]
    return torch.cat(chunks)



@dataclass(frozen=True)
class LogitMap:
    """What a causal LM does to its output head's z = hidden @ weight.T + bias before the softmax.

    y = c * tanh(s * z / c) with a soft cap c, else y = s * z. Llama and most models: s = 1, no cap (y = z);
    Cohere: s = logit_scale; Granite: s = 1 / logits_scaling; Gemma 2 and 3: c = final_logit_softcapping.
    Applied in fp32 to (rows, V) chunks of z.
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.scale) or (self.softcap is not None and not self.softcap > 0):
            raise ValueError(f"LogitMap needs a finite scale and a positive soft cap, got {self}")

    def __str__(self) -> str:
        u = "z" if self.scale == 1.0 else f"{self.scale:g} z"
        return f"y = {u}" if self.softcap is None else f"y = {self.softcap:g} tanh({u} / {self.softcap:g})"

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """y (c, V) from z (c, V), with the model's own order of operations (z * s, / c, tanh, * c)."""
        u = z * self.scale if self.scale != 1.0 else z
        return u if self.softcap is None else torch.tanh(u / self.softcap) * self.softcap

    def vjp(self, z: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
        """dL/dz = dL/dy * s * (1 - tanh(s z / c)^2) (without the tanh factor when uncapped); (c, V) each."""
        if self.softcap is not None:
            t = torch.tanh(z * self.scale / self.softcap)
            grad_y = grad_y * (1.0 - t * t)
        return grad_y * self.scale if self.scale != 1.0 else grad_y



IDENTITY = LogitMap()



class _LinearCrossEntropy(torch.autograd.Function):
    """CE of `targets` under logits y = logit_map(hidden @ weight.T + bias), one chunk of rows at a time
    (see `linear_cross_entropy`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, dtype: torch.dtype, logit_map: LogitMap):  # type: ignore[override]
        w = weight.to(dtype)
        loss = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        lse = torch.empty_like(loss)
        for i in range(0, hidden.shape[0], chunk_size):
            rows = slice(i, i + chunk_size)
            y = logit_map(_head_chunk(hidden[rows], w, bias, dtype))  # (c, V): the only logits alive
            # F.cross_entropy's fused log-softmax: one pass fewer over (c, V) than logsumexp's max, sub, exp,
            # sum (on an AMX CPU, where the bf16 head matmul is cheap, those passes were most of scoring)
            loss[rows] = F.cross_entropy(y, targets[rows], reduction="none")
            lse[rows] = loss[rows] + y.gather(1, targets[rows, None]).squeeze(1)  # for the backward's softmax
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_size, ctx.dtype, ctx.logit_map = chunk_size, dtype, logit_map
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        w, logit_map = weight.to(ctx.dtype), ctx.logit_map
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        for i in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(i, i + ctx.chunk_size)
            h = hidden[rows].to(ctx.dtype)
            z = _head_chunk(h, w, bias, ctx.dtype)  # (c, V), recomputed
            grad_y = torch.exp(logit_map(z) - lse[rows, None])  # softmax, (c, V)
            grad_y[torch.arange(h.shape[0]), targets[rows]] -= 1.0  # d CE / d logits
            grad_z = logit_map.vjp(z, grad_y * grad_loss[rows, None])  # (c, V) fp32: through scale and cap
            g = grad_z.to(ctx.dtype)
            if grad_h is not None:
                grad_h[rows] = (g @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (g.T @ h).float()
            if grad_b is not None:
                grad_b += grad_z.sum(0)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None



def _head_chunk(h: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """z = h @ w.T (+ bias): (c, H) x (V, H) -> (c, V) fp32; the matmul in `dtype`, the bias added in fp32."""
    z = (h.to(dtype) @ w.T).float()
    return z if bias is None else z + bias.float()



def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 256,
    bias: Optional[torch.Tensor] = None,
    logit_map: LogitMap = IDENTITY,
) -> torch.Tensor:
    """Per-row cross-entropy of `targets` under y = logit_map(hidden @ weight.T + bias), without the full logits.

    CE_n = logsumexp_v y[n, v] - y[n, targets[n]]. The (N, V) logits exist one chunk of `chunk_size` rows at
    a time, in fp32 for the bias, the logit map and the log-sum-exp; the backward pass recomputes each
    chunk and applies the chain rule through the map (`LogitMap.vjp`). Under autocast the matmuls run in the
    autocast dtype. Gradients flow to hidden, weight and bias, wherever they require them.

    Args:
        hidden: (N, H) final hidden states of the positions that predict `targets`.
        weight: (V, H) output embedding (lm_head) weight.
        targets: (N,) token ids.
        bias: (V,) lm_head bias (Phi), or None.
        logit_map: the model's scale and soft cap of its logits (see `LogitMap`).

    Returns:
        (N,) fp32 cross-entropy per row.
    """
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    with torch.autocast(device_type=dev, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, dtype, logit_map)


Backend = Literal["liger", "cce", "chunked"]
LIGER_MIN = (0, 8, 2)  # first release with correct per-token gradients for reduction="none" (Liger PR #1298)


def installed_version(dist: str) -> Optional[tuple[int, ...]]:
    """The installed version of distribution `dist` as its leading integers ("0.8.2.dev1" -> (0, 8, 2)), or None."""
    try:
        text = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(n) for n in re.match(r"\d+(?:\.\d+)*", text).group().split("."))


def fused_backend(device: torch.device, bias: bool = False, dtype: torch.dtype = torch.bfloat16) -> Backend:
    """Which backend `head_cross_entropy` uses for tensors on `device` (and a head with a `bias`) computed in
    `dtype`: on CUDA, Liger (>= 0.8.2) when installed, else cut cross-entropy when installed, the head has no
    bias and `dtype` is bf16 or fp16 (its backward refuses fp32: seen on an H200, 2026-11-29); `chunked`
    otherwise and on every other device."""
    if device.type != "cuda":
        return "chunked"
    liger = installed_version("liger-kernel")
    if liger is not None and liger >= LIGER_MIN:
        return "liger"
    if installed_version("cut-cross-entropy") is not None and not bias and dtype in (torch.bfloat16, torch.float16):
        return "cce"
    return "chunked"


def head_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 256,
    bias: Optional[torch.Tensor] = None,
    logit_map: LogitMap = IDENTITY,
) -> torch.Tensor:
    """(N,) fp32 CE of `targets` (N,) under y = logit_map(hidden (N, H) @ weight (V, H).T + bias (V,)),
    through the backend `fused_backend` picks for `hidden`'s device (arguments as `linear_cross_entropy`).

    The kernels run in the autocast dtype when autocast is on (as the chunked path's matmuls do), else in
    `hidden`'s dtype; `chunk_size` is the chunked path's only.
    """
    dev = hidden.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    backend = fused_backend(hidden.device, bias is not None, dtype)
    if backend == "chunked" or hidden.shape[0] == 0:  # an empty batch: the chunked path keeps the graph
        return linear_cross_entropy(hidden, weight, targets, chunk_size, bias, logit_map)
    s = logit_map.scale  # y = c tanh(s z / c) = c tanh(z' / c) with z' = (s h) W^T + s b
    h = hidden.to(dtype) * s if s != 1.0 else hidden.to(dtype)
    b = None if bias is None else (bias.to(dtype) * s if s != 1.0 else bias.to(dtype))
    with torch.autocast(device_type=dev, enabled=False):
        return KERNELS[backend](h, weight.to(dtype), targets, b, logit_map.softcap).float()


def _liger(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, b: Optional[torch.Tensor],
           softcap: Optional[float]) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # accum_dtype fp32: the weight and bias gradients are sums over every token, kept in fp32 as ours are
    return liger_fused_linear_cross_entropy(h, w, t, bias=b, reduction="none", softcap=softcap,
                                            accum_dtype=torch.float32)


def _cce(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, b: Optional[torch.Tensor],
         softcap: Optional[float]) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy as cce

    assert b is None, "cut cross-entropy 25.1.1 takes no bias (fused_backend never picks it for one)"
    return cce(h, w, t, softcap=softcap, reduction="none", filter_eps=None)


KERNELS: dict[str, Callable[..., torch.Tensor]] = {"liger": _liger, "cce": _cce}
