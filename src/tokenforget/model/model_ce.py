"""Per-token cross-entropy of a causal LM, equal to CE over the model's own logits for every model.

Three ways to get it, chosen once per model by `ce_path` (which says why, and logs it):

- `hidden`: the final hidden states go through the output head chunk by chunk (`linear_cross_entropy`, or
  a fused CUDA kernel when one is installed: `head_ce.fused_backend`), so the (B, T, V) logits never exist. The head is its weight, its bias and a `LogitMap` (scale, soft cap)
  read from the model's config through `KNOWN_LOGIT_MAPS`, and it is used only after a probe forward has
  shown that the model's own logits equal that head applied to the captured hidden states.
- `logits`: the model's own logits, at the wanted positions only (a boolean `logits_to_keep`), CE in fp32
  chunks. For a head the probe could not confirm: an unknown post-head transform is never guessed.
- `full_logits`: the model's own logits everywhere, for a forward that does not take a boolean
  `logits_to_keep`.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tokenforget.model.head_ce import head_cross_entropy
from tokenforget.model.head_ce import IDENTITY, LogitMap, rows_cross_entropy, token_cross_entropy

logger = logging.getLogger(__name__)

CE_CHUNK = 256  # rows of logits alive at a time: 256 x 49k vocab = 50 MB in fp32
PROBE_TOKENS = 8  # the probe's sequence: 8 token ids spread over the vocabulary, logits kept at 4 positions
# The probe's bound on |model logits - our head's logits|, relative to max(1, max |logit|). In fp32 the two
# differ only by rounding (the same matmul; Granite's z / s against our z * (1 / s)), ~1e-7; 1e-5 leaves
# 100x room and still bounds the CE difference at 2e-5 (CE moves by at most 2 max |logit difference|).
# Weights in half precision: 4 ulps of that dtype (the model rounds each step of its transform).
PROBE_RTOL = 1e-5

CEKind = Literal["hidden", "logits", "full_logits"]


@dataclass(frozen=True)
class CEPath:
    """How `model_token_ce` computes a model's per-token CE, and why."""

    kind: CEKind
    reason: str
    logit_map: LogitMap = IDENTITY  # with kind "hidden": what the model does to its head's output


# ------------------------------------------------------------------ known post-head transforms


def _scale_by(attr: str) -> Callable[[Any], LogitMap]:
    return lambda cfg: LogitMap(scale=float(getattr(cfg, attr)))


def _divide_by(attr: str) -> Callable[[Any], LogitMap]:
    return lambda cfg: LogitMap(scale=1.0 / float(getattr(cfg, attr)))


def _softcap(cfg: Any) -> LogitMap:
    return LogitMap(softcap=cfg.get_text_config().final_logit_softcapping)


# model_type -> its LogitMap, as the *ForCausalLM forward of transformers 5.24 applies it after the lm_head
# (models/<type>/modeling_<type>.py). Types not listed are taken as y = z. Either way the probe checks it.
KNOWN_LOGIT_MAPS: dict[str, Callable[[Any], LogitMap]] = {
    **{t: _scale_by("logit_scale") for t in ("cohere", "cohere2", "cohere2_moe")},  # logits * logit_scale
    **{t: _divide_by("logits_scaling") for t in (  # logits / logits_scaling
        "granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared")},
    "hyperclovax": _scale_by("logits_scaling"),  # logits * logits_scaling
    "falcon_h1": _scale_by("lm_head_multiplier"),  # logits * lm_head_multiplier
    **{t: _softcap for t in (  # cap * tanh(logits / cap) when final_logit_softcapping is set
        "gemma2", "gemma3_text", "gemma3n_text", "gemma3n", "gemma4_text", "gemma4")},
}


def logit_map_of(config: Any) -> LogitMap:
    """The `LogitMap` that `KNOWN_LOGIT_MAPS` gives for `config.model_type`; y = z for other types."""
    read = KNOWN_LOGIT_MAPS.get(getattr(config, "model_type", ""))
    return IDENTITY if read is None else read(config)


# ------------------------------------------------------------------ the model's parts


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP / peft wrappers."""
    model = without_ddp(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def without_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / FSDP1 / DeepSpeed wrappers (`.module`), a peft model kept: under FSDP2 that is the
    root unit, whose forward gathers the root's parameters (the embedding, a tied head) before it runs."""
    while hasattr(model, "module"):
        model = model.module
    return model


