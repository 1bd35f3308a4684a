"""Score: per-token CE under the base and the reference model; score = CE_base - CE_ref.

With a LoRA reference the base is the same model with the adapter switched off, so one model sits in
memory and both losses come from one pass over the data. Batches are grouped by length to keep padding low.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenforget.model_ce import model_token_ce
from tokenforget.models import autocast


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


@torch.no_grad()
def forward_ce(
    model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, bf16: bool, positions: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """(B, T) per-token CE of a right-padded batch under `model`: of every token, or of `positions` only
    (0 elsewhere), equal to CE over the model's own logits (`model_token_ce` picks the way)."""
    with autocast(bf16):
        return model_token_ce(model, ids, mask if positions is None else positions, attention_mask=mask)


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
    progress: bool = True,
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
    batches = length_grouped_batches([len(s) for s in input_ids], batch_size)
    for batch in tqdm(batches, desc="score", unit="batch", disable=not progress):
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
