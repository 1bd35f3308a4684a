"""ForgettingSFTTrainer (TRL): the same loss and gradient as ForgettingTrainer; classes aligned through
TRL's truncation, packing and padding-free batches; the README snippet runs."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("trl", reason="TRL is the optional extra tokenforget[trl]: pip install -e '.[trl]'")
from conftest import (  # noqa: E402
    CLS,
    IDS,
    GradCapture,
    first_step_grads,
    readme_block,  # noqa: E402
    toy_dataset,
    weighted_dataset,
)
from trl import SFTConfig  # noqa: E402

from tokenforget.cli import main  # noqa: E402
from tokenforget.config import ObjectiveConfig  # noqa: E402
from tokenforget.model.head_ce import token_cross_entropy  # noqa: E402
from tokenforget.training.objectives import forgetting_loss  # noqa: E402
from tokenforget.training.trl import ForgettingSFTTrainer  # noqa: E402


def sft_config(out: Path, **kw) -> SFTConfig:
    """fp32 on CPU, no clipping, no warm-up: one step's gradient is the objective's gradient."""
    base = dict(output_dir=str(out), bf16=False, use_cpu=True, gradient_checkpointing=False, report_to="none",
                learning_rate=1e-3, warmup_steps=0, max_grad_norm=0.0, logging_steps=1, seed=0, disable_tqdm=True)
    return SFTConfig(**{**base, **kw})


def trl_trainer(model_dir, tokenizer, args: SFTConfig, data=None, forget_term: str = "ga", beta: float = 1.0,
                **kw) -> ForgettingSFTTrainer:
    """`forget` at a constant lambda 0.2 (`forget_term`, `beta`: its term for negative tokens); `kw` to the trainer."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    objective = ObjectiveConfig(schedule="constant", t_max=0.2, forget_term=forget_term, beta=beta)
    return ForgettingSFTTrainer(model=model, args=args, train_dataset=data or toy_dataset(), processing_class=tokenizer,
                                objective=objective, **kw)


