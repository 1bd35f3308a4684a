"""The objectives and schedules against values worked out by hand."""

import math

import pytest
import torch

from tokenforget.model.head_ce import token_cross_entropy
from tokenforget.training.objectives import (
    FORGET_TERMS,
    OBJECTIVES,
    SCHEDULES,
    TokenCounts,
    dft_loss,
    forgetting_loss,
    get_schedule,
    ignore_loss,
    log1mexp,
    sft_loss,
)

# Two sequences of 4 tokens. Per-token losses and classes (+1 learn, -1 forget, 0 none):
#   row 0: loss [0, 1.0, 2.0, 3.0]  class [0,  1, -1, 1]
#   row 1: loss [0, 4.0, 0.5, 9.9]  class [0, -1,  1, 0]
# positives: 1.0, 3.0, 0.5 -> sum 4.5, N_pos = 3 -> mean 1.5
# negatives: 2.0, 4.0      -> sum 6.0, N_neg = 2 -> mean 3.0   (9.9 has class 0: ignored)
LOSS = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 4.0, 0.5, 9.9]])
CLS = torch.tensor([[0, 1, -1, 1], [0, -1, 1, 0]])


def test_forget_matches_hand_value():
    """1.5 - 0.2 * 3.0 = 0.9"""
    assert forgetting_loss(LOSS, CLS, 0.2).loss.item() == pytest.approx(0.9)


def test_forget_lambda_zero_is_mean_of_positives():
    """lambda = 0 leaves the positive mean: 4.5 / 3 = 1.5"""
    assert forgetting_loss(LOSS, CLS, 0.0).loss.item() == pytest.approx(1.5)


def test_forget_no_negative_tokens():
    """Row 0 with every response token positive: (1 + 2 + 3) / 3 = 2.0; the forget term is 0."""
    cls = torch.tensor([[0, 1, 1, 1]])
    assert forgetting_loss(LOSS[:1], cls, 0.25).loss.item() == pytest.approx(2.0)


def test_forget_no_positive_tokens():
    """Row 0 with tokens 1, 2 negative: -0.25 * (1 + 2) / 2 = -0.375; the learn term is 0."""
    cls = torch.tensor([[0, -1, -1, 0]])
    assert forgetting_loss(LOSS[:1], cls, 0.25).loss.item() == pytest.approx(-0.375)


def test_counts_from_the_whole_optimizer_batch():
    """Denominators from outside (other micro-batches): 4.5 / 6 - 0.2 * 6.0 / 4 = 0.75 - 0.3 = 0.45"""
    out = forgetting_loss(LOSS, CLS, 0.2, TokenCounts(pos=6, neg=4))
    assert out.loss.item() == pytest.approx(0.45)


def test_ignore_and_sft_hand_values():
    """ignore: 4.5 / 3 = 1.5 (lambda unused); sft: (4.5 + 6.0) / 5 = 2.1"""
    assert ignore_loss(LOSS, CLS, 0.7).loss.item() == pytest.approx(1.5)
    assert sft_loss(LOSS, CLS, 0.7).loss.item() == pytest.approx(2.1)


def test_dft_hand_value_and_gradient():
    """DFT: sum over the five response tokens of e^-l * l, over 5 (classes only mark response tokens):
    1 e^-1 + 2 e^-2 + 3 e^-3 + 4 e^-4 + 0.5 e^-0.5
      = 0.367879 + 0.270671 + 0.149361 + 0.073263 + 0.303265 = 1.164439;  / 5 = 0.232888.
    d loss / d l_t = sg(p_t) / 5 = e^-l_t / 5: e^-1 / 5 = 0.0735759 for l = 1; 0 for the class-0 tokens (0 and 9.9)."""
    loss = LOSS.clone().requires_grad_(True)
    out = dft_loss(loss, CLS, 0.7)
    assert out.loss.item() == pytest.approx(0.232888, abs=1e-6)
    out.loss.backward()
    assert loss.grad[0, 1].item() == pytest.approx(0.0735759, abs=1e-7)
    assert loss.grad[1, 2].item() == pytest.approx(math.exp(-0.5) / 5, abs=1e-7)
    assert loss.grad[0, 0].item() == 0.0 and loss.grad[1, 3].item() == 0.0
    assert out.pos_sum.item() == pytest.approx(4.5) and out.neg_sum.item() == pytest.approx(6.0)  # raw CE, logged


