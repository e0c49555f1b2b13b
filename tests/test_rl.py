import math

import pytest
import torch

from rlxf.rl import (
    ADVANTAGE_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    discounted_returns,
    entropy_from_logits,
    explained_variance,
    gae,
    get_advantage_estimator,
    grpo_advantages,
    kl_penalty,
    masked_mean,
    masked_reduce,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    register_advantage,
    reinforce_advantages,
    rloo_advantages,
    token_rewards_with_kl,
    value_loss,
)

F64 = torch.float64


def ragged_masks(b: int, t: int, g: torch.Generator) -> torch.Tensor:
    """(b, t) masks mixing right padding, a prompt region before the response, left padding and a hole."""
    pos = torch.arange(t)
    rows = []
    for i in range(b):
        start, stop = sorted(torch.randint(0, t + 1, (2,), generator=g).tolist())
        if i % 4 == 0:
            start = 0  # right padding only
        if i % 4 == 1:
            stop = t  # left padding
        row = (pos >= start) & (pos < stop)
        if i % 4 == 3 and stop - start > 2:
            row[start + 1] = False  # a hole inside the response (e.g. a tool output), skipped by the scan
        rows.append(row)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------------------------------------
# masked_reduce / masked_mean / whitening
# ---------------------------------------------------------------------------------------------------------------------


def test_masked_reduce_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    # token: (1 + 2 + 3 + 4) / 4 masked tokens = 2.5
    torch.testing.assert_close(masked_reduce(x, mask, "token"), torch.tensor(2.5, dtype=F64))
    # sequence: row means 2 and 4, then their mean = 3
    torch.testing.assert_close(masked_reduce(x, mask, "sequence"), torch.tensor(3.0, dtype=F64))
    # an empty row does not count as a sequence: still 3
    mask3, x3 = torch.cat([mask, torch.zeros(1, 4, dtype=torch.bool)]), torch.cat([x, torch.ones(1, 4, dtype=F64)])
    torch.testing.assert_close(masked_reduce(x3, mask3, "sequence"), torch.tensor(3.0, dtype=F64))
    # an empty mask gives 0, not nan
    for reduction in ("token", "sequence"):
        assert masked_reduce(x, torch.zeros_like(mask), reduction) == 0
    # float weights: weighted mean (0.5·1 + 1·2) / 1.5 = 5/3
    w = torch.tensor([[0.5, 1.0, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(masked_reduce(x[:1], w, "token"), torch.tensor(5 / 3, dtype=F64))
    with pytest.raises(ValueError, match="'token' or 'sequence'"):
        masked_reduce(x, mask, "tokens")


def test_masked_reduce_ignores_junk_outside_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, dtype=F64, generator=g)
    mask = ragged_masks(4, 6, g)
    mask[0, 0] = True
    junk = torch.where(mask, x, torch.tensor([math.nan, math.inf, -math.inf] * 8, dtype=F64).view(4, 6))
    for reduction in ("token", "sequence"):
        torch.testing.assert_close(masked_reduce(junk, mask, reduction), masked_reduce(x, mask, reduction))
    torch.testing.assert_close(masked_mean(junk, mask, dim=-1), masked_mean(x, mask, dim=-1))


def test_masked_reduce_global_counts_make_accumulation_exact():
    # Two micro-batches reduced with the optimiser step's counts add up to the full batch's reduction.
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, dtype=F64, generator=g)
    mask = ragged_masks(6, 5, g)
    mask[0] = True
    n_tok, n_seq = mask.sum(), mask.any(-1).sum()
    parts = [(x[:2], mask[:2]), (x[2:], mask[2:])]
    torch.testing.assert_close(
        sum(masked_reduce(xp, mp, "token", num_tokens=n_tok) for xp, mp in parts), masked_reduce(x, mask, "token")
    )
    torch.testing.assert_close(
        sum(masked_reduce(xp, mp, "sequence", num_sequences=n_seq) for xp, mp in parts),
        masked_reduce(x, mask, "sequence"),
    )
    with pytest.raises(ValueError, match="num_sequences"):
        masked_reduce(x, mask, "sequence", num_tokens=n_tok)


def test_masked_reduce_matches_loop():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(7, 9, dtype=F64, generator=g)
    mask = ragged_masks(7, 9, g)
    xs, ms = x.tolist(), mask.tolist()
    vals = [v for xr, mr in zip(xs, ms) for v, m in zip(xr, mr) if m]
    rows = [[v for v, m in zip(xr, mr) if m] for xr, mr in zip(xs, ms)]
    rows = [r for r in rows if r]
    torch.testing.assert_close(masked_reduce(x, mask, "token"), torch.tensor(sum(vals) / len(vals), dtype=F64))
    seq = sum(sum(r) / len(r) for r in rows) / len(rows)
    torch.testing.assert_close(masked_reduce(x, mask, "sequence"), torch.tensor(seq, dtype=F64))
    mean = sum(vals) / len(vals)
    torch.testing.assert_close(
        masked_var(x, mask), torch.tensor(sum((v - mean) ** 2 for v in vals) / len(vals), dtype=F64)
    )
    unbiased = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
    torch.testing.assert_close(masked_var(x, mask, unbiased=True), torch.tensor(unbiased, dtype=F64))


def test_masked_whiten_matches_loop_and_ignores_junk():
    g = torch.Generator().manual_seed(3)
    x = 3.0 + 2.0 * torch.randn(5, 8, dtype=F64, generator=g)
    mask = ragged_masks(5, 8, g)
    vals = [v for xr, mr in zip(x.tolist(), mask.tolist()) for v, m in zip(xr, mr) if m]
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals) + 1e-8)
    expected = [[(v - mean) / std if m else 0.0 for v, m in zip(xr, mr)] for xr, mr in zip(x.tolist(), mask.tolist())]
    got = masked_whiten(x, mask)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64))
    torch.testing.assert_close(masked_mean(got, mask), torch.tensor(0.0, dtype=F64))
    torch.testing.assert_close(masked_var(got, mask), torch.tensor(1.0, dtype=F64))
    # shift_mean=False keeps the mean: (x − μ)/σ + μ
    kept = masked_whiten(x, mask, shift_mean=False)
    torch.testing.assert_close(kept, torch.where(mask, got + mean, 0))
    torch.testing.assert_close(masked_mean(kept, mask), torch.tensor(mean, dtype=F64))
    junk = torch.where(mask, x, 1e6)
    torch.testing.assert_close(masked_whiten(junk, mask), got)


