"""Tiny random causal LMs of many architectures, built in code (no downloads), for exactness tests.

Each is 2 layers, hidden 32, vocabulary 160, fp32, eager attention. What each architecture does between its
final hidden states and its logits is made to matter: the lm_head is re-initialised with std 0.2 so logits
are O(1) (at the default std 0.02 a soft cap of 0.5 would barely bend them), Phi's lm_head bias is random and
non-zero, Cohere's logit_scale is 3, Granite's logits_scaling 4 and the Gemma soft caps 0.5.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
import transformers

VOCAB = 160
LAYERS = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(LAYERS, num_key_value_heads=2)

# name -> (config class, its keyword arguments)
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", GQA),
    "qwen2": ("Qwen2Config", GQA),
    "mistral": ("MistralConfig", GQA),
    "gemma2": ("Gemma2Config", dict(GQA, head_dim=8, final_logit_softcapping=0.5)),
    "gemma3": ("Gemma3TextConfig", dict(GQA, head_dim=8, final_logit_softcapping=0.5, sliding_window=4)),
    "phi3": ("Phi3Config", GQA),
    "phi": ("PhiConfig", GQA),
    "gpt_neox": ("GPTNeoXConfig", dict(LAYERS, rotary_pct=0.5)),
    "gpt_neo": ("GPTNeoConfig", dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                     attention_types=[[["global", "local"], 1]], window_size=4,
                                     max_position_embeddings=64, bos_token_id=1, eos_token_id=2)),
    "cohere": ("CohereConfig", dict(GQA, logit_scale=3.0)),
    "granite": ("GraniteConfig", dict(GQA, logits_scaling=4.0)),
    "olmo2": ("Olmo2Config", GQA),
}
ARCHS = sorted(CONFIGS)


def build(name: str, seed: int = 0, vocab: int = VOCAB, **overrides: Any) -> transformers.PreTrainedModel:
    """The tiny `name` model in fp32, eval mode, with the lm_head (and Phi's bias) re-initialised as above;
    `vocab` and `overrides` (config fields) for a model that must fit a tokenizer and its data."""
    cls_name, kwargs = CONFIGS[name]
    config = getattr(transformers, cls_name)(**{**kwargs, "vocab_size": vocab, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    head = model.get_output_embeddings()
    with torch.no_grad():
        torch.nn.init.normal_(head.weight, std=0.2)
        if head.bias is not None:
            torch.nn.init.normal_(head.bias, std=1.0)
    return model.eval()


def with_unknown_transform(name: str = "llama") -> transformers.PreTrainedModel:
    """The tiny `name` model whose forward multiplies its logits by 1.5 on odd token ids: a subclass, so
    it still exposes `get_decoder` and `get_output_embeddings` like the real model."""
    base = build(name)
    cls: Callable = type(base)

    class Rescaled(cls):  # type: ignore[misc, valid-type]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            factor = 1.0 + 0.5 * (torch.arange(out.logits.shape[-1]) % 2)  # (V,)
            out.logits = out.logits * factor
            return out

    base.__class__ = Rescaled
    return base


# ---------------------------------------------------------------- one batch and the reference CE, shared by tests

SEQS = [[5, 17, 23, 42, 8, 9, 10, 11, 130, 99, 3, 150], [7, 30, 31, 60, 61, 62, 158], [11, 12, 13, 14, 15, 16]]
PROMPT = 3  # the first 3 tokens of each sequence are not scored


def batch(device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (3, 12) right-padded, attention mask (3, 12), positions (3, 12): real tokens after the prompt."""
    from tokenforget.model.batching import pad_batch

    ids, mask = pad_batch(SEQS, 0)
    positions = mask.clone()
    positions[:, :PROMPT] = 0
    return ids.to(device), mask.to(device), positions.bool().to(device)


def ce_of_logits(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T) F.cross_entropy of token t under logits (B, T, V) at t - 1; 0 off `positions`."""
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    return torch.where(positions, F.pad(ce, (1, 0)), 0.0)