def test_registry_has_the_four_modes():
    assert set(OBJECTIVES) == {"forget", "ignore", "sft", "dft"}
    assert set(FORGET_TERMS) == {"ga", "unlikelihood", "wga", "tnpo"}


# ---------------------------------------------------------------- forgetting terms
# Negatives of LOSS/CLS: l = 2.0 (row 0, t 2) and l = 4.0 (row 1, t 1); positive mean 1.5; lambda 0.2, N_neg 2.


def test_ga_by_name_is_the_paper_objective_bit_for_bit():
    """`forget_term="ga"` (the default) takes the unchanged code path: value and gradient bit-identical to
    the explicit formula mean CE(+) - lambda mean CE(-). The general weighted path (w = 1) agrees to rounding."""
    torch.manual_seed(0)
    loss = torch.rand(3, 7, requires_grad=True)
    cls = torch.randint(-1, 2, (3, 7))
    got = forgetting_loss(loss, cls, 0.3, forget_term="ga").loss
    (g_got,) = torch.autograd.grad(got, loss)
    pos, neg = (loss * (cls == 1)).sum(), (loss * (cls == -1)).sum()
    want = pos / (cls == 1).sum().item() - 0.3 * neg / (cls == -1).sum().item()
    (g_want,) = torch.autograd.grad(want, loss)
    assert torch.equal(got, want) and torch.equal(g_got, g_want)
    general = forgetting_loss(loss, cls, 0.3, weight=torch.ones(3, 7)).loss
    torch.testing.assert_close(general, want)


def test_unlikelihood_hand_value_and_gradient():
    """f = -log(1 - e^-l): l = 2 -> -log(1 - 0.1353353) = 0.1454135; l = 4 -> -log(1 - 0.0183156) = 0.0184858.
    loss = 1.5 + 0.2 * (0.1454135 + 0.0184858) / 2 = 1.5163899.
    d loss / d l at l = 2: 0.2 / 2 * (-p / (1 - p)) = 0.1 * -(0.1353353 / 0.8646647) = -0.0156518."""
    token_loss = LOSS.clone().requires_grad_(True)
    out = forgetting_loss(token_loss, CLS, 0.2, forget_term="unlikelihood").loss
    assert out.item() == pytest.approx(1.5163899, abs=1e-6)
    out.backward()
    assert token_loss.grad[0, 2].item() == pytest.approx(-0.0156518, abs=1e-6)
    assert token_loss.grad[0, 1].item() == pytest.approx(1 / 3)  # a positive token: 1 / N_pos


def test_unlikelihood_is_finite_where_p_is_one_and_where_p_is_tiny():
    """l = 0 (p = 1) is clamped to 1e-6: -log(1 - e^-1e-6) = -log(~1e-6) = 13.8155; l = 50: ~e^-50 ~ 0."""
    f = FORGET_TERMS["unlikelihood"].push
    ce = torch.tensor([0.0, 1e-9, 50.0], requires_grad=True)
    out = f(ce)
    assert out[0].item() == pytest.approx(13.8155, abs=1e-3) and out[2].item() == pytest.approx(0.0, abs=1e-12)
    out.sum().backward()
    assert torch.isfinite(ce.grad).all()
    assert log1mexp(torch.tensor([1e-3, 1.0, 30.0])).tolist() == pytest.approx(
        [math.log(1 - math.exp(-1e-3)), math.log(1 - math.exp(-1.0)), math.log(1 - math.exp(-30.0))], rel=1e-5
    )


def test_wga_hand_values_for_two_betas():
    """beta 1: f = -e^-l l -> -0.2706706 - 0.0732626 = -0.3439332; loss = 1.5 + 0.2 * -0.3439332 / 2 = 1.4656067.
    beta 2: f = -e^-2l l -> -0.0366313 - 0.0013419 = -0.0379732; loss = 1.5 - 0.0037973 = 1.4962027."""
    assert forgetting_loss(LOSS, CLS, 0.2, forget_term="wga", beta=1.0).loss.item() == pytest.approx(1.4656067, abs=1e-6)
    assert forgetting_loss(LOSS, CLS, 0.2, forget_term="wga", beta=2.0).loss.item() == pytest.approx(1.4962027, abs=1e-6)


