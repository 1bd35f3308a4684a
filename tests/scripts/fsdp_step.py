"""Per-token scores and the first step's gradients of a LoRA model, unsharded in one process or under FSDP2 full
shard (torch's `fully_shard` on every decoder layer, then the root: what accelerate's FSDP2 plugin applies with
TRANSFORMER_BASED_WRAP) in a gloo group of `torchrun --nproc_per_node 2`. Rank 0 saves them.

Each rank takes examples rank, rank + world, ... of one fixed batch; the forgetting loss is normalised by the token
counts of the whole batch and multiplied by the world size, because FSDP averages gradients over the ranks, so the
ranks' gradients average to the one-process gradient of the whole batch (what the Trainer does with
`num_items_in_batch`).
Usage: python fsdp_step.py OUT_FILE      (under torchrun: the same, sharded)
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: tiny_archs

from tiny_archs import batch, build  # noqa: E402
from tokenforget.config import LoraSettings  # noqa: E402
from tokenforget.training.objectives import TokenCounts, forgetting_loss  # noqa: E402
from tokenforget.model.model_ce import ce_path, model_token_ce  # noqa: E402
from tokenforget.model.loading import add_lora  # noqa: E402


def token_classes(positions: torch.Tensor) -> torch.Tensor:
    """(B, T): +1 on scored tokens, -1 on every third of them, 0 elsewhere."""
    cls = positions.long()
    cls[:, ::3] *= -1
    return cls


def gathered(x: torch.Tensor, world: int) -> torch.Tensor:
    """(B_r, T) of each rank (examples r, r + world, ...) -> (B, T) in example order."""
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    out = torch.empty(x.shape[0] * world, *x.shape[1:], dtype=x.dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


def main(out: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    model = add_lora(build("llama"), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # LoRA B starts at 0: give it values, so that the adapter changes the scores
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    ids, mask, positions = batch()  # 3 examples: pad to 4 with a copy of the first so each rank has 2
    ids, mask, positions = (torch.cat([t, t[:1]]) for t in (ids, mask, positions))
    cls = token_classes(positions)
    mine = slice(rank, None, world)
    model.eval()
    with torch.no_grad():
        scores = gathered(model_token_ce(model, ids[mine], positions[mine], attention_mask=mask[mine]), world)
    path_scoring = ce_path(model).kind
    model.train()
    path_training = ce_path(model).kind  # what model_token_ce takes next
    ce = model_token_ce(model, ids[mine], positions[mine], attention_mask=mask[mine])
    loss = forgetting_loss(ce, cls[mine], 0.2, counts=TokenCounts.of(cls)).loss * world
    loss.backward()
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731  DTensor -> whole tensor
    grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    total = loss.detach() / world
    if world > 1:
        dist.all_reduce(total)
    if rank == 0:
        torch.save({"scores": scores, "grads": grads, "loss": float(total), "paths": (path_scoring, path_training)}, out)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
