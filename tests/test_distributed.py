"""Beyond CPU DDP: FSDP2 picks the right per-token CE path and stays exact; QLoRA loads on each rank's own GPU;
`compare` keeps `qlora`; the user's `ddp_timeout` reaches the process group.

FSDP2 (`fully_shard`) runs here on CPU in a gloo group of one process: its parameters are DTensors, sharded
over that one rank, and gathered around each unit's forward exactly as on a GPU; what one process cannot show
is the reduce-scatter of gradients over several ranks (docs/performance.md gives the GPU command for that).
"""

from __future__ import annotations

import copy
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from tiny_archs import batch, build, ce_of_logits

from tokenforget.config import LoraSettings, ModelConfig, RunConfig
from tokenforget.model import loading as models
from tokenforget.model.model_ce import ce_path, model_token_ce


@pytest.fixture
def gloo_group():
    """A gloo process group of world size 1 for one test, torn down afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def ce_and_grads(model: torch.nn.Module, use_ours: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B, T) per-token CE (ours, or over the model's logits) and the full gradients of its sum."""
    ids, mask, positions = batch()
    model.zero_grad()
    if use_ours:
        ce = model_token_ce(model, ids, positions, attention_mask=mask)
    else:
        ce = ce_of_logits(model(input_ids=ids, attention_mask=mask).logits, ids, positions)
    ce.sum().backward()
    full = lambda g: g.full_tensor() if hasattr(g, "full_tensor") else g  # noqa: E731  DTensor -> whole tensor
    return ce.detach(), {n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head_unit, want_path", [(True, "logits"), (False, "hidden")])
def test_fsdp2_chooses_the_ce_path_by_where_the_head_lives_and_stays_exact(gloo_group, head_unit, want_path):
    """Phi (lm_head with a bias) under fully_shard, every weight trained. With the lm_head its own FSDP unit
    it is resharded after its forward (a DTensor when the loss reads it): the model's logits are used. With
    the lm_head in the root unit its whole weight stays gathered after the forward: the fast path. Either
    way CE and every gradient equal those of an unwrapped copy, within test_exact_ce's fp32 tolerances."""
    from torch.distributed.fsdp import fully_shard

    model = build("phi").train()
    plain = copy.deepcopy(model)
    want, want_grads = ce_and_grads(plain, use_ours=False)
    for layer in model.model.layers:
        fully_shard(layer)
    if head_unit:
        fully_shard(model.lm_head)
    fully_shard(model)
    assert ce_path(model).kind == want_path, ce_path(model).reason
    ours, grads = ce_and_grads(model, use_ours=True)
    torch.testing.assert_close(ours, want, rtol=0, atol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=name)


def test_qlora_loads_on_this_ranks_gpu(monkeypatch):
    """The 4-bit base goes to GPU LOCAL_RANK (torchrun sets it per process), GPU 0 when run alone."""
    seen: list[dict] = []
    monkeypatch.setattr(models, "check_qlora", lambda cfg: None)
    monkeypatch.setattr(models, "qlora_config", lambda bf16: "nf4")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: seen.append(kw))
    monkeypatch.setattr(models, "resolve_model", lambda cfg: ("some/model", None))
    monkeypatch.setenv("LOCAL_RANK", "3")
    models.load_model(ModelConfig(name_or_path="some/model"), qlora=True)
    monkeypatch.delenv("LOCAL_RANK")
    models.load_model(ModelConfig(name_or_path="some/model"), qlora=True)
    assert [kw["device_map"] for kw in seen] == [{"": 3}, {"": 0}]
    assert all(kw["quantization_config"] == "nf4" for kw in seen)


def test_compare_builds_its_base_with_qlora(monkeypatch):
    """`compare` loads its shared base as the config says: 4-bit with lora.qlora."""
    from tokenforget.commands import compare

    class Stop(Exception):
        pass

    def base_model(cfg, qlora=False):
        raise Stop(qlora)

    monkeypatch.setattr(compare, "BaseModel", base_model)
    with pytest.raises(Stop) as stop:
        compare.run_compare(RunConfig(lora=LoraSettings(qlora=True)))
    assert stop.value.args == (True,)


def test_ddp_timeout_reaches_the_process_group(monkeypatch):
    """Under torchrun (WORLD_SIZE 2) the process group is made with the configured timeout."""
    import accelerate

    from tokenforget.pipeline.resolver import Ranks

    made: list[dict] = []

    class State:
        process_index, num_processes = 1, 2

        def __init__(self, **kwargs):
            made.append(kwargs)

    monkeypatch.setattr(accelerate, "PartialState", State)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert Ranks.detect(7) == Ranks(1, 2)
    assert made[0]["timeout"] == timedelta(seconds=7)


def test_ddp_timeout_must_be_positive(tmp_path, capsys):
    from tokenforget.cli import main

    assert main(["run", "--run_dir", str(tmp_path), "--ddp_timeout", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ddp_timeout" in err[0], err


class LateRank1:
    """Rank 1 of 2 that looks at the run folder after rank 0, which found a stage not done, has written it."""

    rank, world, is_main = 1, 2, False

    def __init__(self) -> None:
        self.barriers = 0

    def barrier(self) -> None:
        self.barriers += 1

    def from_main(self, value: bool) -> bool:
        return False  # rank 0's answer when it looked


def test_a_late_rank_takes_rank_0s_decision_and_waits_at_the_same_barrier(tmp_path):
    """The hang of `test_two_process_run_writes_every_stage_once`: rank 1 saw the rank-0-only stage done on disk,
    skipped its barrier, and every later barrier paired with the wrong one until DDP's first collective hung."""
    from tokenforget.runfolder import STAGE_FILE, RunFolder

    ranks = LateRank1()
    folder = RunFolder(tmp_path, {}, ranks=ranks, log=lambda _msg: None)  # type: ignore[arg-type]
    (tmp_path / "partition").mkdir()
    (tmp_path / "partition" / STAGE_FILE).write_text('{"fingerprint": "fp"}')  # rank 0's write
    built: list[int] = []
    folder.ensure("partition", "fp", lambda: built.append(1), lambda _r, _d: {})
    assert (ranks.barriers, built, folder.reused) == (1, [], [])  # rank-0-only build; one barrier, as rank 0