# ---------------------------------------------------------------------------------------------------------------------
# GAE and returns
# ---------------------------------------------------------------------------------------------------------------------


def gae_loop(rewards, values, mask, gamma, lam):
    """The plainest GAE: walk each row's masked positions backwards; V after the last one is 0."""
    b, t = len(rewards), len(rewards[0])
    adv, ret = [[0.0] * t for _ in range(b)], [[0.0] * t for _ in range(b)]
    for i in range(b):
        steps = [j for j in range(t) if mask[i][j]]
        next_value, last_adv = 0.0, 0.0
        for j in reversed(steps):
            delta = rewards[i][j] + gamma * next_value - values[i][j]
            last_adv = delta + gamma * lam * last_adv
            adv[i][j], ret[i][j] = last_adv, last_adv + values[i][j]
            next_value = values[i][j]
    return adv, ret


def test_gae_by_hand():
    # γ = 0.9, λ = 0.5, r = (0, 0, 1), V = (0.5, 0.2, 0.4), V after the end = 0:
    # δ2 = 1 + 0 − 0.4 = 0.6;  δ1 = 0 + 0.9·0.4 − 0.2 = 0.16;  δ0 = 0 + 0.9·0.2 − 0.5 = −0.32
    # A2 = 0.6;  A1 = 0.16 + 0.45·0.6 = 0.43;  A0 = −0.32 + 0.45·0.43 = −0.1265;  R = A + V = (0.3735, 0.63, 1.0)
    # The row sits after a 1-token prompt and before 1 padding token: both come back 0.
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]], dtype=F64)
    values = torch.tensor([[9.0, 0.5, 0.2, 0.4, 9.0]], dtype=F64)
    mask = torch.tensor([[False, True, True, True, False]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, -0.1265, 0.43, 0.6, 0.0]], dtype=F64))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.3735, 0.63, 1.0, 0.0]], dtype=F64))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_loop(gamma, lam):
    g = torch.Generator().manual_seed(4)
    rewards, values = torch.randn(8, 11, dtype=F64, generator=g), torch.randn(8, 11, dtype=F64, generator=g)
    mask = ragged_masks(8, 11, g)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    exp_adv, exp_ret = gae_loop(rewards.tolist(), values.tolist(), mask.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(exp_adv, dtype=F64))
    torch.testing.assert_close(ret, torch.tensor(exp_ret, dtype=F64))


