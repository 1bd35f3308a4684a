"""The output head + cross-entropy of the `hidden` CE path: a fused CUDA kernel when one is installed.

`head_cross_entropy` computes the same per-row CE as `losses.linear_cross_entropy`,
CE_n = logsumexp_v y[n, v] - y[n, targets[n]] with y = logit_map(hidden @ weight.T + bias), through the
backend that `fused_backend` picks:

- `liger`: Liger-Kernel's fused linear cross-entropy (https://github.com/linkedin/Liger-Kernel), from
  version 0.8.2, the first whose `reduction="none"` folds each token's upstream gradient into the logits
  gradient before it is summed into the weight gradient (earlier versions scaled it afterwards, which is
  wrong for our per-token weights +1/N_pos, -lambda/N_neg).
- `cce`: Apple's cut cross-entropy (https://github.com/apple/ml-cross-entropy), with gradient filtering off
  (`filter_eps=None`) so that no small softmax entry is dropped from the gradient. Its PyPI release
  (25.1.1) takes no bias, so a head with a bias (Phi) stays on `chunked` when Liger is absent.
- `chunked`: ours, `losses.linear_cross_entropy`, on any device.

Both kernels take a bias and a soft cap but no scale: y = c tanh(s z / c) and y = s z are the same with
z computed from s * hidden and s * bias, so the scale is folded into the kernel's inputs.
The kernels run on CUDA only; `pip install 'tokenforget[cuda]'` (Liger) or `'tokenforget[cce]'`.
"""

from __future__ import annotations

import importlib.metadata
import re
from typing import Callable, Literal, Optional

import torch

from tokenforget.losses import IDENTITY, LogitMap, linear_cross_entropy

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
