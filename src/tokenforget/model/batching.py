"""Batches for a forward pass without training: examples grouped by length, right-padded, and their per-token CE.

Scoring, evaluation and the dry run's probe all read per-token CE this way.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tokenforget.model.loading import autocast
from tokenforget.model.model_ce import model_token_ce


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