def test_gae_ignores_positions_outside_mask():
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 7), torch.randn(3, 7)
    mask = torch.arange(7) < torch.tensor([[3], [7], [5]])  # (3, 7), right padding
    mask[0, 0] = False  # and a prompt token
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    for junk in (1e3 * torch.randn(3, 7), torch.full((3, 7), math.nan), torch.full((3, 7), math.inf)):
        junk_r, junk_v = (torch.where(mask, x, junk) for x in (rewards, values))
        adv_j, ret_j = gae(junk_r, junk_v, mask, gamma=1.0, lam=0.95)
        torch.testing.assert_close((adv, ret), (adv_j, ret_j))
    assert not adv[~mask].any() and not ret[~mask].any()


def test_gae_same_trajectory_in_any_layout():
    # One 4-token trajectory, right-padded, after a prompt, left-padded: same advantages on its tokens.
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(4, dtype=F64, generator=g), torch.randn(4, dtype=F64, generator=g)
    rewards, values = torch.zeros(3, 7, dtype=F64), torch.zeros(3, 7, dtype=F64)
    mask = torch.zeros(3, 7, dtype=torch.bool)
    for row, start in enumerate((0, 2, 3)):
        rewards[row, start : start + 4], values[row, start : start + 4], mask[row, start : start + 4] = r, v, True
    adv, ret = gae(rewards, values, mask, gamma=0.97, lam=0.9)
    torch.testing.assert_close(adv[mask].view(3, 4), adv[0, :4].expand(3, 4))
    torch.testing.assert_close(ret[mask].view(3, 4), ret[0, :4].expand(3, 4))


def test_gae_is_detached():
    values = torch.randn(2, 3, requires_grad=True)
    adv, ret = gae(torch.randn(2, 3), values, torch.ones(2, 3, dtype=torch.bool), 1.0, 0.95)
    assert not adv.requires_grad and not ret.requires_grad


