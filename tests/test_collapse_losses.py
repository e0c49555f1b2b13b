"""Ranking losses of rlxf.collapse: naive float64 loop twins, hand values, invariances, and free-logit runs that
must reach the optimum of the program P_n (methods/reward_collapse.md §2.2, §4.4)."""

import math

import numpy as np
import pytest
import torch

from rlxf.collapse import (
    openness_utility,
    pairwise_bt_loss,
    plackett_luce_loss,
    prompt_aware_utilities,
    solve,
    utility,
    utility_ranking_loss,
)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: extra intra-op threads only cost time on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MIXED = [utility("linear"), utility("inverse"), utility("log"), openness_utility(0.25), utility("logsigmoid")]


def _batch(seed=0, p=5, k=6):
    """Rewards in (0, 1), ragged K (mask), scores with ties, junk under the mask."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(p, k, generator=g, dtype=torch.float64) * 0.98 + 0.01
    lengths = torch.tensor([k, k - 1, 3, 2, k])[:p]
    mask = torch.arange(k)[None] < lengths[:, None]  # (P, K)
    scores = torch.randint(0, 4, (p, k), generator=g).to(torch.float64)  # small range -> ties
    rewards = torch.where(mask, rewards, torch.full_like(rewards, float("nan")))
    return rewards, mask, scores


def _ranking_loss_loop(rewards, mask, scores, utilities, reduction):
    """The plainest loop: per prompt, every valid pair with score_i > score_j contributes −U_p(r_i − r_j)."""
    per_prompt, all_terms = [], []
    for p in range(rewards.shape[0]):
        terms = []
        for i in range(rewards.shape[1]):
            for j in range(rewards.shape[1]):
                if mask[p, i] and mask[p, j] and scores[p, i] > scores[p, j]:
                    d = float(rewards[p, i] - rewards[p, j])
                    terms.append(-float(utilities[p](np.float64(d))))
        if terms:
            per_prompt.append(sum(terms) / len(terms))
        all_terms += terms
    if reduction == "prompt":
        return sum(per_prompt) / len(per_prompt)
    return sum(all_terms) / len(all_terms)


@pytest.mark.parametrize("reduction", ["prompt", "pairs"])
def test_ranking_loss_matches_loop_in_mixed_batch(reduction):
    rewards, mask, scores = _batch()
    loss, stats = utility_ranking_loss(rewards, MIXED, mask=mask, scores=scores, reduction=reduction)
    expected = _ranking_loss_loop(rewards, mask, scores, MIXED, reduction)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    assert 0 <= stats["rewards/accuracies"] <= 1 and not stats["rewards/pairs"].requires_grad


def test_ranking_loss_is_utility_per_prompt():
    # "prompt" reduction of a mixed batch = mean of the single-prompt losses, each with its own U; same gradients
    rewards, mask, scores = _batch(seed=1)
    r = rewards.clone().requires_grad_()
    loss, _ = utility_ranking_loss(r, MIXED, mask=mask, scores=scores)
    loss.backward()
    r1 = rewards.clone().requires_grad_()
    singles = [
        utility_ranking_loss(r1[p : p + 1], MIXED[p], mask=mask[p : p + 1], scores=scores[p : p + 1])[0]
        for p in range(5)
    ]
    torch.stack(singles).mean().backward()
    torch.testing.assert_close(loss, torch.stack(singles).mean().detach())
    torch.testing.assert_close(torch.nan_to_num(r.grad), torch.nan_to_num(r1.grad))
    # one utility for the batch = the same utility repeated per prompt
    one = utility_ranking_loss(rewards, utility("inverse"), mask=mask, scores=scores)[0]
    torch.testing.assert_close(
        one, utility_ranking_loss(rewards, [utility("inverse")] * 5, mask=mask, scores=scores)[0]
    )


def test_ranking_loss_by_hand_and_ties_skipped():
    # r = (0.7, 0.2), best first, log with ε = 0.1: −(log(0.5 + 0.1) − log 0.1) = −log 6
    loss, stats = utility_ranking_loss(torch.tensor([[0.7, 0.2]], dtype=torch.float64), utility("log"))
    torch.testing.assert_close(loss, torch.tensor(-math.log(6.0), dtype=torch.float64))
    assert stats["rewards/accuracies"] == 1 and stats["rewards/margins"] == pytest.approx(0.5)
    # three completions, the last two tied: only (0, 1) and (0, 2) count; U = x -> −((.9 − .5) + (.9 − .1))/2
    rewards = torch.tensor([[0.9, 0.5, 0.1]], dtype=torch.float64)
    scores = torch.tensor([[2.0, 1.0, 1.0]])
    loss, stats = utility_ranking_loss(rewards, utility("linear"), scores=scores)
    torch.testing.assert_close(loss, torch.tensor(-0.6, dtype=torch.float64))
    assert stats["rewards/pairs"] == 2
    # a prompt whose completions all tie adds no pair and is left out of the "prompt" mean
    both = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.6, 0.2]], dtype=torch.float64)
    scores2 = torch.tensor([[2.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(utility_ranking_loss(both, utility("linear"), scores=scores2)[0], loss)


def test_ranking_loss_ignores_entries_outside_mask():
    rewards, mask, scores = _batch(seed=2)
    clean = torch.where(mask, rewards, torch.full_like(rewards, 0.5)).requires_grad_()
    junk = torch.where(mask, rewards, torch.full_like(rewards, float("inf"))).requires_grad_()
    a, _ = utility_ranking_loss(clean, MIXED, mask=mask, scores=scores)
    b, _ = utility_ranking_loss(junk, MIXED, mask=mask, scores=scores)
    a.backward()
    b.backward()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(clean.grad, junk.grad)
    assert not clean.grad[~mask].any()
    with pytest.raises(ValueError, match="one per prompt"):
        utility_ranking_loss(clean, MIXED[:2], mask=mask)


def _pl_loop(logits, mask, scores):
    """Plackett–Luce with Breslow ties: each valid item k adds logsumexp over valid items j with s_j ≤ s_k, − a_k."""
    nlls = []
    for p in range(logits.shape[0]):
        items = [k for k in range(logits.shape[1]) if mask[p, k]]
        if len(items) < 2:
            continue
        nll = 0.0
        for k in items:
            risk = [float(logits[p, j]) for j in items if scores[p, j] <= scores[p, k]]
            nll += math.log(sum(math.exp(a) for a in risk)) - float(logits[p, k])
        nlls.append(nll)
    return sum(nlls) / len(nlls)


def test_plackett_luce_matches_loop_and_by_hand():
    _, mask, scores = _batch(seed=3)
    logits = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    loss, _ = plackett_luce_loss(logits, mask=mask, scores=scores)
    torch.testing.assert_close(loss, torch.tensor(_pl_loop(logits, mask, scores), dtype=torch.float64))
    # K = 2, no ties: PL = −log σ(a_1 − a_2) = BT; with a = (1, 0): log(1 + e^−1)
    two = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(
        plackett_luce_loss(two)[0], torch.tensor(math.log1p(math.exp(-1.0)), dtype=torch.float64)
    )
    # K = 3, a = (0, 0, 0): −log(1/3 · 1/2 · 1) = log 6
    torch.testing.assert_close(plackett_luce_loss(torch.zeros(1, 3))[0], torch.tensor(math.log(6.0)))


def test_pairwise_bt_matches_loop():
    _, mask, scores = _batch(seed=4)
    logits = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 3
    bt = utility("logsigmoid", c=1.0)  # −log σ(d) = −U(d) for U = log σ(x): the same loop serves
    for reduction in ("prompt", "pairs"):
        loss, stats = pairwise_bt_loss(logits, mask=mask, scores=scores, reduction=reduction)
        expected = _ranking_loss_loop(logits, mask, scores, [bt] * 5, reduction)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))


# ---- free logits (spec §4.4): one free logit per completion, r = σ(a), must reach the program's optimum ----------
def _train_free_logits(utilities, p, steps=1500, lr=0.2, seed=0):
    """Adam on one free logit per completion. The spec runs 64 × 8 for 20k steps at lr 0.05; a cosine-decayed
    lr 0.2 with β2 = 0.99 gets there in 1.5k steps: the fast-adapting second moment keeps pushing logits of
    completions whose optimal reward is 0 or 1 into saturation, where their gradient shrinks like σ(1 − σ)."""
    g = torch.Generator().manual_seed(seed)
    a = (0.1 * torch.randn(p, 8, generator=g, dtype=torch.float64)).requires_grad_()  # a₀ ~ N(0, 0.1²)
    opt = torch.optim.Adam([a], lr=lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t / steps)))
    for _ in range(steps):
        loss, _ = utility_ranking_loss(torch.sigmoid(a), utilities)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return torch.sigmoid(a).detach().sort(-1).values.numpy()  # (P, 8) profiles, ascending


@pytest.mark.parametrize(
    "name, params",
    [("linear", {}), ("log", {}), ("inverse", {}), ("power", {"gamma": 0.5}), ("neg_power", {"gamma": 0.5})]
    + [("logsigmoid", {"c": 4.0})],
)
def test_free_logits_reach_the_optimum(name, params):
    torch.manual_seed(0)
    u = utility(name, **params)
    profiles = _train_free_logits(u, p=16)
    target = solve(u, 8, smoothed=True)
    assert np.abs(profiles - target).max() <= 0.005
    assert (profiles.max(0) - profiles.min(0)).max() <= 0.004  # collapse: every prompt has the same profile


def test_free_logits_prompt_aware_each_type_reaches_its_own_optimum():
    # closed -> x, open -> −1/x, routed per prompt inside one batch; the gap is 0.186 (spec §4.4)
    types = ["closed", "open"] * 8
    profiles = _train_free_logits(prompt_aware_utilities(types), p=16)
    closed, open_ = profiles[0::2], profiles[1::2]
    assert np.abs(closed - solve(utility("linear"), 8, smoothed=True)).max() <= 0.005
    assert np.abs(open_ - solve(utility("inverse"), 8, smoothed=True)).max() <= 0.005
    assert np.abs(open_.mean(0) - closed.mean(0)).mean() == pytest.approx(0.186, abs=0.002)


def test_free_logits_openness_routing():
    # o = 0, .25, .5, .75, 1 in one batch: each prompt reaches the ε row of x, x^0.5, log, −x^−0.5, −1/x
    opens = [0.0, 0.25, 0.5, 0.75, 1.0] * 2
    profiles = _train_free_logits(prompt_aware_utilities(openness=opens), p=10)
    rows = [
        utility("linear"),
        utility("power", gamma=0.5),
        utility("log"),
        utility("neg_power", gamma=0.5),
        utility("inverse"),
    ]
    for i, o in enumerate(opens):
        assert np.abs(profiles[i] - solve(rows[i % 5], 8, smoothed=True)).max() <= 0.005, f"o = {o}"
