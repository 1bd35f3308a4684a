"""Per-token CE equals CE over the model's own logits, for every architecture and every path.

The reference is always `F.cross_entropy` over `model(...).logits` in fp32. Tiny random models of 12
architectures (tests/tiny_archs.py) with what lies between their hidden states and their logits made to
matter: Phi's lm_head bias, Cohere's logit_scale, Granite's logits_scaling, the Gemma 2 and 3 soft caps.

Tolerances (fp32, never widened to pass):
- CE values: 1e-5 absolute. Both sides compute the same fp32 logits, ours with other matmul shapes (chunks
  of rows), so only the order of sums differs: about one ulp of a CE of up to 25 nats (Cohere), 1.9e-6.
  Measured after: <= 1.9e-6 on every architecture. Before this change (hidden @ W^T only) the same batch
  differed by 2.1 (Phi), 16 (Cohere), 1.8 (Granite), 1.8 (Gemma 2) and 2.0 (Gemma 3) nats.
- Gradients: |ours - reference| <= 1e-4 |reference| + 1e-5 max |reference|, per parameter tensor. Each entry
  is a sum over tokens and vocabulary in reordered fp32 sums, so its error scales with the tensor's
  largest entry rather than with the entry itself (which may be near 0). Measured: <= 9e-7 max |reference|.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tiny_archs import ARCHS, PROMPT, SEQS, batch, build, ce_of_logits, with_unknown_transform
from tokenforget.model.head_ce import LogitMap, linear_cross_entropy
from tokenforget.model.model_ce import ce_path, model_token_ce
from tokenforget.model.batching import forward_ce, pad_batch

CE_ATOL = 1e-5


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these tiny models: a second only adds synchronisation, and on a busy machine
    the threads' waits made each test ~20x slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_ce(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, T): F.cross_entropy over the model's own fp32 logits, token t from position t - 1; 0 off `positions`."""
    return ce_of_logits(model(input_ids=ids, attention_mask=mask).logits, ids, positions)