def test_discounted_returns_and_reinforce():
    # γ = 0.5, r = (1, 2, 4): G = (1 + 0.5·2 + 0.25·4, 2 + 0.5·4, 4) = (3, 4, 4)
    rewards = torch.tensor([[1.0, 2.0, 4.0, 7.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(discounted_returns(rewards, mask, 0.5), torch.tensor([[3.0, 4.0, 4.0, 0.0]], dtype=F64))
    # with a baseline V = (1, 1, 1): A = G − V = (2, 3, 3)
    values = torch.tensor([[1.0, 1.0, 1.0, 5.0]], dtype=F64)
    got = reinforce_advantages(rewards, mask, 0.5, values)
    torch.testing.assert_close(got, torch.tensor([[2.0, 3.0, 3.0, 0.0]], dtype=F64))
    # twin: REINFORCE with a baseline is GAE with λ = 1, on random ragged batches
    g = torch.Generator().manual_seed(6)
    rewards, values = torch.randn(6, 9, dtype=F64, generator=g), torch.randn(6, 9, dtype=F64, generator=g)
    mask = ragged_masks(6, 9, g)
    torch.testing.assert_close(
        reinforce_advantages(rewards, mask, 0.9, values), gae(rewards, values, mask, 0.9, 1.0)[0]
    )
    torch.testing.assert_close(
        reinforce_advantages(rewards, mask, 0.9), gae(rewards, torch.zeros_like(values), mask, 0.9, 1.0)[0]
    )


# ---------------------------------------------------------------------------------------------------------------------
# Outcome advantages (registry)
# ---------------------------------------------------------------------------------------------------------------------


def test_rloo_by_hand_and_loop():
    # scores (1, 2, 6): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5 -> A = (−3, −1.5, 4.5)
    torch.testing.assert_close(rloo_advantages(torch.tensor([[1.0, 2.0, 6.0]])), torch.tensor([[-3.0, -1.5, 4.5]]))
    rewards = torch.randn(5, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    expected = [[r[i] - (sum(r) - r[i]) / 3 for i in range(4)] for r in rewards.tolist()]
    torch.testing.assert_close(rloo_advantages(rewards), torch.tensor(expected, dtype=F64))
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(torch.ones(3, 1))


def test_grpo_matches_loop():
    rewards = torch.randn(4, 5, dtype=F64, generator=torch.Generator().manual_seed(1))
    expected = []
    for r in rewards.tolist():
        mean = sum(r) / len(r)
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / (len(r) - 1))
        expected.append([(x - mean) / (std + 1e-6) for x in r])
    torch.testing.assert_close(grpo_advantages(rewards), torch.tensor(expected, dtype=F64))
    assert not grpo_advantages(torch.ones(2, 3)).any()  # equal scores: no signal, not nan


def test_advantage_registry():
    assert get_advantage_estimator("rloo") is rloo_advantages
    assert get_advantage_estimator("grpo") is grpo_advantages
    with pytest.raises(ValueError, match=r"unknown advantage estimator 'rlo'.*'grpo', 'rloo'"):
        get_advantage_estimator("rlo")
    before = dict(ADVANTAGE_ESTIMATORS)
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("rloo")(lambda r: r)
    assert ADVANTAGE_ESTIMATORS == before  # the failed registration changed nothing


# ---------------------------------------------------------------------------------------------------------------------
# PPO losses
# ---------------------------------------------------------------------------------------------------------------------


def test_ppo_policy_loss_by_hand():
    # ε = 0.2; per token max(−Aρ, −A clip(ρ, 0.8, 1.2)):
    # row 0: A=+1, ρ=1.5: max(−1.5, −1.2) = −1.2 (clipped)    A=−1, ρ=0.5: max(0.5, 0.8) = 0.8 (clipped)
    #        A=+2, ρ=1:   −2 (not clipped)                     4th token masked out (junk)
    # row 1: A=+1, ρ=0.5: max(−0.5, −0.8) = −0.5 (unclipped)  A=−1, ρ=1.5: max(1.5, 1.2) = 1.5 (unclipped)
    # token:    (−1.2 + 0.8 − 2 − 0.5 + 1.5) / 5 = −0.28
    # sequence: ((−1.2 + 0.8 − 2) / 3 + (−0.5 + 1.5) / 2) / 2 = (−0.8 + 0.5) / 2 = −0.15
    # clip_frac = 2/5; approx_kl = mean of (ρ − 1) − log ρ = (2·(0.5 − log 1.5) + 2·(−0.5 − log 0.5) + 0) / 5
    ratio = torch.tensor([[1.5, 0.5, 1.0, 3.0], [0.5, 1.5, 1.0, 1.0]], dtype=F64)
    old = torch.randn(2, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([[1.0, -1.0, 2.0, 50.0], [1.0, -1.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    logprobs = (old + ratio.log()).requires_grad_()
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(-0.28, dtype=F64))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(0.4, dtype=F64))
    kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 - math.log(0.5))) / 5
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(kl, dtype=F64))
    assert not stats["clip_frac"].requires_grad and not stats["approx_kl"].requires_grad
    # d/dlogπ of −Aρ is −Aρ, / 5 tokens; clipped tokens get no gradient
    loss.backward()
    expected_grad = torch.tensor([[0.0, 0.0, -2.0, 0.0], [-0.5, 1.5, 0.0, 0.0]], dtype=F64) / 5
    torch.testing.assert_close(logprobs.grad, expected_grad)
    loss_seq, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.2, reduction="sequence")
    torch.testing.assert_close(loss_seq, torch.tensor(-0.15, dtype=F64))


def test_ppo_policy_loss_matches_loop():
    g = torch.Generator().manual_seed(7)
    logprobs, old, adv = (torch.randn(5, 6, dtype=F64, generator=g) * 0.3 for _ in range(3))
    mask = ragged_masks(5, 6, g)
    mask[0] = True
    per_row = []
    for lp, op, a, m in zip(logprobs.tolist(), old.tolist(), adv.tolist(), mask.tolist()):
        terms = []
        for lpt, opt, at, mt in zip(lp, op, a, m):
            if mt:
                rho = math.exp(lpt - opt)
                terms.append(max(-at * rho, -at * min(max(rho, 0.9), 1.1)))
        per_row.append(terms)
    flat = [x for row in per_row for x in row]
    nonempty = [row for row in per_row if row]
    for reduction, expected in [
        ("token", sum(flat) / len(flat)),
        ("sequence", sum(sum(r) / len(r) for r in nonempty) / len(nonempty)),
    ]:
        loss, _ = ppo_policy_loss(logprobs, old, adv, mask, clip_eps=0.1, reduction=reduction)
        torch.testing.assert_close(loss, torch.tensor(expected, dtype=F64))


def test_value_loss_by_hand():
    # ε = 0.2; per token ½ max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±0.2):
    # V=0.5,  V_old=0,   R=1: V_clip=0.2:  max(0.25, 0.64) = 0.64 (clipped term larger)
    # V=1.0,  V_old=0.9, R=1: V_clip=1.0:  max(0, 0) = 0
    # V=−0.5, V_old=0,   R=0: V_clip=−0.2: max(0.25, 0.04) = 0.25
    # token: ½ (0.64 + 0 + 0.25) / 3;  sequence (rows {1st, 2nd}, {3rd}): ½ ((0.64 + 0) / 2 + 0.25) / 2 = 0.1425
    # clip_frac = 1/3; error = (0.25 + 0 + 0.25) / 3 = 1/6
    # explained variance: R = (1, 1, 0): Var = 2/9; R − V = (0.5, 0, 0.5): Var = 1/18; 1 − (1/18)/(2/9) = 0.75
    values = torch.tensor([[0.5, 1.0], [-0.5, 9.0]], dtype=F64, requires_grad=True)
    old = torch.tensor([[0.0, 0.9], [0.0, -9.0]], dtype=F64)
    returns = torch.tensor([[1.0, 1.0], [0.0, 3.0]], dtype=F64)
    mask = torch.tensor([[True, True], [True, False]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 0.89 / 3, dtype=F64))
    torch.testing.assert_close(stats["clip_frac"], torch.tensor(1 / 3, dtype=F64))
    torch.testing.assert_close(stats["error"], torch.tensor(1 / 6, dtype=F64))
    torch.testing.assert_close(stats["explained_variance"], torch.tensor(0.75, dtype=F64))
    loss_seq, _ = value_loss(values, old, returns, mask, clip_eps=0.2, reduction="sequence")
    torch.testing.assert_close(loss_seq, torch.tensor(0.1425, dtype=F64))
    # the clipped token gets no gradient (V_clip does not depend on V there); the 3rd gets ½·2(V − R)/3 = −0.5/3 = −1/6
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.0], [-1 / 6, 0.0]], dtype=F64))
    # ε = inf: plain ½ MSE = ½ (0.25 + 0 + 0.25) / 3
    loss_inf, stats_inf = value_loss(values, old, returns, mask, clip_eps=math.inf)
    torch.testing.assert_close(loss_inf, torch.tensor(0.5 / 6, dtype=F64))
    assert stats_inf["clip_frac"] == 0


