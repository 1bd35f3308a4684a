"""ForgettingTrainer: batch-split invariance, equality with a plain Trainer for `sft`, lambda logging."""

from __future__ import annotations

import datasets
import pytest
import torch
from conftest import CLS, IDS, GradCapture, first_step_grads, toy_dataset, weighted_dataset
from transformers import AutoModelForCausalLM, Trainer

from tokenforget.config import ObjectiveConfig, TrainingConfig
from tokenforget.model.batching import pad_batch
from tokenforget.model.head_ce import token_cross_entropy
from tokenforget.training.objectives import forgetting_loss
from tokenforget.training.trainer import TokenClassCollator, make_trainer, training_arguments


def test_same_gradient_for_one_batch_of_4_and_two_micro_batches_of_2(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Means over the whole optimizer batch: splitting it into micro-batches must not change the gradient.
    Both runs are also checked against a direct full-batch backward of forgetting_loss with lambda = 0.2."""
    g4 = first_step_grads(tiny_model_dir, tmp_path, 4, 1, tiny_tokenizer)
    g22 = first_step_grads(tiny_model_dir, tmp_path, 2, 2, tiny_tokenizer)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids, mask = pad_batch(IDS, tiny_tokenizer.pad_token_id)
    cls, _ = pad_batch(CLS, 0)
    loss = forgetting_loss(token_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, ids), cls, 0.2).loss
    loss.backward()
    direct = {n: p.grad for n, p in model.named_parameters()}

    assert set(g4) == set(g22) and len(g4) > 0
    for name in g4:
        # fp32 sums taken in a different order (4 rows at once vs 2 + 2): agreement to ~1e-6 absolute.
        torch.testing.assert_close(g4[name], g22[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g4[name], direct[name], rtol=1e-4, atol=1e-6)


class LabelCollator:
    """Plain SFT batches: labels are the ids with -100 wherever the class is 0."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, feats):
        ids, mask = pad_batch([f["input_ids"] for f in feats], self.pad_id)
        cls, _ = pad_batch([f["token_class"] for f in feats], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(cls == 0, -100)}


def test_sft_mode_equals_a_plain_trainer_run(tiny_model_dir, tiny_tokenizer, tmp_path):
    """3 optimizer steps of batch 2 x 2 accumulation: our `sft` objective and transformers' own loss
    (labels passed to the forward) give the same logged losses and the same final weights."""
    data = datasets.Dataset.from_dict({"input_ids": IDS * 3, "token_class": CLS * 3})
    # Plain SGD, not AdamW: Adam divides by sqrt(v), so fp32 rounding in a gradient element near zero becomes an
    # update of up to lr, and the two loss paths' different (equally right) summation orders then moved one weight
    # by 2e-6 after 3 steps on an Intel AVX512 CPU. SGD keeps the update at lr x the gradient's rounding.
    cfg = TrainingConfig(learning_rate=1e-2, batch_size=2, grad_accum=2, max_steps=3, warmup_ratio=0.0, logging_steps=1,
                         training_args={"optim": "sgd"})

    ours_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ours = make_trainer(ours_model, tiny_tokenizer, data, training_arguments(cfg, tmp_path / "ours", 0, False), ObjectiveConfig(mode="sft"))
    ours.train()

    plain_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = training_arguments(cfg, tmp_path / "plain", 0, False)
    plain = Trainer(model=plain_model, args=args, train_dataset=data, data_collator=LabelCollator(tiny_tokenizer.pad_token_id))
    plain.train()

    loss = lambda t: [h["loss"] for h in t.state.log_history if "loss" in h]  # noqa: E731
    assert len(loss(ours)) == 3
    # fp32, same order of operations up to the loss reduction: 1e-5 relative covers summation order.
    assert loss(ours) == pytest.approx(loss(plain), rel=1e-5)
    for (n, a), (_, b) in zip(ours_model.named_parameters(), plain_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    moved = max((a - b).abs().max().item() for a, b in zip(ours_model.parameters(), start.parameters()))
    assert moved > 1e-3  # the weights did move: equal final weights are not equal initial ones


def test_lambda_is_logged_per_step(tiny_model_dir, tiny_tokenizer, tmp_path):
    """Linear schedule, T = 4 steps, t_min 0, t_max 0.2: lambda(t) = 0.05 t, so steps t = 0..3 use
    0, 0.05, 0.1, 0.15, and each step's log reports the lambda that step used.
    Counts from CLS by hand: positives 3 + 1 + 3 + 1 = 8, negatives 1 + 2 + 1 + 1 = 5 per step (one batch)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    cfg = TrainingConfig(batch_size=4, max_steps=4, warmup_ratio=0.0, logging_steps=1)
    t = make_trainer(model, tiny_tokenizer, toy_dataset(), training_arguments(cfg, tmp_path, 0, False), ObjectiveConfig(t_max=0.2))
    t.train()
    logged = [h for h in t.state.log_history if "lambda" in h]
    assert [h["lambda"] for h in logged] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert all(h["n_pos"] == 8 and h["n_neg"] == 5 for h in logged)


def test_collator_pads_classes_with_zero():
    out = TokenClassCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "token_class": [0, 1, -1]}, {"input_ids": [4], "token_class": [0]}])
    assert out["token_class"].tolist() == [[0, 1, -1], [0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_packed_batches_give_the_padded_loss_and_gradient(tiny_model_dir, tiny_tokenizer, tmp_path):
    """One step on the 4 toy examples, padded (batch 4) vs packed into one row of 20 tokens with restarting
    position_ids: same loss and same gradients, so the classes stayed aligned and attention stayed inside
    each example (fp32; 1e-5 covers the different matmul shapes)."""
    grads, losses = {}, {}
    for packing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        cfg = TrainingConfig(batch_size=4, max_steps=1, warmup_ratio=0.0, max_grad_norm=0.0, logging_steps=1, packing=packing)
        args = training_arguments(cfg, tmp_path / str(packing), seed=0, bf16=False, disable_tqdm=True)
        trainer = make_trainer(model, tiny_tokenizer, toy_dataset(), args, ObjectiveConfig(t_min=0.2, t_max=0.2), packing=packing)
        cap = GradCapture(model)
        trainer.add_callback(cap)
        trainer.train()
        grads[packing], losses[packing] = cap.grads, trainer.state.log_history[0]["loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-4, atol=1e-5)


def test_soft_weights_and_tnpo_keep_batch_split_invariance(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The per-token columns travel through the collator with their tokens: with `token_weight` and `ce_base`
    on every example and the `tnpo` term, one batch of 4 and 2 micro-batches of 2 give the same gradient,
    which is also a direct full-batch backward of forgetting_loss(weight, ce_base, tnpo, beta 2)."""
    data, weights, ce_base = weighted_dataset()
    kw = dict(data=data, forget_term="tnpo", beta=2.0)
    grads = {bs: first_step_grads(tiny_model_dir, tmp_path, bs, 4 // bs, tiny_tokenizer, **kw) for bs in (4, 2)}

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids, mask = pad_batch(IDS, tiny_tokenizer.pad_token_id)
    cls, _ = pad_batch(CLS, 0)
    pad = lambda rows: torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r in rows], batch_first=True)  # noqa: E731
    ce = token_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, ids)
    forgetting_loss(ce, cls, 0.2, weight=pad(weights), ce_base=pad(ce_base), forget_term="tnpo", beta=2.0).loss.backward()
    for name, g in grads[4].items():
        torch.testing.assert_close(grads[2][name], g, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g, dict(model.named_parameters())[name].grad, rtol=1e-4, atol=1e-6)


def test_trusted_answers_follow_the_training_set_learned_whole():
    """`train.trusted_path`: its answers after the training set's, every response token a learn token with weight 1,
    and only the columns the trainer reads kept (worked by hand)."""
    from tokenforget.stages.train import with_trusted

    examples = datasets.Dataset.from_dict({
        "input_ids": [[1, 2, 3], [4, 5]], "token_class": [[0, 1, -1], [0, 1]],
        "token_weight": [[1.0, 1.0, 0.5], [1.0, 1.0]], "example": [0, 1], "response_mask": [[0, 1, 1], [0, 1]]})
    trusted = datasets.Dataset.from_dict({"input_ids": [[7, 8, 9, 6]], "token_class": [[0, 0, 1, 1]],
                                          "response_mask": [[0, 0, 1, 1]], "example": [0]})
    got = with_trusted(examples, trusted)
    assert got.column_names == ["input_ids", "token_class", "token_weight"]
    assert got["input_ids"] == [[1, 2, 3], [4, 5], [7, 8, 9, 6]]
    assert got["token_class"] == [[0, 1, -1], [0, 1], [0, 0, 1, 1]]
    assert got["token_weight"] == [[1.0, 1.0, 0.5], [1.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    assert with_trusted(examples, None) is examples

