"""Training knobs from the config: TrainingArguments and LoraConfig pass-through, an eval split,
gradient checkpointing, QLoRA's errors and its merge into a dense base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import GradCapture, toy_dataset, write_jsonl
from transformers import AutoModelForCausalLM

from tokenforget.cli import main
from tokenforget.config import (
    ConfigError,
    DataConfig,
    LoraSettings,
    ObjectiveConfig,
    RunConfig,
    TrainConfig,
    TrainingConfig,
)
from tokenforget.model.batching import forward_ce, pad_batch
from tokenforget.model.loading import add_lora, qlora_config
from tokenforget.stages.data import load_records, tokenize_records
from tokenforget.training.fit import save_model
from tokenforget.training.trainer import make_trainer, training_arguments


def test_training_args_pass_through_last(tmp_path):
    """A pass-through field lands unchanged; it also wins over our own default (report_to='none')."""
    cfg = TrainingConfig(training_args={"adam_beta2": 0.95, "report_to": ["tensorboard"], "save_strategy": "no"})
    args = training_arguments(cfg, tmp_path, seed=0, bf16=False)
    assert (args.adam_beta2, args.report_to, args.save_strategy) == (0.95, ["tensorboard"], "no")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TrainingConfig(training_args={"learning_rate": 1.0}), r"'training_args.learning_rate': set it with 'learning_rate'"),
        (lambda: TrainingConfig(training_args={"bf16": True}), r"'training_args.bf16': set it with 'model.precision'"),
        (lambda: TrainingConfig(training_args={"adam_beta3": 0.9}), r"'training_args.adam_beta3': not a field of TrainingArguments"),
        (lambda: LoraSettings(peft_args={"r": 4}), r"'lora.peft_args.r': set it with 'lora.r'"),
        (lambda: LoraSettings(peft_args={"rank": 4}), r"'lora.peft_args.rank': not a field of peft.LoraConfig"),
        (lambda: LoraSettings(enabled=False, qlora=True), r"'lora.qlora': a 4-bit base is trained with LoRA only"),
        (
            lambda: RunConfig(train=TrainConfig(training=TrainingConfig(training_args={"eval_strategy": "steps"}))),
            r"evaluation needs a held-out file: set train.eval_path",
        ),
    ],
)
def test_bad_knobs_are_config_errors_naming_the_field(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_the_readme_knobs_example_is_a_valid_config(tmp_path):
    """The README's YAML of knobs parses through the CLI's parser into a RunConfig with those values."""
    from conftest import readme_block

    from tokenforget.cli import parse_config

    (tmp_path / "knobs.yaml").write_text(readme_block("training_args:"))
    _, cfg, _ = parse_config(["run", "--config", str(tmp_path / "knobs.yaml")])
    assert cfg.lora.qlora and cfg.lora.peft_args == {"use_rslora": True} and cfg.train.training.gradient_checkpointing
    assert cfg.train.training.training_args["metric_for_best_model"] == "eval_loss"


def test_a_value_trainingarguments_rejects_stops_before_any_stage(config: Path, capsys):
    assert main(["run", str(config), "--train.training.training_args", '{"optim": "no_such_optimizer"}']) == 2
    assert "config field 'train.training.training_args'" in capsys.readouterr().err
    assert not (config.parent / "run").exists()


def test_peft_args_reach_the_lora_config(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"], peft_args={"use_rslora": True})
    peft_cfg = add_lora(model, lora).peft_config["default"]
    assert (peft_cfg.r, peft_cfg.use_rslora, set(peft_cfg.target_modules)) == (4, True, {"q_proj", "v_proj"})


def test_eval_split_and_pass_through_eval_fields_reach_the_trainer(config: Path, tmp_path: Path, tiny_tokenizer, tiny_model_dir):
    """`eval_on_start`, a field only the pass-through sets, makes the Trainer evaluate before step 1: that
    eval_loss must be the base model's mean NLL over the held-out response tokens (3 examples, one eval
    batch of 4), computed here by hand. Evaluation then runs after each of the 2 steps; the Trainer
    accepted load_best_model_at_end (it checks that save and eval steps match)."""
    held_out = write_jsonl(tmp_path / "held_out.jsonl", [
        {"prompt": "Mia has 12 apples. How many?", "completion": "The answer is 12."},
        {"prompt": "A shop sells pencils.", "completion": "She buys 3 * 4 = 12 apples."},
        {"prompt": "How many?", "completion": "24"},
    ])
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["eval_path"] = str(held_out)
    cfg["train"]["training"] = {**cfg["train"]["training"], "max_steps": 2, "save_steps": 1, "training_args": {
        "eval_strategy": "steps", "eval_steps": 1, "eval_on_start": True,
        "load_best_model_at_end": True, "metric_for_best_model": "eval_loss"}}  # a copy: the fixture's YAML shares it
    config.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(config), "--train.objective.mode", "sft"]) == 0
    stage = config.parent / "run" / "train-sft"
    evals = [h["eval_loss"] for h in json.loads((stage / "log_history.json").read_text()) if "eval_loss" in h]
    args = json.loads((stage / "training_args.json").read_text())
    assert (args["eval_on_start"], args["load_best_model_at_end"], args["eval_steps"]) == (True, True, 1)

    data_cfg = DataConfig(path=str(held_out), max_length=128)
    cols, _ = tokenize_records(tiny_tokenizer, load_records(data_cfg), data_cfg)
    ids, mask = pad_batch(cols["input_ids"], tiny_tokenizer.pad_token_id)
    resp, _ = pad_batch(cols["response_mask"], 0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    nll = forward_ce(base, ids, mask, bf16=False)[resp.bool()].mean().item()
    assert len(evals) == 3
    assert evals[0] == pytest.approx(nll, rel=1e-5)  # fp32; LoRA B starts at 0, so the adapter adds exactly 0


def test_gradient_checkpointing_gives_the_same_gradient(tiny_model_dir, tiny_tokenizer, tmp_path):
    """One LoRA step with and without checkpointing: recomputed activations are the same numbers, so the
    gradients agree to fp32 round-off, and the LoRA weights do get gradients (non-reentrant checkpointing)."""
    grads = {}
    for gc in (False, True):
        torch.manual_seed(0)
        model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), LoraSettings(r=4, alpha=8))
        cfg = TrainingConfig(batch_size=4, max_steps=1, warmup_ratio=0.0, max_grad_norm=0.0, gradient_checkpointing=gc)
        trainer = make_trainer(model, tiny_tokenizer, toy_dataset(), training_arguments(cfg, tmp_path / str(gc), 0, False), ObjectiveConfig(t_max=0.2))
        cap = GradCapture(model)
        trainer.add_callback(cap)
        trainer.train()
        assert model.base_model.model.is_gradient_checkpointing == gc
        grads[gc] = cap.grads
    assert grads[True].keys() == grads[False].keys() and all("lora_" in n for n in grads[True]) and len(grads[True]) > 0
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-5, atol=1e-7)


def test_qlora_without_a_gpu_stops_before_any_stage(config: Path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU; the CPU error does not apply")
    assert main(["run", str(config), "--lora.qlora", "true"]) == 2
    err = capsys.readouterr().err
    assert "lora.qlora" in err and "CUDA GPU" in err
    assert not (config.parent / "run").exists()


def test_qlora_recipe():
    q = qlora_config(bf16=True)
    assert (q.load_in_4bit, q.bnb_4bit_quant_type, q.bnb_4bit_use_double_quant, q.bnb_4bit_compute_dtype) == (
        True, "nf4", True, torch.bfloat16)


def test_merging_a_saved_adapter_into_a_dense_base_equals_merging_in_place(tiny_model_dir, tiny_tokenizer, tmp_path):
    """The QLoRA save path (adapter merged into a freshly loaded full-precision base), run on a dense model:
    it must give the weights that merging the trained model in place gives."""
    load = lambda: AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)  # noqa: E731
    torch.manual_seed(0)
    model = add_lora(load(), LoraSettings(r=4, alpha=8, peft_args={"init_lora_weights": False}))  # B != 0
    save_model(model, tiny_tokenizer, tmp_path / "dense", merged=True, dense_base=load)
    save_model(model, tiny_tokenizer, tmp_path / "inplace", merged=True)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "dense" / "model").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "inplace" / "model").state_dict()
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], load().state_dict()[k]) for k in a)  # the adapter changed something
    for k in a:
        torch.testing.assert_close(a[k], b[k])
