"""Score: per-token CE under the base and the reference model; score = CE_base - CE_ref.

With a LoRA reference the base is the same model with the adapter switched off, so one model sits in
memory and both losses come from one pass over the data. Batches are grouped by length to keep padding low.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenforget.losses import linear_cross_entropy, token_cross_entropy
from tokenforget.models import autocast

CE_CHUNK = 1024  # rows of fp32 logits alive at a time: 1024 x 49k vocab = 200 MB


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length (longest first), so little of each batch is padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_batch(seqs: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) tensor of `seqs` and its (B, T) attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    return ids, mask


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / peft wrappers."""
    while hasattr(model, "module"):  # DDP, FSDP
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def final_hidden_states(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the decoder's output (B, T, H), the input of the lm_head, during a forward of `model`."""
    box: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _args: Any, out: Any) -> None:
        box["hidden"] = out[0] if isinstance(out, tuple) else out.last_hidden_state

    handle = _unwrap(model).get_decoder().register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def supports_hidden_ce(model: torch.nn.Module) -> bool:
    """Whether `model_token_ce` can read final hidden states (decoder + output embeddings exposed)."""
    inner = _unwrap(model)
    return hasattr(inner, "get_decoder") and inner.get_output_embeddings() is not None


def model_token_ce(
    model: torch.nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor,
    chunk_size: int = CE_CHUNK,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """(B, T) fp32 CE of the tokens at `positions` (0 elsewhere), without full-vocabulary logits.

    The model runs with `logits_to_keep=1`; the final hidden states of the positions that predict the
    wanted tokens go through `linear_cross_entropy` chunk by chunk. Only wanted positions cost lm_head
    work, so prompt and padding tokens are free. Differentiable (training) and usable under no_grad.

    Args:
        ids: (B, T) token ids; `forward_kwargs` carry attention_mask (padded) or position_ids (packed).
        positions: (B, T) bool, which tokens to score; position 0 is never scored.
    """
    with final_hidden_states(model) as box:
        model(input_ids=ids, use_cache=False, logits_to_keep=1, **forward_kwargs)
    want = positions.bool().clone()
    want[:, 0] = False
    b, t = want.nonzero(as_tuple=True)
    hidden = box["hidden"][b, t - 1]  # (N, H): the state before token t predicts token t
    weight = _unwrap(model).get_output_embeddings().weight  # (V, H)
    ce = linear_cross_entropy(hidden, weight, ids[b, t], chunk_size)  # (N,)
    return ce.new_zeros(ids.shape).index_put((b, t), ce)


@torch.no_grad()
def forward_ce(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, bf16: bool, positions: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(B, T) per-token CE of a right-padded batch under `model`: of every token, or of `positions` only."""
    with autocast(bf16):
        if supports_hidden_ce(model):
            return model_token_ce(model, ids, mask if positions is None else positions, attention_mask=mask)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
    ce = token_cross_entropy(logits, ids)
    return ce if positions is None else ce * positions


def _adapter_off(model: torch.nn.Module):
    """Context manager that runs a peft model as its base model."""
    return model.disable_adapter()


def score_tokens(
    reference: torch.nn.Module,
    input_ids: Sequence[Sequence[int]],
    batch_size: int,
    bf16: bool,
    base: Optional[torch.nn.Module] = None,
    pad_id: int = 0,
    masks: Optional[Sequence[Sequence[int]]] = None,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-token CE of every sequence under the base and the reference model.

    Args:
        reference: the reference model; a peft model doubles as the base with its adapter off.
        input_ids: token ids per example.
        base: a separate base model (for a fully fine-tuned reference); None when `reference` is peft.
        masks: per-example 0/1 masks of the tokens to score (response tokens); others get 0. Default: all.

    Returns:
        (ce_base, ce_ref): one fp32 array per example, length = its token count, entry 0 = 0.
    """
    dev = next(reference.parameters()).device
    ce_base: list[np.ndarray] = [np.empty(0, np.float32)] * len(input_ids)
    ce_ref: list[np.ndarray] = [np.empty(0, np.float32)] * len(input_ids)
    reference.eval()
    if base is not None:
        base.eval()
    for batch in tqdm(length_grouped_batches([len(s) for s in input_ids], batch_size), desc="score", unit="batch"):
        ids, mask = pad_batch([input_ids[i] for i in batch], pad_id)
        ids, mask = ids.to(dev), mask.to(dev)
        want = mask if masks is None else pad_batch([masks[i] for i in batch], 0)[0].to(dev)
        if base is None:
            with _adapter_off(reference):
                b = forward_ce(reference, ids, mask, bf16, want)
        else:
            b = forward_ce(base, ids, mask, bf16, want)
        r = forward_ce(reference, ids, mask, bf16, want)
        for row, i in enumerate(batch):
            n = len(input_ids[i])
            ce_base[i] = b[row, :n].cpu().numpy().astype(np.float32)
            ce_ref[i] = r[row, :n].cpu().numpy().astype(np.float32)
    return ce_base, ce_ref