def test_wga_gradient_is_sg_p_beta_times_the_ga_gradient():
    """Through the logits: d wga / d logits at a negative token's position = p^beta * d ga / d logits there
    (p detached), and identical at positive tokens."""
    torch.manual_seed(1)
    logits = torch.randn(1, 4, 5, requires_grad=True)
    ids, cls, beta = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[0, 1, -1, 1]]), 1.5
    grads = {}
    for term in ("ga", "wga"):
        logits.grad = None
        ce = token_cross_entropy(logits, ids)
        forgetting_loss(ce, cls, 0.25, forget_term=term, beta=beta).loss.backward()
        grads[term] = logits.grad.clone()
    p = torch.exp(-token_cross_entropy(logits, ids)[0, 2]).detach()  # token 2 (negative) is predicted at position 1
    torch.testing.assert_close(grads["wga"][0, 1], p**beta * grads["ga"][0, 1])
    torch.testing.assert_close(grads["wga"][0, [0, 2]], grads["ga"][0, [0, 2]])


def test_tnpo_hand_value():
    """ce_base: 2.0 at (0, 2) (p = p_ref: w = 1) and 3.0 at (1, 1) (p = e^-4 < p_ref = e^-3):
    w = 2 e^-4 / (e^-4 + e^-3) = 2 / (1 + e) = 0.5378828. f sum = -2 - 0.5378828 * 4 = -4.1515313;
    loss = 1.5 + 0.2 * -4.1515313 / 2 = 1.0848469."""
    ref = torch.tensor([[0.0, 0.0, 2.0, 0.0], [0.0, 3.0, 0.0, 0.0]])
    out = forgetting_loss(LOSS, CLS, 0.2, ce_base=ref, forget_term="tnpo", beta=1.0).loss
    assert out.item() == pytest.approx(1.0848469, abs=1e-6)
    with pytest.raises(ValueError, match="ce_base"):
        forgetting_loss(LOSS, CLS, 0.2, forget_term="tnpo")


def test_tnpo_at_the_reference_equals_ga_in_value_and_gradient():
    """p = p_ref everywhere (ce_base = the model's own CE, as at step 0 of training): w = 1, so tnpo = ga."""
    torch.manual_seed(2)
    logits = torch.randn(2, 5, 7, requires_grad=True)
    ids, cls = torch.randint(0, 7, (2, 5)), torch.tensor([[0, 1, -1, -1, 1], [0, -1, 1, 1, -1]])
    out = {}
    for term in ("ga", "tnpo"):
        ce = token_cross_entropy(logits, ids)
        loss = forgetting_loss(ce, cls, 0.3, ce_base=ce.detach(), forget_term=term, beta=2.0).loss
        out[term] = (loss.detach(), torch.autograd.grad(loss, logits)[0])
    torch.testing.assert_close(out["tnpo"][0], out["ga"][0])
    torch.testing.assert_close(out["tnpo"][1], out["ga"][1])


def test_soft_weights_scale_each_token():
    """weights [[0, 1, .5, .2], [0, .25, 1, 0]], ga, lambda 0.2:
    learn = (1 * 1.0 + 0.2 * 3.0 + 1 * 0.5) / 3 = 0.7; forget = -(0.5 * 2.0 + 0.25 * 4.0) / 2 = -1.0;
    loss = 0.7 - 0.2 = 0.5. `ignore` keeps the learn part: 0.7; `sft` ignores weights: 2.1."""
    w = torch.tensor([[0.0, 1.0, 0.5, 0.2], [0.0, 0.25, 1.0, 0.0]])
    assert forgetting_loss(LOSS, CLS, 0.2, weight=w).loss.item() == pytest.approx(0.5)
    assert ignore_loss(LOSS, CLS, 0.2, weight=w).loss.item() == pytest.approx(0.7)
    assert sft_loss(LOSS, CLS, 0.2, weight=w).loss.item() == pytest.approx(2.1)