@contextlib.contextmanager
def final_hidden_states(model: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the decoder's output (B, T, H), the input of the lm_head, during a forward of `model`
    (box["hidden"]; absent when the decoder's output is neither a tuple nor has `last_hidden_state`)."""
    box: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _args: Any, out: Any) -> None:
        hidden = out[0] if isinstance(out, tuple) else getattr(out, "last_hidden_state", None)
        if hidden is not None:
            box["hidden"] = hidden

    handle = unwrap(model).get_decoder().register_forward_hook(keep)
    try:
        yield box
    finally:
        handle.remove()


def _plain_head(inner: torch.nn.Module) -> Optional[torch.nn.Linear]:
    """The lm_head when it is exactly `nn.Linear` (so weight and bias say all it does), else None.

    A peft LoRA on the lm_head, a quantized or any custom head module computes more than its `.weight`."""
    if not hasattr(inner, "get_decoder") or not hasattr(inner, "get_output_embeddings"):
        return None
    head = inner.get_output_embeddings()
    return head if type(head) is torch.nn.Linear else None


def _materialised(weight: torch.Tensor) -> bool:
    """Whether `weight` is the whole (V, H) matrix here: not a DTensor (FSDP2) nor a shard or an empty
    placeholder (FSDP1 outside its unit's forward), nor a DeepSpeed ZeRO-3 parameter (`ds_id`), which is whole
    only while gathered and may be released or kept between steps at DeepSpeed's discretion."""
    zero3 = hasattr(weight, "ds_id")
    return not isinstance(weight, DTensor) and not zero3 and weight.dim() == 2 and weight.numel() > 0


# ------------------------------------------------------------------ the probe and the decision

_PROBED: "weakref.WeakKeyDictionary[torch.nn.Module, CEPath]" = weakref.WeakKeyDictionary()  # probe once per model
_LOGGED: "weakref.WeakKeyDictionary[torch.nn.Module, CEPath]" = weakref.WeakKeyDictionary()  # log each decision once


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout), each restored to its own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def probe_ce_path(model: torch.nn.Module) -> CEPath:
    """Run the model once on `PROBE_TOKENS` tokens (eval mode, no autocast, logits at half the positions
    through a boolean `logits_to_keep`) and compare its logits y with logit_map(h @ W.T + b) of the captured
    final hidden states h, in fp32; |difference| <= PROBE_RTOL * max(1, max |y|) makes the `hidden` path.

    The probe sees the lm_head's input and everything after it, for these tokens; a transform that only
    acts on other inputs (on long sequences, on some positions) would pass unseen. The forward runs through
    `model` (a peft model: its adapters are active), so that an FSDP2 root gathers its parameters first.
    """
    inner = unwrap(model)
    dev = next(inner.parameters()).device
    vocab = inner.config.get_text_config().vocab_size
    ids = (torch.arange(PROBE_TOKENS, device=dev) * 7919 % vocab)[None]  # (1, n), spread over the vocabulary
    keep = (torch.arange(PROBE_TOKENS, device=dev) % 2 == 1)[None]  # (1, n) bool
    head = _plain_head(inner)
    # Autocast off for the forward *and* our head: the probe is often first called inside a caller's bf16
    # autocast (scoring, evaluation), and our fp32 reference product computed there would be a bf16 one.
    with torch.autocast(dev.type, enabled=False):
        with _eval_mode(model), contextlib.ExitStack() as stack:
            box = stack.enter_context(final_hidden_states(inner)) if head is not None else {}
            try:
                logits = model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits
            except Exception as e:  # e.g. a TypeError from remote code: then use no logits_to_keep at all; should
                # the model fail for another reason, the full-logits forward of `model_token_ce` raises it again
                return CEPath("full_logits",
                              f"the forward does not take a boolean logits_to_keep ({type(e).__name__}: {e})")
        if logits.shape[:-1] != (int(keep.sum()),):
            return CEPath("full_logits", f"the forward ignores a boolean logits_to_keep (logits {tuple(logits.shape)})")
        if head is None:
            return CEPath("logits", "the lm_head is not a plain nn.Linear (a LoRA on it, a quantized or custom head)")
        if "hidden" not in box or not _materialised(head.weight):
            return CEPath("logits", "the decoder's output or the whole lm_head weight cannot be read here")
        return _compare_head(inner, head, box["hidden"][keep].to(head.weight.device), logits.to(head.weight.device))


def probe_tolerance(*dtypes: torch.dtype) -> float:
    """The probe's relative bound for a model whose head works in `dtypes` (its logits', weight's, hidden's).

    The model's logits are rounded in the least precise of them (fp32 logits upcast from a bf16 head are
    bf16 numbers), ours are fp32: they differ by half an ulp of that dtype per rounding step, and a known
    transform after the head (scale, soft cap) adds a step or two. 4 ulps (bf16: 4 x 2^-7 = 0.031, fp16:
    0.0039) bound that; an unknown transform (a scale of 1.1, an offset) moves logits by far more. In fp32
    the bound is `PROBE_RTOL` (1e-5, 20x the 4 ulps of 4.8e-7): one product computed twice, in another order.
    """
    return max(PROBE_RTOL, max(4 * torch.finfo(d).eps for d in dtypes))


