"""The objectives and schedules against values worked out by hand."""

import math

import pytest
import torch

from tokenforget.losses import (
    OBJECTIVES,
    TokenCounts,
    forgetting_loss,
    get_schedule,
    ignore_loss,
    sft_loss,
    token_cross_entropy,
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


def test_registry_has_the_three_modes():
    assert set(OBJECTIVES) == {"forget", "ignore", "sft"}


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
    from tokenforget.losses import linear_cross_entropy

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