def test_token_cross_entropy_hand_values():
    """Vocabulary of 2. Position 0 logits [0, ln 3] predict token 1: p = 3/4, CE = ln(4/3).
    Position 1 logits [0, 0] predict token 0: p = 1/2, CE = ln 2. Position 0 itself has no prediction: 0."""
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0], [5.0, -5.0]]])
    ids = torch.tensor([[0, 1, 0]])
    expected = torch.tensor([[0.0, math.log(4 / 3), math.log(2.0)]])
    torch.testing.assert_close(token_cross_entropy(logits, ids), expected)
    torch.testing.assert_close(token_cross_entropy(logits, ids, chunk_size=1), expected)


def test_ignore_gives_negative_tokens_zero_gradient():
    """d loss / d logits at the position that predicts a negative token is exactly 0 for `ignore`,
    and not 0 for `forget`."""
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5, requires_grad=True)
    ids = torch.tensor([[1, 2, 3, 4]])
    cls = torch.tensor([[0, 1, -1, 1]])  # token 2 is negative; it is predicted from position 1
    ignore_loss(token_cross_entropy(logits, ids), cls, 0.25).loss.backward()
    assert torch.count_nonzero(logits.grad[0, 1]) == 0
    assert torch.count_nonzero(logits.grad[0, 0]) > 0
    logits.grad = None
    forgetting_loss(token_cross_entropy(logits, ids), cls, 0.25).loss.backward()
    assert torch.count_nonzero(logits.grad[0, 1]) > 0


def test_cosine_and_warmup_constant_schedules():
    """T = 10, t_min 0.05, t_max 0.25.
    cosine: 0.05 + 0.2 (1 - cos(pi t / 10)) / 2: t=0 -> 0.05; t=2 -> 0.05 + 0.1 (1 - 0.8090170) = 0.0690983;
            t=5 -> 0.15; t=10 -> 0.25.
    warmup_constant with warmup 0.2 (2 steps): t=0 -> 0.05, t=1 -> 0.15, t=2 -> 0.25, t=7 -> 0.25."""
    cos = get_schedule("cosine")
    assert [cos(t, 10, 0.05, 0.25) for t in (0, 2, 5, 10)] == pytest.approx([0.05, 0.0690983, 0.15, 0.25])
    warm = get_schedule("warmup_constant", warmup=0.2)
    assert [warm(t, 10, 0.05, 0.25) for t in (0, 1, 2, 7)] == pytest.approx([0.05, 0.15, 0.25, 0.25])
    assert set(SCHEDULES) == {"linear", "constant", "cosine", "warmup_constant"}


def test_linear_schedule():
    """lambda(t) = t_min + (t_max - t_min) t / T with t_min 0.05, t_max 0.25, T = 10: t=0 -> 0.05, t=5 -> 0.15, t=10 -> 0.25"""
    f = get_schedule("linear")
    assert [f(t, 10, 0.05, 0.25) for t in (0, 5, 10)] == pytest.approx([0.05, 0.15, 0.25])
    assert get_schedule("constant")(3, 10, 0.0, 0.25) == 0.25
    with pytest.raises(KeyError, match="unknown lambda schedule"):
        get_schedule("cosine-ish")


def test_linear_cross_entropy_hand_value_and_gradients():
    """hidden [1, 0] and weight rows [0, 0], [ln 3, 0] give logits [0, ln 3]: CE of token 1 = ln(4/3),
    of token 0 = ln 4. Gradients equal autograd through the full logits (fp32, chunks of 2 rows)."""
    from tokenforget.model.head_ce import linear_cross_entropy

    h = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    w = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    out = linear_cross_entropy(h, w, torch.tensor([1, 0]), chunk_size=1)
    torch.testing.assert_close(out, torch.tensor([math.log(4 / 3), math.log(4.0)]))

    torch.manual_seed(0)
    h = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(11, 5, requires_grad=True)
    t, g = torch.randint(0, 11, (7,)), torch.randn(7)
    (torch.nn.functional.cross_entropy(h @ w.T, t, reduction="none") * g).sum().backward()
    want = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    (linear_cross_entropy(h, w, t, chunk_size=2) * g).sum().backward()
    torch.testing.assert_close(h.grad, want[0])  # default fp32 tolerances: only summation order differs
    torch.testing.assert_close(w.grad, want[1])