def _compare_head(inner: torch.nn.Module, head: torch.nn.Linear, hidden: torch.Tensor, logits: torch.Tensor) -> CEPath:
    """The probe's verdict: the model's `logits` (k, V) against our head on its final `hidden` states (k, H)."""
    logit_map = logit_map_of(inner.config)
    bias = None if head.bias is None else head.bias.float()
    ours = logit_map(F.linear(hidden.float(), head.weight.float(), bias))  # (k, V) fp32
    if ours.shape != logits.shape:
        return CEPath("logits", f"the model's logits {tuple(logits.shape)} are not the lm_head's {tuple(ours.shape)}")
    tol = probe_tolerance(logits.dtype, head.weight.dtype, hidden.dtype) * max(1.0, float(ours.abs().max()))
    diff = float((logits.float() - ours).abs().max())
    described = f"{logit_map}, z = h W^T{' + b' if bias is not None else ''}"
    if not diff <= tol:  # NaN counts as a mismatch
        return CEPath("logits", f"the model's logits differ from {described} by {diff:.3g} > {tol:.2g}: "
                                "a transform after the head that we do not know")
    return CEPath("hidden", f"the model's logits equal {described} (max difference {diff:.2g})", logit_map)


def ce_path(model: torch.nn.Module) -> CEPath:
    """How `model_token_ce` computes this model's per-token CE, and why (see the module docstring).

    The probe runs once per model (the first call; it is cheap: one forward of 8 tokens). Each call also
    checks that the lm_head is still a plain `nn.Linear` with its whole weight here (peft may wrap it later;
    FSDP and ZeRO-3 shard it), falling back to `logits` otherwise. Each new decision is logged once.
    """
    inner = unwrap(model)
    path = _PROBED.get(inner)
    if path is None:
        path = _PROBED[inner] = probe_ce_path(without_ddp(model))
    head = _plain_head(inner)
    if path.kind == "hidden" and (head is None or not _materialised(head.weight)):
        path = CEPath("logits", "the lm_head is no longer a plain nn.Linear with its whole weight on this rank "
                                "(a LoRA on it, or FSDP / ZeRO-3 sharding)")
    if _LOGGED.get(inner) != path:
        _LOGGED[inner] = path
        log = logger.info if path.kind == "hidden" else logger.warning
        log("per-token CE of %s: %s path: %s", type(inner).__name__, path.kind, path.reason)
    return path


def supports_hidden_ce(model: torch.nn.Module) -> bool:
    """Whether `model_token_ce` takes the `hidden` path (no full-vocabulary logits) for `model`."""
    return ce_path(model).kind == "hidden"


# ------------------------------------------------------------------ per-token CE


def model_token_ce(
    model: torch.nn.Module,
    ids: torch.Tensor,
    positions: torch.Tensor,
    chunk_size: int = CE_CHUNK,
    **forward_kwargs: Any,
) -> torch.Tensor:
    """(B, T) fp32 CE of the tokens at `positions` (0 elsewhere), equal to CE over the model's own logits.

    out[b, t] = -log softmax(logits[b, t - 1])[ids[b, t]] where positions[b, t], else 0. On the `hidden`
    path the model runs with `logits_to_keep=1` and only wanted positions cost lm_head work, so prompt and
    padding tokens are free; on `logits` the model computes logits at the wanted positions only (see
    `ce_path`). Differentiable (training) and usable under no_grad.

    Args:
        ids: (B, T) token ids; `forward_kwargs` carry attention_mask (padded) or position_ids (packed).
        positions: (B, T) bool, which tokens to score; position 0 is never scored.
    """
    want = positions.bool().clone()
    want[:, 0] = False
    predicting = F.pad(want[:, 1:], (0, 1))  # (B, T): position t - 1 predicts token t
    path = ce_path(model)
    if path.kind == "full_logits":
        logits = model(input_ids=ids, use_cache=False, **forward_kwargs).logits  # (B, T, V)
        return torch.where(want, token_cross_entropy(logits, ids, chunk_size), 0.0)
    if path.kind == "hidden":
        ce = _hidden_ce(model, ids, predicting, ids[want], chunk_size, path.logit_map, forward_kwargs)  # (N,)
    else:  # the model's own logits, at the N predicting positions only (row-major, like ids[want])
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=predicting, **forward_kwargs).logits
        ce = rows_cross_entropy(logits, ids[want], chunk_size)  # (N,)
    return ce.new_zeros(ids.shape).masked_scatter(want, ce)


def _hidden_ce(
    model: torch.nn.Module,
    ids: torch.Tensor,
    predicting: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    logit_map: LogitMap,
    forward_kwargs: dict[str, Any],
) -> torch.Tensor:
    """(N,) CE of `targets` from the final hidden states at the (B, T) bool `predicting` positions."""
    with final_hidden_states(model) as box:
        model(input_ids=ids, use_cache=False, logits_to_keep=1, **forward_kwargs)
    head = unwrap(model).get_output_embeddings()
    if not _materialised(head.weight):  # sharded since ce_path looked (FSDP, ZeRO-3): fail loudly, never silently
        raise RuntimeError("the lm_head weight is sharded after the forward; pass chunked_ce=False to ForgettingTrainer")
    hidden = box["hidden"][predicting].to(head.weight.device)  # (N, H)
    return head_cross_entropy(hidden, head.weight, targets, chunk_size, head.bias, logit_map)  # fused on CUDA
