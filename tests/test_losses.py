import math

import pytest
import torch

from rlxf.losses import bradley_terry_loss, bradley_terry_losses, pairwise_accuracy, reward_centering_penalty


def test_bradley_terry_by_hand():
    # d = 1 - 0 = 1 with a hard label: loss = -log σ(1) = log(1 + e^-1)
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]))
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(-1.0))))
    # d = 0 with label_prob = 0.5: cross-entropy of a fair coin = log 2
    loss = bradley_terry_loss(torch.zeros(1), torch.zeros(1), label_prob=torch.tensor([0.5]))
    torch.testing.assert_close(loss, torch.tensor(math.log(2.0)))
    # margin 2 turns d = 1 into d = -1: loss = log(1 + e^1)
    loss = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([2.0]))
    torch.testing.assert_close(loss, torch.tensor(math.log1p(math.exp(1.0))))
    # soft label p = 0.8 on d = 2: -(0.8 log σ(2) + 0.2 log σ(-2))
    expected = -(0.8 * math.log(1 / (1 + math.exp(-2))) + 0.2 * math.log(1 / (1 + math.exp(2))))
    loss = bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), label_prob=torch.tensor([0.8]))
    torch.testing.assert_close(loss, torch.tensor(expected))


def test_bradley_terry_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    c, r, m = (torch.randn(16, dtype=torch.float64, generator=g) for _ in range(3))
    p = torch.rand(16, dtype=torch.float64, generator=g)
    expected = []
    for ci, ri, mi, pi in zip(c.tolist(), r.tolist(), m.tolist(), p.tolist()):
        d = ci - ri - mi
        sig = 1.0 / (1.0 + math.exp(-d))
        expected.append(-(pi * math.log(sig) + (1 - pi) * math.log(1 - sig)))
    got = bradley_terry_losses(c, r, margin=m, label_prob=p)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(bradley_terry_loss(c, r, m, p), torch.tensor(expected, dtype=torch.float64).mean())


def test_label_prob_one_equals_hard_label():
    g = torch.Generator().manual_seed(1)
    c, r = torch.randn(8, generator=g), torch.randn(8, generator=g)
    torch.testing.assert_close(bradley_terry_loss(c, r, label_prob=torch.ones(8)), bradley_terry_loss(c, r))


def test_bradley_terry_is_stable_for_large_gaps():
    loss = bradley_terry_losses(torch.tensor([-200.0, 200.0]), torch.tensor([0.0, 0.0]))
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss[0], torch.tensor(200.0))


def test_centering_and_accuracy_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, -3.0])
    # pairs 1 and 4 right, pair 2 wrong, pair 3 a tie (counts half): (1 + 0 + 0.5 + 1) / 4
    assert pairwise_accuracy(chosen, rejected).item() == pytest.approx(0.625)
    torch.testing.assert_close(reward_centering_penalty(chosen, rejected), torch.tensor([1.0, 1.0, 16.0, 4.0]))


def test_pairwise_accuracy_reductions_by_hand():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0, 1.0]), torch.tensor([0.0, 1.0, 2.0, -3.0])
    assert pairwise_accuracy(chosen, rejected, reduction="none").tolist() == [1.0, 0.0, 0.5, 1.0]
    assert pairwise_accuracy(chosen, rejected, reduction="sum").item() == 2.5
    with pytest.raises(ValueError, match="reduction"):
        pairwise_accuracy(chosen, rejected, reduction="prompt")
    # float64 stays float64 (ranking rewards); integer scores still count a tie as 0.5
    assert pairwise_accuracy(chosen.double(), rejected.double()).dtype == torch.float64
    assert pairwise_accuracy(torch.tensor([2, 1]), torch.tensor([2, 3])).item() == pytest.approx(0.25)


def test_pairwise_accuracy_over_all_pairs_of_rankings_by_hand():
    # two prompts, columns best -> worst: [3, 1, 1] has pairs (0,1) right, (0,2) right, (1,2) a tie;
    # [0, 2, 5] has all three pairs wrong
    values = torch.tensor([[3.0, 1.0, 1.0], [0.0, 2.0, 5.0]])  # (P, K)
    hits = pairwise_accuracy(values[:, :, None], values[:, None, :], reduction="none")  # (P, K, K)
    above = torch.ones(3, 3, dtype=torch.bool).triu(1)  # column i ranked above column j
    assert hits[:, above].sum(-1).tolist() == [2.5, 0.0]
    assert (hits[:, above].sum() / above.sum() / 2).item() == pytest.approx(2.5 / 6)
