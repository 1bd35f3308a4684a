"""LoRA's CPU dropout (tokenforget.model.cpu_dropout): its rate, its scale and gradient by hand, its seed, the same
mask when gradient checkpointing recomputes a layer, and that add_lora puts it in place of peft's."""

from __future__ import annotations

import pytest
import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from tokenforget.config import LoraSettings
from tokenforget.model.cpu_dropout import CPUDropout, keep_mask, use_cpu_dropout
from tokenforget.model.loading import add_lora


def test_the_drop_rate_is_p_rounded_to_16_bits():
    """p = 0.1 drops 6554 / 65536 = 0.1000061 of the elements; over 4M elements the binomial sd is 0.00015."""
    torch.manual_seed(0)
    dropped = 1.0 - keep_mask(torch.Size([2048, 2048]), 0.1).float().mean().item()
    assert abs(dropped - 6554 / 65536) < 4 * 0.00015
    assert keep_mask(torch.Size([1000]), 0.0).all()


def test_kept_elements_are_scaled_by_1_over_1_minus_p_and_so_is_their_gradient():
    """x = 3 everywhere, p = 0.25: every output is 0 or 3 / 0.75 = 4, and d(sum y)/dx is 0 or 1 / 0.75 at the
    same places. Seed 1 keeps exactly 1,486 of the 2,048 elements (expected 1,536 ± 19.6, 2.5 sd low): the count
    of the documented recipe's 16-bit draws >= 16,384, redrawn here from the same seed."""
    torch.manual_seed(1)
    x = torch.full((64, 32), 3.0, requires_grad=True)
    y = CPUDropout(0.25).train()(x)
    kept = y != 0
    assert torch.equal(y[kept], torch.full_like(y[kept], 4.0))
    torch.manual_seed(1)
    seed = int(torch.randint(0, 2**62, (1,)))  # the one draw from torch's generator that seeds numpy's PCG64
    bits = np.frombuffer(np.random.Generator(np.random.PCG64(seed)).bytes(2 * 2048), dtype=np.uint16)
    assert torch.equal(kept, torch.from_numpy(bits >= 16384).view(64, 32))  # round(0.25 x 65536) = 16384
    assert int(kept.sum()) == 1486
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)


def test_the_mask_follows_torchs_seed():
    x = torch.ones(32, 32)
    drop = CPUDropout(0.5).train()
    torch.manual_seed(7)
    a = drop(x)
    torch.manual_seed(7)
    b = drop(x)
    c = drop(x)  # the generator moved on: another mask
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_eval_mode_and_p_0_are_the_identity():
    x = torch.randn(8, 8)
    assert torch.equal(CPUDropout(0.5).eval()(x), x)
    assert torch.equal(CPUDropout(0.0).train()(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        CPUDropout(1.0)


def test_gradient_checkpointing_recomputes_the_same_mask():
    """A linear after the dropout, checkpointed (non-reentrant, as the Trainer runs it) or not: the same gradients,
    which holds only if the recomputed forward draws the same mask."""
    lin = torch.nn.Linear(16, 4)
    drop = CPUDropout(0.3).train()
    x = torch.randn(10, 16)

    def grads(use_checkpoint: bool) -> torch.Tensor:
        lin.zero_grad()
        torch.manual_seed(3)
        f = lambda t: lin(drop(t))  # noqa: E731
        out = checkpoint(f, x, use_reentrant=False) if use_checkpoint else f(x)
        out.square().sum().backward()
        return lin.weight.grad.clone()

    assert torch.equal(grads(True), grads(False))


def test_add_lora_uses_it_for_every_adapted_linear(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=4, dropout=0.1))
    drops = [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict)
             for d in m.lora_dropout.values()]
    assert drops and all(isinstance(d, CPUDropout) and d.p == 0.1 for d in drops)
    assert use_cpu_dropout(model) == 0  # nothing left to replace
    plain = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraSettings(r=4, dropout=0.0))
    assert not any(isinstance(m, CPUDropout) for m in plain.modules())  # peft's Identity stays