def test_explained_variance_constant_returns_is_nan():
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert explained_variance(torch.randn(1, 3), torch.ones(1, 3), mask).isnan()
    returns = torch.randn(2, 3)
    torch.testing.assert_close(
        explained_variance(returns, returns, torch.ones(2, 3, dtype=torch.bool)), torch.tensor(1.0)
    )


# ---------------------------------------------------------------------------------------------------------------------
# KL, entropy, KL-shaped rewards, controllers
# ---------------------------------------------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    # π = 0.5, π_ref = 0.25, r = π_ref/π = 0.5:
    # k1 = log π − log π_ref = log 2;  k2 = ½ (log 0.5)²;  k3 = (0.5 − 1) − log 0.5 = log 2 − 0.5
    lp, ref = torch.tensor([[math.log(0.5)]], dtype=F64), torch.tensor([[math.log(0.25)]], dtype=F64)
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([[math.log(2)]], dtype=F64))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([[0.5 * math.log(0.5) ** 2]], dtype=F64))
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), torch.tensor([[math.log(2) - 0.5]], dtype=F64))
    # equal policies: every estimator is 0
    for est in ("k1", "k2", "k3"):
        assert not kl_penalty(lp, lp, est).any()
    with pytest.raises(ValueError, match=r"unknown KL estimator 'kl'.*'k1', 'k2', 'k3'"):
        kl_penalty(lp, ref, "kl")


