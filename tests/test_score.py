"""The scorer: per-token losses agree with the model's own loss; adapter off = base, on = reference."""

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from tokenforget.model.batching import length_grouped_batches
from tokenforget.stages.score import score_tokens

SEQS = [[5, 17, 23, 42, 8, 9, 10, 11], [7, 30, 31], [11, 12, 13, 14, 15], [40, 41, 43, 44]]


def model_loss(model, seq):
    ids = torch.tensor([seq])
    return model(input_ids=ids, labels=ids).loss.item()


def test_per_token_losses_average_to_the_models_own_loss(tiny_model_dir):
    """Scored in padded, length-grouped batches of 2; each sequence's mean over tokens 1..n-1 must equal
    transformers' loss on that sequence alone. fp32; 1e-5 covers padding-free vs padded summation."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ce_base, ce_ref = score_tokens(model, SEQS, batch_size=2, bf16=False, base=model, pad_id=0)
    for seq, ce in zip(SEQS, ce_base):
        assert ce.shape == (len(seq),) and ce[0] == 0.0
        assert abs(float(ce[1:].mean()) - model_loss(model, seq)) < 1e-5


def test_lora_reference_scores_base_with_adapter_off(tiny_model_dir):
    """One peft model: adapter off must give the base model's losses, adapter on the merged model's."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)  # before get_peft_model: lora_A's random init must not depend on the tests run before
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at 0; make the adapter change the model
    ce_base, ce_ref = score_tokens(peft, SEQS, batch_size=3, bf16=False, pad_id=0)
    merged = peft.merge_and_unload()
    for seq, b, r in zip(SEQS, ce_base, ce_ref):
        assert abs(float(b[1:].mean()) - model_loss(base, seq)) < 1e-5
        assert abs(float(r[1:].mean()) - model_loss(merged, seq)) < 1e-4  # merged weights round differently
        assert abs(float(r[1:].mean()) - float(b[1:].mean())) > 1e-3  # the adapter did change something


def test_a_pass_without_the_base_model_runs_half_the_forward_passes(tiny_model_dir):
    """`with_base=False` (score methods that read CE_ref only): the reference's CE exactly as in a full pass,
    CE_base NaN, and the adapter never switched off (the base model's forward passes are skipped)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    full_base, full_ref = score_tokens(peft, SEQS, batch_size=2, bf16=False, pad_id=0)
    switched_off = []
    real = peft.disable_adapter
    peft.disable_adapter = lambda: switched_off.append(1) or real()
    no_base, ref = score_tokens(peft, SEQS, batch_size=2, bf16=False, pad_id=0, with_base=False)
    assert switched_off == []
    for seq, b, r, fr in zip(SEQS, no_base, ref, full_ref):
        assert np.isnan(b).all() and b.shape == (len(seq),)
        assert np.array_equal(r, fr)
    score_tokens(peft, SEQS, batch_size=2, bf16=False, pad_id=0)
    assert len(switched_off) == 2  # the control: a full pass switches the adapter off once a batch (2 batches)


def test_length_grouping():
    """Lengths 3, 10, 4, 9 in batches of 2: longest first -> [10, 9], [4, 3]."""
    assert length_grouped_batches([3, 10, 4, 9], 2) == [[1, 3], [2, 0]]


def test_hidden_state_ce_equals_full_logits_ce_with_gradients(tiny_model_dir):
    """model_token_ce (no full logits, only chosen positions) vs token_cross_entropy of the full logits:
    same values at the chosen positions, 0 elsewhere, and the same parameter gradients (fp32)."""
    from tokenforget.model.batching import pad_batch
    from tokenforget.model.head_ce import token_cross_entropy
    from tokenforget.model.model_ce import model_token_ce

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids, mask = pad_batch(SEQS, 0)
    positions = mask.clone()
    positions[:, :3] = 0  # a "prompt" of 3 tokens
    full = token_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, ids) * positions
    full.sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ours = model_token_ce(model, ids, positions, chunk_size=3, attention_mask=mask)
    ours.sum().backward()
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6, msg=n)