def ce_and_grads(loss_fn, params: dict[str, torch.nn.Parameter]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """loss_fn() (B, T) and the gradients of its token-weighted sum w.r.t. `params` (weights 0.5..1.5, so a
    token's gradient cannot hide behind another's)."""
    for p in params.values():
        p.grad = None
    token_loss = loss_fn()
    weights = torch.linspace(0.5, 1.5, token_loss.numel(), device=token_loss.device).view_as(token_loss)
    (token_loss * weights).sum().backward()
    return token_loss.detach(), {n: p.grad.clone() for n, p in params.items()}


def assert_grads_close(ours: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for name, g in want.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(ours[name], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")


def assert_exact(model: torch.nn.Module, params: dict[str, torch.nn.Parameter], device: str = "cpu") -> None:
    """`model_token_ce` (chunks of 4 rows) and its gradients w.r.t. `params` equal the reference's."""
    ids, mask, positions = batch(device)
    want, want_grads = ce_and_grads(lambda: reference_ce(model, ids, mask, positions), params)
    ours, grads = ce_and_grads(lambda: model_token_ce(model, ids, positions, chunk_size=4, attention_mask=mask), params)
    torch.testing.assert_close(ours, want, rtol=0, atol=CE_ATOL)
    assert_grads_close(grads, want_grads)


def lora(model: torch.nn.Module, target_modules: str | list[str] = "all-linear") -> torch.nn.Module:
    """peft LoRA (r 4) with lora_B random, so the adapter changes the model and every LoRA parameter gets a
    gradient. "all-linear" leaves the lm_head out, as peft does."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)
    return peft


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ARCHS)
def test_scoring_ce_equals_model_logits_ce(arch):
    """The scorer's CE (`forward_ce`, under no_grad) at the scored positions = CE over the model's logits,
    through the fast path (no full logits) for every one of these architectures."""
    model = build(arch)
    ids, mask, positions = batch()
    with torch.no_grad():
        want = reference_ce(model, ids, mask, positions)
    assert ce_path(model).kind == "hidden", ce_path(model).reason
    torch.testing.assert_close(forward_ce(model, ids, mask, bf16=False, positions=positions), want, rtol=0, atol=CE_ATOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_training_ce_and_gradients_equal_model_logits_ce(arch):
    """With peft LoRA on: per-token CE and the gradients of the LoRA parameters = the reference's."""
    model = lora(build(arch))
    assert any("lora_A" in n for n in trainable(model))
    assert ce_path(model).kind == "hidden", ce_path(model).reason
    assert_exact(model, trainable(model))


@pytest.mark.parametrize("arch", ARCHS)
def test_full_training_gradients_equal_model_logits_ce(arch):
    """Every parameter trainable (full fine-tuning): the gradients of the lm_head weight, of Phi's lm_head
    bias, and through Cohere's scale, Granite's scaling and the Gemma soft caps = the reference's."""
    model = build(arch).train()
    for p in model.parameters():
        p.requires_grad_(True)
    head = model.get_output_embeddings()
    assert head.bias is None or float(head.bias.detach().abs().max()) > 0.1  # Phi's bias is there and not zero
    assert_exact(model, trainable(model))


def lm_head_inputs(model: torch.nn.Module) -> list[torch.Size]:
    """The shapes of what the lm_head module was called on during one `model_token_ce` of the batch."""
    ids, mask, positions = batch()
    shapes: list[torch.Size] = []
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: shapes.append(args[0].shape))
    with torch.no_grad():
        model_token_ce(model, ids, positions, attention_mask=mask)
    handle.remove()
    return shapes


def test_llama_takes_the_fast_path_without_full_logits():
    """The memory advantage: for Llama the lm_head module runs on one position per sequence only
    (`logits_to_keep=1`); the scored positions go through the chunked head."""
    model = build("llama")
    path = ce_path(model)
    assert path.kind == "hidden" and path.logit_map == LogitMap(), path.reason
    assert lm_head_inputs(model) == [torch.Size([len(SEQS), 1, 32])]


def test_unknown_post_head_transform_falls_back_to_the_models_logits():
    """A Llama subclass whose forward multiplies the logits of odd token ids by 1.5 (no config says so):
    the probe sees it, the model's own logits are used at the scored positions only, and CE and
    gradients stay exact."""
    model = with_unknown_transform("llama")
    path = ce_path(model)
    assert path.kind == "logits" and "transform after the head" in path.reason, path.reason
    n_scored = int(batch()[2][:, 1:].sum())
    assert lm_head_inputs(model) == [torch.Size([n_scored, 32])]  # logits where a scored token is predicted only
    peft = lora(model)
    assert_exact(peft, trainable(peft))


def test_forward_without_logits_to_keep_uses_full_logits():
    """A model whose forward does not take `logits_to_keep` (like much remote code): full logits, exact."""
    base = build("qwen2")
    cls = type(base)

    class NoKeep(cls):  # type: ignore[misc, valid-type]
        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=use_cache)

    base.__class__ = NoKeep
    peft = lora(base)
    assert ce_path(peft).kind == "full_logits", ce_path(peft).reason
    assert_exact(peft, trainable(peft))


def test_lora_on_the_lm_head_uses_the_models_logits():
    """LoRA on the lm_head too: the head is more than its weight, so no fast path; CE and the gradients
    of every LoRA parameter (the head's included) stay exact."""
    peft = lora(build("phi"), target_modules=["lm_head", "q_proj"])
    assert any("lm_head.lora_B" in n for n in trainable(peft))
    assert ce_path(peft).kind == "logits", ce_path(peft).reason
    assert_exact(peft, trainable(peft))


@pytest.mark.parametrize("arch", ["phi", "gemma2"])
def test_trainer_loss_equals_the_objective_over_model_logits(arch, tmp_path):
    """`ForgettingTrainer.compute_loss` (the training path) = the forget objective over the reference CE."""
    from transformers import TrainingArguments

    from tokenforget.training.objectives import forgetting_loss
    from tokenforget.config import ObjectiveConfig
    from tokenforget.training.trainer import ForgettingTrainer

    model = lora(build(arch))
    ids, mask, positions = batch()
    alternating = 1 - 2 * (torch.arange(ids.shape[1]) % 2)  # (T,): +1, -1, +1, ...
    cls = torch.where(positions, alternating, 0)  # (B, T): learn and forget tokens in turn
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = ForgettingTrainer(model=model, args=args, objective=ObjectiveConfig(schedule="constant", t_max=0.2))
    loss = trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask, "token_class": cls})
    want = forgetting_loss(reference_ce(model, ids, mask, positions), cls, 0.2).loss
    assert abs(float(loss) - float(want)) < CE_ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_trl_fused_head_equals_model_logits_ce(arch):
    """TRL's fused LM head, which `ForgettingSFTTrainer` trains on: log-probs and all gradients (lm_head bias,
    scale and soft cap included) = the reference's. TRL reads the transforms from the config without a
    probe, so this pins that it reads these 12 right."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    model = build(arch)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask, positions = batch()
    labels = ids.masked_fill(~positions, -100)
    want, want_grads = ce_and_grads(lambda: reference_ce(model, ids, mask, positions), trainable(model))
    add_fused_lm_head(model)
    fused = lambda: F.pad(-model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs, (1, 0))  # noqa: E731
    ours, grads = ce_and_grads(fused, trainable(model))
    torch.testing.assert_close(ours, want, rtol=0, atol=CE_ATOL)
    assert_grads_close(grads, want_grads)


def test_logit_map_hand_values_and_gradients():
    """z = [0, ln 3] (hidden [1, 0], weight rows [0, 0], [ln 3, 0]).
    scale 2: y = [0, 2 ln 3] = [0, ln 9], CE(token 1) = ln(1 + 9) - ln 9 = ln(10/9).
    soft cap 1 with z = [0, atanh(0.5)]: y = tanh(z) = [0, 0.5], CE(token 0) = ln(1 + e^0.5).
    bias [ln 2, 0] on z = [0, 0]: y = [ln 2, 0], CE(token 1) = ln 3.
    Gradients of scale + cap + bias equal autograd through the composed logits."""
    h = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    out = linear_cross_entropy(h, w, torch.tensor([1]), logit_map=LogitMap(scale=2.0))
    torch.testing.assert_close(out, torch.tensor([math.log(10 / 9)]))
    w_cap = torch.tensor([[0.0, 0.0], [math.atanh(0.5), 0.0]])
    out = linear_cross_entropy(h, w_cap, torch.tensor([0]), logit_map=LogitMap(softcap=1.0))
    torch.testing.assert_close(out, torch.tensor([math.log(1 + math.exp(0.5))]))
    out = linear_cross_entropy(h, torch.zeros(2, 2), torch.tensor([1]), bias=torch.tensor([math.log(2.0), 0.0]))
    torch.testing.assert_close(out, torch.tensor([math.log(3.0)]))

    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    t, g = torch.randint(0, 11, (7,)), torch.randn(7)
    y = 0.7 * torch.tanh(1.3 * (h @ w.T + b) / 0.7)
    (F.cross_entropy(y, t, reduction="none") * g).sum().backward()
    want = [x.grad.clone() for x in (h, w, b)]
    h.grad = w.grad = b.grad = None
    (linear_cross_entropy(h, w, t, chunk_size=2, bias=b, logit_map=LogitMap(1.3, 0.7)) * g).sum().backward()
    for got, exp in zip((h.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got, exp)  # default fp32 tolerances: only summation order differs


# ---------------------------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_fp32_lora_training_ce_and_gradients_equal_model_logits_ce(arch):
    """On the GPU in fp32, through the fused kernel when one is installed (`fused_ce`), else the chunked
    head: per-token CE and LoRA gradients = the reference's, with the CPU tolerances (fp32, reordered sums;
    TF32 is off by default for fp32 matmuls in torch)."""
    model = lora(build(arch)).cuda()
    assert ce_path(model).kind == "hidden", ce_path(model).reason
    assert_exact(model, trainable(model), device="cuda")


# bf16 rounds each logit to 8 significant bits, |y| 2^-8 <= 6 * 2^-8 = 0.023 for |y| <= 6 (asserted below);
# the two sides round different matmuls, and CE moves by at most 2 max |logit difference| = 0.047; 0.1 leaves
# 2x room. A smoke test that bf16 weights take the same path and agree, not an exactness test.
BF16_ATOL = 0.1


@pytest.mark.cuda
# Not Cohere: its tiny model's logit scale of 3 (exaggerated, for the fp32 tests) puts logits near 20 (an H200 run,
# 2026-11-29), outside the |y| <= 6 this tolerance is derived for; Granite's scaled head stands in for it.
@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi", "granite"])
def test_cuda_bf16_ce_close_to_model_logits_ce(arch):
    """bf16 weights on the GPU, LoRA on: per-token CE within BF16_ATOL of CE over the model's own bf16
    logits (upcast to fp32), finite gradients for every LoRA parameter."""
    model = lora(build(arch)).to("cuda", torch.bfloat16)
    ids, mask, positions = batch("cuda")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V) bf16 values, fp32 CE
        assert float(logits.abs().max()) <= 6.0
        want = ce_of_logits(logits, ids, positions)
    ours = model_token_ce(model, ids, positions, attention_mask=mask)
    torch.testing.assert_close(ours, want, rtol=0, atol=BF16_ATOL)
    ours.sum().backward()
    grads = [p.grad for p in trainable(model).values()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)


# ---------------------------------------------------------------- the defaults, end to end, and the probe's dtypes


@pytest.mark.parametrize("arch", ["gpt_neo", "gemma2", "llama"])
def test_score_command_with_the_default_attention_equals_model_logits_ce(arch, tmp_path, tiny_model_dir, tiny_tokenizer):
    """`tokenforget score` on a saved tiny model with the default `model.attn_implementation` (auto: GPT-Neo and
    Gemma-2 have no sdpa, which the old default forced and they refused with a ValueError): CE_base and CE_ref of
    every response token = F.cross_entropy over the model's own fp32 logits (base; base + the saved adapter),
    within CE_ATOL. fp32 (`model.precision: fp32`), as every exactness test here: bf16 moves values by ~1e-2."""
    import datasets
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import tiny_run_config, write_config
    from tokenforget.cli import main

    folder = tmp_path / arch
    build(arch, vocab=len(tiny_tokenizer), max_position_embeddings=128).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    cfg = tiny_run_config(tmp_path, folder, n_examples=8, reference={"fraction": 0.5})
    assert "attn_implementation" not in cfg["model"]
    assert main(["score", str(write_config(tmp_path, cfg))]) == 0
    run = tmp_path / "run"
    tokens = datasets.load_from_disk(str(run / "data" / "tokens"))
    scores = datasets.load_from_disk(str(run / "scores" / "scores"))
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                                    str(run / "reference" / "adapter")).eval()
    for i in range(len(tokens)):
        ids = torch.tensor([tokens[i]["input_ids"]])
        resp = torch.tensor([tokens[i]["response_mask"]]).bool()
        resp[:, 0] = False
        with torch.no_grad():
            for model, column in ((base, "ce_base"), (ref, "ce_ref")):
                want = ce_of_logits(model(input_ids=ids).logits, ids, resp)[0]
                got = torch.tensor(scores[i][column])
                torch.testing.assert_close(got[resp[0]], want[resp[0]], rtol=0, atol=CE_ATOL)


def test_attention_the_model_refuses_is_one_line_and_exit_2(tmp_path, tiny_tokenizer, capsys):
    """An explicit `sdpa` for GPT-Neo (which has none): one line naming the field, exit 2, no stage folder."""
    from conftest import tiny_run_config, write_config
    from tokenforget.cli import main

    folder = tmp_path / "gpt_neo"
    build("gpt_neo", vocab=len(tiny_tokenizer), max_position_embeddings=128).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    cfg = tiny_run_config(tmp_path, folder, n_examples=8, model={"attn_implementation": "sdpa"})
    capsys.readouterr()  # the save's progress bars
    assert main(["score", str(write_config(tmp_path, cfg))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'model.attn_implementation'" in err[0] and "GPTNeoForCausalLM" in err[0], err
    assert not (tmp_path / "run" / "data").exists()


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_probe_inside_a_callers_bf16_autocast_takes_the_hidden_path(weights):
    """The scorer and the evaluation call the probe first inside their own bf16 autocast. Before this change
    the probe's reference product h W^T ran in that autocast (a bf16 product) and missed the fp32 logits by
    ~4e-3 > the fp32 bound: every model went to the slower logits path with a warning of an unknown transform.
    bf16 weights: the bound is 4 bf16 ulps (`probe_tolerance`). An unknown transform is still caught in both."""
    from tokenforget.model.model_ce import probe_ce_path
    from tokenforget.model.loading import autocast

    with torch.no_grad(), autocast(True):
        assert probe_ce_path(build("llama").to(weights)).kind == "hidden"
        assert probe_ce_path(with_unknown_transform("llama").to(weights)).kind == "logits"


def test_probe_bound_for_fp32_logits_from_a_bf16_head():
    """A model that returns its logits in fp32 from a bf16 head (upcast after the lm_head, as many do) takes the
    hidden path: the logits are bf16 numbers, and the bound follows the weight's dtype, not the logits'.
    Hand-worked bounds: fp32 1e-5 (PROBE_RTOL), bf16 4 x 2^-7 = 0.03125, fp16 4 x 2^-10 = 0.00390625."""
    from tokenforget.model.model_ce import probe_ce_path, probe_tolerance

    assert probe_tolerance(torch.float32) == 1e-5
    assert probe_tolerance(torch.float32, torch.bfloat16) == 0.03125
    assert probe_tolerance(torch.float16, torch.float32) == 0.00390625
    model = build("gemma2").to(torch.bfloat16)  # soft cap 0.5: a known transform after the head

    def upcast(_module, _args, out):
        out.logits = out.logits.float()
        return out

    model.register_forward_hook(upcast)
    path = probe_ce_path(model)
    assert path.kind == "hidden", path.reason


def test_demo_evaluation_path_probes_a_tied_head_model_exact_without_a_warning(tmp_path, tiny_model_dir, caplog):
    """The demo's evaluation (`report.evaluate_models`): a trained model saved merged and loaded again
    (`load_trained`), answers generated, then the gold NLL, all in bf16 autocast as on a CPU with native bf16
    (forced here, so the test holds on any CPU). The tied-head Llama must take the `hidden` path with no
    warning; the demo printed `logits path: ... a transform after the head that we do not know` for each model."""
    import logging

    from transformers import AutoModelForCausalLM

    from tokenforget.config import ModelConfig
    from tokenforget.stages.evaluate import generate, gold_nll
    from tokenforget.model.model_ce import ce_path
    from tokenforget.model.loading import load_tokenizer
    from tokenforget.stages.evaluate import load_trained

    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir), precision="fp32"))
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "train" / "model")
    model = load_trained(tmp_path / "train")
    assert model.config.tie_word_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "Mia has 12 apples."},
                                    {"role": "assistant", "content": "The answer is 24."}], tokenize=False)
    ids = [tok(text)["input_ids"]]
    with caplog.at_level(logging.INFO, logger="tokenforget.model.model_ce"):
        generate(model, tok, [[{"role": "user", "content": "Mia has 12 apples."}]], 4, batch_size=1, bf16=True)
        gold_nll(model, ids, [[0] * 3 + [1] * (len(ids[0]) - 3)], 1, True, tok.pad_token_id)
    assert ce_path(model).kind == "hidden", ce_path(model).reason
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], [r.getMessage() for r in caplog.records]