def test_kl_k3_nonnegative_and_k1_k3_unbiased():
    g = torch.Generator().manual_seed(8)
    lp, ref = torch.randn(50, 20, dtype=F64, generator=g), torch.randn(50, 20, dtype=F64, generator=g)
    assert (kl_penalty(lp, ref, "k3") >= 0).all()
    assert (kl_penalty(lp, ref, "k1") < 0).any()  # k1 alone can be negative
    # exact expectation over x ~ π of a categorical: E[k1] = E[k3] = KL(π ‖ π_ref) = Σ π log(π / π_ref)
    log_pi = torch.randn(8, dtype=F64, generator=g).log_softmax(-1)
    log_ref = torch.randn(8, dtype=F64, generator=g).log_softmax(-1)
    kl = sum(p * (math.log(p) - math.log(q)) for p, q in zip(log_pi.exp().tolist(), log_ref.exp().tolist()))
    for est in ("k1", "k3"):
        torch.testing.assert_close(
            (log_pi.exp() * kl_penalty(log_pi, log_ref, est)).sum(), torch.tensor(kl, dtype=F64)
        )


def test_entropy_from_logits_matches_loop():
    g = torch.Generator().manual_seed(9)
    logits = 3 * torch.randn(6, 3, 7, dtype=F64, generator=g)  # 6 rows: more than one chunk
    expected = []
    for row in logits.tolist():
        expected.append([])
        for pos in row:
            z = sum(math.exp(v) for v in pos)
            expected[-1].append(-sum(math.exp(v) / z * (v - math.log(z)) for v in pos))
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor(expected, dtype=F64))
    # uniform over V = 7: log 7, computed in float32 from bfloat16 logits
    uniform = entropy_from_logits(torch.zeros(2, 3, 7, dtype=torch.bfloat16))
    assert uniform.dtype == torch.float32
    torch.testing.assert_close(uniform, torch.full((2, 3), math.log(7)))


def test_token_rewards_with_kl():
    kl = torch.tensor([[0.1, 0.2, 0.3, 99.0], [0.4, 0.5, 99.0, 99.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    # scalar scores (2, −1) go on the last response token; −β·KL with β = 0.5 everywhere on the mask
    got = token_rewards_with_kl(torch.tensor([2.0, -1.0], dtype=F64), kl, 0.5, mask)
    expected = torch.tensor([[-0.05, -0.1, 2 - 0.15, 0.0], [-0.2, -1 - 0.25, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(got, expected)
    # dense rewards stay where they are
    dense = torch.tensor([[1.0, 0.0, 0.0, 5.0], [0.0, 3.0, 5.0, 5.0]], dtype=F64)
    got = token_rewards_with_kl(dense, kl, torch.tensor(0.5, dtype=F64), mask)
    expected = torch.tensor([[1 - 0.05, -0.1, -0.15, 0.0], [-0.2, 3 - 0.25, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(got, expected)


def test_adaptive_kl_controller():
    # β = 0.1, target 6, horizon 10 000, 512 samples: KL = 12 -> e = clip(12/6 − 1, ±0.2) = 0.2,
    # β ← 0.1 · (1 + 0.2 · 512 / 10 000) = 0.1 · 1.01024
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    assert math.isclose(ctl.update(12.0, 512), 0.1 * 1.01024)
    assert ctl.update(6.0, 512) == ctl.value == 0.1 * 1.01024  # on target: no change
    before = ctl.value
    # KL = 3 -> e = 3/6 − 1 = −0.5, clipped to −0.2: β shrinks
    assert math.isclose(ctl.update(3.0, 512), before * (1 - 0.2 * 512 / 10_000))
    # KL = 6.6 -> e = 0.1 (within the clip): β grows by 0.1 · 512/10 000
    before = ctl.value
    assert math.isclose(ctl.update(6.6, 512), before * (1 + 0.1 * 512 / 10_000))
    restored = AdaptiveKLController(1.0, target=6.0, horizon=10_000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 512) == fixed.value == 0.05
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
