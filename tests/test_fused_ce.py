"""The fused-CE backend: which one is chosen (on CPU, with the installed versions monkeypatched), how the
logit scale is folded into a kernel's inputs, and, on a GPU, each installed kernel against F.cross_entropy."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from tokenforget.model import head_ce as fused_ce
from tokenforget.model.head_ce import LogitMap, fused_backend, head_cross_entropy, linear_cross_entropy

CUDA = torch.device("cuda")  # a device object needs no GPU; only tensors on it do


def installed(monkeypatch: pytest.MonkeyPatch, **versions: tuple[int, ...]) -> None:
    """Pretend exactly these distributions are installed, at these versions."""
    monkeypatch.setattr(fused_ce, "installed_version", lambda dist: versions.get(dist.replace("-", "_")))


@pytest.mark.parametrize("versions, device, want, bias", [
    (dict(liger_kernel=(0, 8, 2), cut_cross_entropy=(25, 1, 1)), CUDA, "liger", False),  # Liger first
    (dict(liger_kernel=(0, 9, 0)), CUDA, "liger", True),  # Liger takes a bias
    (dict(liger_kernel=(0, 8, 1), cut_cross_entropy=(25, 1, 1)), CUDA, "cce", False),  # old Liger: wrong grads
    (dict(liger_kernel=(0, 8, 1)), CUDA, "chunked", False),
    (dict(cut_cross_entropy=(25, 1, 1)), CUDA, "cce", False),
    (dict(cut_cross_entropy=(25, 1, 1)), CUDA, "chunked", True),  # cut cross-entropy takes no bias
    ({}, CUDA, "chunked", False),
    (dict(liger_kernel=(0, 8, 2), cut_cross_entropy=(25, 1, 1)), torch.device("cpu"), "chunked", False),  # CUDA only
])
def test_backend_choice(monkeypatch, versions, device, want, bias):
    installed(monkeypatch, **versions)
    assert fused_backend(device, bias) == want  # in bf16, the dtype fused kernels are for


def test_cut_cross_entropy_only_in_half_precision(monkeypatch):
    """Its backward asserts bf16/fp16 embeddings (an H200 run, 2026-11-29): fp32 stays on the chunked head."""
    installed(monkeypatch, cut_cross_entropy=(25, 1, 1))
    assert [fused_backend(CUDA, False, d) for d in (torch.bfloat16, torch.float16, torch.float32)] == ["cce", "cce", "chunked"]


def test_installed_version_reads_leading_integers():
    assert fused_ce.installed_version("torch")[:2] == tuple(int(x) for x in torch.__version__.split(".")[:2])
    assert fused_ce.installed_version("no-such-distribution-here") is None


def fake_kernel(calls: list) -> object:
    """A stand-in for a fused kernel: CE over h @ w.T + b with the soft cap, recording what it was given."""
    def kernel(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, b: Optional[torch.Tensor],
               softcap: Optional[float]) -> torch.Tensor:
        calls.append((h, b, softcap, torch.is_autocast_enabled("cpu")))
        z = F.linear(h, w, b)
        y = z if softcap is None else softcap * torch.tanh(z / softcap)
        return F.cross_entropy(y, t, reduction="none")
    return kernel


def test_kernel_gets_the_scale_folded_into_hidden_and_bias(monkeypatch):
    """Hand values (as in test_exact_ce): h = [1, 0], W rows [0, 0], [ln 3, 0], scale 2: y = [0, ln 9],
    CE(token 1) = ln(10/9). The kernel must see s h = [2, 0] (and s b) and no scale."""
    calls: list = []
    monkeypatch.setattr(fused_ce, "fused_backend", lambda *_: "liger")
    monkeypatch.setitem(fused_ce.KERNELS, "liger", fake_kernel(calls))
    h = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    out = head_cross_entropy(h, w, torch.tensor([1]), logit_map=LogitMap(scale=2.0))
    torch.testing.assert_close(out, torch.tensor([math.log(10 / 9)]))
    assert calls[0][0].tolist() == [[2.0, 0.0]] and calls[0][1] is None and calls[0][2] is None


def test_folded_scale_bias_and_cap_equal_the_chunked_path_with_gradients(monkeypatch):
    """Scale 1.3, soft cap 0.7 and a bias through the (fake) kernel = `linear_cross_entropy`, values and the
    gradients of hidden, weight and bias (fp32: only the order of operations differs), and the kernel runs
    with autocast off."""
    calls: list = []
    monkeypatch.setattr(fused_ce, "fused_backend", lambda *_: "liger")
    monkeypatch.setitem(fused_ce.KERNELS, "liger", fake_kernel(calls))
    torch.manual_seed(0)
    h, w, b = (torch.randn(*s, requires_grad=True) for s in [(7, 5), (11, 5), (11,)])
    t, g = torch.randint(0, 11, (7,)), torch.randn(7)
    m = LogitMap(scale=1.3, softcap=0.7)
    (linear_cross_entropy(h, w, t, 2, b, m) * g).sum().backward()
    want = [x.grad.clone() for x in (h, w, b)]
    h.grad = w.grad = b.grad = None
    (head_cross_entropy(h, w, t, 2, b, m) * g).sum().backward()
    for got, exp in zip((h.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got, exp)
    assert calls[0][2] == 0.7 and calls[0][3] is False


def test_no_rows_stays_on_the_chunked_path(monkeypatch):
    """Zero loss tokens in a batch: no kernel call (the chunked path returns an empty, differentiable CE)."""
    monkeypatch.setattr(fused_ce, "fused_backend", lambda *_: "liger")
    monkeypatch.setitem(fused_ce.KERNELS, "liger", lambda *a: pytest.fail("kernel called on no rows"))
    h = torch.zeros(0, 4, requires_grad=True)
    out = head_cross_entropy(h, torch.randn(6, 4), torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,) and out.requires_grad


# ---------------------------------------------------------------------------------------------- on a GPU


def installed_kernels() -> list[str]:
    return [k for k, dist in (("liger", "liger-kernel"), ("cce", "cut-cross-entropy"))
            if fused_ce.installed_version(dist) is not None]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["liger", "cce"])
@pytest.mark.parametrize("logit_map, with_bias", [(LogitMap(), False), (LogitMap(scale=3.0), True),
                                                  (LogitMap(softcap=0.5), False)])
def test_cuda_kernel_equals_cross_entropy_over_logits(monkeypatch, backend, logit_map, with_bias):
    """Each installed kernel in fp32 on the GPU: values within 1e-5 nats and gradients as in
    test_exact_ce (same reasoning: fp32, only the order of sums differs) of F.cross_entropy over the logits."""
    if backend == "cce" and with_bias:
        pytest.skip("cut cross-entropy takes no bias (fused_backend never picks it for one)")
    if backend == "cce":
        pytest.skip("cut cross-entropy's backward refuses fp32 inputs (fused_backend picks it for bf16/fp16 only)")
    if backend not in installed_kernels():
        pytest.skip(f"{backend} is not installed (pip install 'tokenforget[{'cuda' if backend == 'liger' else 'cce'}]')")
    monkeypatch.setattr(fused_ce, "fused_backend", lambda *_: backend)
    torch.manual_seed(0)
    n, hid, vocab = 37, 64, 1000
    h = torch.randn(n, hid, device="cuda", requires_grad=True)
    w = (0.2 * torch.randn(vocab, hid, device="cuda")).requires_grad_()
    b = torch.randn(vocab, device="cuda", requires_grad=True) if with_bias else None
    t = torch.randint(0, vocab, (n,), device="cuda")
    g = torch.linspace(-1.0, 1.5, n, device="cuda")  # per-token weights of both signs, as the forget loss has
    params = [x for x in (h, w, b) if x is not None]
    want = F.cross_entropy(logit_map(F.linear(h, w, b)), t, reduction="none")
    want_grads = torch.autograd.grad((want * g).sum(), params)
    ours = head_cross_entropy(h, w, t, bias=b, logit_map=logit_map)
    grads = torch.autograd.grad((ours * g).sum(), params)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-5 * float(exp.abs().max()))