def test_trl_step_has_our_loss_and_gradient(tiny_model_dir, tiny_tokenizer, tmp_path):
    """One optimizer step, 2 micro-batches x 2 accumulation under TRL, against one batch of 4 under our
    ForgettingTrainer (itself checked against a direct backward in test_train). lambda = 0.2 throughout.
    Loss by hand from the classes: 8 positive, 5 negative tokens in the step, so the logged loss is
    sum(CE+)/8 - 0.2 sum(CE-)/5; both trainers must log that same number."""
    ours = first_step_grads(tiny_model_dir, tmp_path, 4, 1, tiny_tokenizer)

    trainer = trl_trainer(tiny_model_dir, tiny_tokenizer,
                          sft_config(tmp_path / "trl", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1))
    cap = GradCapture(trainer.model)
    trainer.add_callback(cap)
    trainer.train()

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    from tokenforget.model.batching import pad_batch

    ids, mask = pad_batch(IDS, tiny_tokenizer.pad_token_id)
    cls, _ = pad_batch(CLS, 0)
    ce = token_cross_entropy(model(input_ids=ids, attention_mask=mask).logits, ids)
    by_hand = (ce[cls == 1].sum() / 8 - 0.2 * ce[cls == -1].sum() / 5).item()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert (logged["n_pos"], logged["n_neg"], logged["lambda"]) == (8, 5, 0.2)
    # TRL's fused head takes log-softmax in chunks, ours in one piece: fp32 sums in another order, ~1e-7 relative.
    assert logged["loss"] == pytest.approx(by_hand, rel=1e-5)
    assert set(cap.grads) == set(ours) and len(ours) > 0
    for name in ours:
        # same bound as the batch-split test: fp32 reductions in a different order
        torch.testing.assert_close(cap.grads[name], ours[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("packing", [False, True])
def test_trl_carries_token_weights_and_base_ce(tiny_model_dir, tiny_tokenizer, tmp_path, packing):
    """`token_weight` and `ce_base` go through TRL's truncation or packing with their tokens: with `tnpo` (beta 2)
    and soft weights, TRL's 2 x 2 step (padded or packed) has the gradient of our trainer's batch of 4."""
    data, _, _ = weighted_dataset()
    ours = first_step_grads(tiny_model_dir, tmp_path, 4, 1, tiny_tokenizer, data=data, forget_term="tnpo", beta=2.0)
    args = sft_config(tmp_path / "trl", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                      packing=packing, max_length=64, padding_free=packing)
    trainer = trl_trainer(tiny_model_dir, tiny_tokenizer, args, data=data, forget_term="tnpo", beta=2.0)
    cap = GradCapture(trainer.model)
    trainer.add_callback(cap)
    trainer.train()
    # packing changes which examples share a micro-batch, not the optimizer batch: the same gradient either way
    assert {"token_weight", "ce_base"} <= set(trainer.train_dataset.column_names)
    for name in ours:
        torch.testing.assert_close(cap.grads[name], ours[name], rtol=1e-4, atol=1e-6)


def segments(row: dict) -> list[tuple[list[int], list[int]]]:
    """(input_ids, token_class) of each sequence packed into one row, split by `seq_lengths`."""
    out, start = [], 0
    for n in row["seq_lengths"]:
        out.append((row["input_ids"][start : start + n], row["token_class"][start : start + n]))
        start += n
    return out


def test_bfd_packing_keeps_each_sequence_with_its_classes(tiny_model_dir, tiny_tokenizer, tmp_path):
    """max_length 8: BFD packs [11..18] (7) alone, [5..9] (6) alone, [7..32] (4) with [40..43] (3), and
    each packed sequence still carries exactly its own classes."""
    trainer = trl_trainer(tiny_model_dir, tiny_tokenizer, sft_config(tmp_path, packing=True, max_length=8, max_steps=1))
    packed = [seg for row in trainer.train_dataset for seg in segments(row)]
    assert sorted(map(str, packed)) == sorted(map(str, zip(IDS, CLS)))
    assert sorted(len(row["input_ids"]) for row in trainer.train_dataset) == [6, 7, 7]


def test_padding_free_batch_loss_is_the_objective_on_the_packed_tokens(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A padding-free batch is one row of concatenated sequences with position ids restarting at 0. The
    loss TRL's path computes on it equals forgetting_loss over the model's own logits for that row, with
    the original classes concatenated (each sequence's first token has class 0 already)."""
    trainer = trl_trainer(tiny_model_dir, tiny_tokenizer,
                          sft_config(tmp_path, packing=True, max_length=8, per_device_train_batch_size=3, max_steps=1))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    by_ids = {tuple(i): c for i, c in zip(IDS, CLS)}
    expected = torch.tensor([c for seq in packed_sequences(batch) for c in by_ids[tuple(seq)]])[None]
    assert torch.equal(batch["token_class"], expected)

    model = trainer.model
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        direct = forgetting_loss(token_cross_entropy(logits, batch["input_ids"]), expected, 0.2).loss
        ours = trainer.compute_loss(model, dict(batch))
    torch.testing.assert_close(ours, direct, rtol=1e-5, atol=1e-6)  # chunked vs whole log-softmax, fp32


def packed_sequences(batch: dict) -> list[list[int]]:
    """The token ids of each sequence in a padding-free row, split where the position ids restart at 0."""
    pos, ids = batch["position_ids"][0].tolist(), batch["input_ids"][0].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return [ids[a:b] for a, b in zip(starts, starts[1:])]


def test_split_sequences_lose_the_class_of_their_unpredicted_first_token(tiny_model_dir, tiny_tokenizer, tmp_path):
    """bfd_split at max_length 4 cuts [5 17 23 42 | 8 9] and [11 12 13 14 | 15 16 18]; the second pieces
    start at position 0, which TRL never predicts (label -100), so their first classes (+1, +1) become 0.
    Counts by hand: of 8 positive and 5 negative tokens, 6 positive and 5 negative remain."""
    args = sft_config(tmp_path, packing=True, packing_strategy="bfd_split", max_length=4, per_device_train_batch_size=8, max_steps=1)
    trainer = trl_trainer(tiny_model_dir, tiny_tokenizer, args)
    trainer.train()
    logged = next(h for h in trainer.state.log_history if "loss" in h)
    assert (logged["n_pos"], logged["n_neg"]) == (6, 5)


def test_truncation_cuts_classes_with_the_ids(tiny_model_dir, tiny_tokenizer, tmp_path):
    """max_length 5, keep_start: every row keeps its first 5 ids and their 5 classes."""
    trainer = trl_trainer(tiny_model_dir, tiny_tokenizer, sft_config(tmp_path, max_length=5, max_steps=1))
    rows = {tuple(r["input_ids"]): r["token_class"] for r in trainer.train_dataset}
    assert rows == {tuple(i[:5]): c[:5] for i, c in zip(IDS, CLS)}


def test_eval_set_without_classes_is_plain_nll(tiny_model_dir, tiny_tokenizer, tmp_path):
    """A held-out set of raw token ids (no classes): TRL trains on every token, so every token is a learn
    token and eval_loss is the model's own mean NLL (transformers' loss with labels = ids), one batch of 2."""
    held_out = datasets.Dataset.from_dict({"input_ids": [[5, 17, 23, 42], [7, 30, 31, 32]]})
    trainer = trl_trainer(tiny_model_dir, tiny_tokenizer, sft_config(tmp_path, per_device_eval_batch_size=2, max_steps=1),
                          eval_dataset=held_out)
    got = trainer.evaluate()["eval_loss"]
    ids = torch.tensor(held_out["input_ids"])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(input_ids=ids, labels=ids).loss
    assert got == pytest.approx(want.item(), rel=1e-5)  # fp32, chunked vs whole log-softmax


def test_a_training_set_without_classes_is_refused(tiny_model_dir, tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="no 'token_class' column"):
        trl_trainer(tiny_model_dir, tiny_tokenizer, sft_config(tmp_path, max_steps=1),
                    data=datasets.Dataset.from_dict({"input_ids": IDS}))
    with pytest.raises(ValueError, match="loss_type"):
        trl_trainer(tiny_model_dir, tiny_tokenizer, sft_config(tmp_path, max_steps=1, loss_type="dft"))


def test_readme_trl_snippet_runs(config, tiny_model_dir, tmp_path, monkeypatch):
    """The README's two steps, in a fresh folder: `tokenforget partition` writes runs/my-run/labels, then
    the Python snippet trains on it with only the model name swapped for the tiny model. SFTConfig's
    defaults: 3 epochs of batches of 8 over the labelled examples; lambda at step t is 0.25 t / T."""
    monkeypatch.chdir(tmp_path)
    assert main(["partition", str(config), "--run_dir", "runs/my-run"]) == 0
    n = datasets.Dataset.from_parquet("runs/my-run/labels/labels.parquet").num_rows
    code = readme_block("ForgettingSFTTrainer(").replace("HuggingFaceTB/SmolLM2-135M-Instruct", str(tiny_model_dir))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    trainer = scope["trainer"]
    steps = 3 * -(-n // 8)
    assert trainer.state.global_step == steps
    assert trainer._last_lambda == pytest.approx(0.25 * (steps - 1) / steps)


WEIGHTED_RECORDS = [  # message weights, spans (one splitting ' 12', see tests/test_labels_in_data.py) and a fraction
    {"messages": [{"role": "user", "content": "Mia has 12 apples."},
                  {"role": "assistant", "content": "She buys 3 * 4 = 12 apples.", "spans": [{"start": 17, "end": 18, "weight": -1}]}]},
    {"messages": [{"role": "user", "content": "How many?"}, {"role": "assistant", "content": "The answer is 24.", "weight": 0},
                  {"role": "user", "content": "Again"}, {"role": "assistant", "content": "The answer is 24.", "weight": 1}]},
    {"messages": [{"role": "user", "content": "The change?"}, {"role": "assistant", "content": "40 - 35 = 5 dollars.", "weight": 0.5}]},
    {"messages": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "The answer is 24.", "weight": -1}]},
]


def test_trl_reads_message_weights_as_forgetting_trainer_trains_them(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The records with their weights straight into ForgettingSFTTrainer (2 x 2) and, through tokenforget's data
    stage and `partition.selection: data`, into ForgettingTrainer (one batch of 4): the same token classes and
    |weights| per token, and the same first-step gradient."""
    import numpy as np

    from conftest import write_jsonl
    from tokenforget.config import DataConfig
    from tokenforget.stages.data import load_records, tokenize_records
    from tokenforget.stages.partition import data_classes

    dc = DataConfig(path=str(write_jsonl(tmp_path / "w.jsonl", WEIGHTED_RECORDS)))
    cols, _ = tokenize_records(tiny_tokenizer, load_records(dc), dc)
    per = [data_classes(np.asarray(w, np.float32), np.asarray(m)) for w, m in zip(cols["data_weight"], cols["response_mask"])]
    ours = datasets.Dataset.from_dict({"input_ids": cols["input_ids"], "token_class": [c.tolist() for c, _ in per],
                                       "token_weight": [(np.abs(c) if w is None else w).tolist() for c, w in per]})
    assert [c.tolist().count(-1) for c, _ in per] == [1, 0, 0, 6]  # ' 12'; the last answer and its <|im_end|>
    grads = first_step_grads(tiny_model_dir, tmp_path, 4, 1, tiny_tokenizer, data=ours)
    args = sft_config(tmp_path / "trl", per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1)
    trainer = trl_trainer(tiny_model_dir, tiny_tokenizer, args, data=datasets.Dataset.from_list(WEIGHTED_RECORDS))
    assert trainer.train_dataset["input_ids"] == ours["input_ids"]
    assert trainer.train_dataset["token_class"] == ours["token_class"]
    assert np.allclose(np.concatenate(trainer.train_dataset["token_weight"]), np.concatenate(ours["token_weight"]))
    cap = GradCapture(trainer.model)
    trainer.add_callback(cap)
    trainer.train()
    for name in grads:
        torch.testing.assert_close(cap.grads[name], grads[name], rtol=1e-4, atol=1e-6)  # as above: fp32 sum order
