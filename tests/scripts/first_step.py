"""One ForgettingTrainer optimizer step on a fixed toy batch; rank 0 saves the loss and gradients.

Run alone (global batch 4 on one process) or under `torchrun --nproc_per_node 2` (2 per rank); under
`accelerate launch` with a DeepSpeed config the gradients are read from the engine (`safe_get_full_grad`) just
before its step, since accelerate's backward steps the engine at once and ZeRO keeps no `.grad`.
Usage: python first_step.py MODEL_DIR OUT_FILE PER_DEVICE_BATCH
"""

import os
import sys
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from tokenforget.config import ModelConfig, ObjectiveConfig, TrainingConfig
from tokenforget.model.loading import load_tokenizer
from tokenforget.training.trainer import make_trainer, training_arguments

IDS = [[5, 17, 23, 42, 8, 9], [7, 30, 31, 32], [11, 12, 13, 14, 15, 16, 18], [40, 41, 43]]
CLS = [[0, 0, 1, -1, 1, 1], [0, 1, -1, -1], [0, 0, 0, 1, 1, -1, 1], [0, -1, 1]]


class Capture(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}


def capture_deepspeed(cap: "Capture") -> None:
    """Make the first optimizer step of a DeepSpeed engine save every trained parameter's whole gradient first."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad

    step = DeepSpeedEngine.step

    def stepped(engine, *args, **kwargs):
        if cap.grads is None and engine.is_gradient_accumulation_boundary():
            cap.grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()
                         if p.requires_grad}
        return step(engine, *args, **kwargs)

    DeepSpeedEngine.step = stepped


def main(model_dir: str, out: str, per_device: int) -> None:
    tok = load_tokenizer(ModelConfig(name_or_path=model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = TrainingConfig(batch_size=per_device, max_steps=1, warmup_ratio=0.0, max_grad_norm=0.0, logging_steps=1)
    args = training_arguments(cfg, Path(out).parent / f"work-{per_device}", seed=0, bf16=False, disable_tqdm=True)
    data = datasets.Dataset.from_dict({"input_ids": IDS, "token_class": CLS})
    trainer = make_trainer(model, tok, data, args, ObjectiveConfig(t_min=0.2, t_max=0.2))
    cap = Capture(model)
    trainer.add_callback(cap)
    if trainer.is_deepspeed_enabled:
        capture_deepspeed(cap)
    trainer.train()
    if trainer.args.process_index == 0:
        loss = [h["loss"] for h in trainer.state.log_history if "loss" in h][0]
        torch.save({"loss": loss, "grads": cap.grads}, out)
    if torch.distributed.is_initialized():
        # Everything is saved and no collective is left: leave without tearing the gloo group down, which hung a
        # CI run for 300 s after this step had finished (pytorch#75097), and without the interpreter's exit, where
        # gloo's threads can abort a process whose group was not destroyed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
