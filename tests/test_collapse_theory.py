"""Utilities, the program P_n, limit laws, distances and diagnostics of rlxf.collapse.

Targets are the numbers of methods/reward_collapse.md §4 (rlxf derivations, solver tolerance ±0.001); the issue
asks for agreement within 0.005 on the n = 8 optima.
"""

import logging
import math

import numpy as np
import pytest
import torch
from scipy import stats

from rlxf.collapse import (
    NoClosedFormError,
    binary_rule_utilities,
    diagnose,
    ks_distance,
    limit_law,
    limit_quantiles,
    mean_profiles,
    objective,
    open_closed_gap,
    openness_utility,
    plot_profiles,
    predict_plot,
    prediction_mae,
    profile_error,
    prompt_aware_utilities,
    prompt_aware_utility,
    prompt_independence,
    prompt_type_gap,
    reward_profiles,
    solve,
    utility,
    w1_exact,
    w1_grid,
)

TOL = 0.005  # the tolerance on the spec's 3-decimal table (the solver itself is good to ~1e-4)

# ---- spec §4.1: optimal n = 8 profiles, worst -> best ------------------------------------------------------------
PURE_ROWS = {
    "x": ((("linear", {}),), [0, 0, 0, 0, 1, 1, 1, 1]),
    "log x": ((("log", {}),), [0, 0.064, 0.204, 0.395, 0.605, 0.796, 0.936, 1]),
    "-1/x": ((("inverse", {}),), [0, 0.121, 0.267, 0.421, 0.579, 0.733, 0.879, 1]),
    "x^0.5": ((("power", {"gamma": 0.5}),), [0, 0.011, 0.098, 0.335, 0.665, 0.902, 0.989, 1]),
    "-x^-0.5": ((("neg_power", {"gamma": 0.5}),), [0, 0.101, 0.247, 0.414, 0.586, 0.753, 0.899, 1]),
    "-x^-2": ((("neg_power", {"gamma": 2.0}),), [0, 0.136, 0.280, 0.427, 0.573, 0.720, 0.864, 1]),
    "log σ(x)": ((("logsigmoid", {"c": 1.0}),), [0, 0, 0, 0.236, 0.764, 1, 1, 1]),
    "log σ(2x)": ((("logsigmoid", {"c": 2.0}),), [0, 0, 0.036, 0.351, 0.649, 0.964, 1, 1]),
    "log σ(4x)": ((("logsigmoid", {"c": 4.0}),), [0, 0, 0.195, 0.400, 0.600, 0.805, 1, 1]),
    "log σ(8x)": ((("logsigmoid", {"c": 8.0}),), [0, 0.098, 0.262, 0.421, 0.579, 0.738, 0.902, 1]),
}
EPS_ROWS = {
    "log": (("log", {}), [0, 0, 0.146, 0.373, 0.627, 0.854, 1, 1]),
    "inv": (("inverse", {}), [0, 0.089, 0.241, 0.412, 0.588, 0.759, 0.911, 1]),
    "power(0.5)": (("power", {"gamma": 0.5}), [0, 0, 0.024, 0.301, 0.699, 0.976, 1, 1]),
    "neg_power(0.5)": (("neg_power", {"gamma": 0.5}), [0, 0.055, 0.210, 0.400, 0.600, 0.790, 0.945, 1]),
    "linear": (("linear", {}), [0, 0, 0, 0, 1, 1, 1, 1]),  # x is not smoothed: its ε row is the pure row
}


@pytest.mark.parametrize("row", list(PURE_ROWS))
def test_pure_optimum_n8_matches_spec_table(row):
    ((name, params),), expected = PURE_ROWS[row]
    r = solve(utility(name, **params), 8)
    np.testing.assert_allclose(r, expected, atol=TOL, rtol=0)
    assert np.all(np.diff(r) >= 0), "solve returns the profile sorted ascending"


@pytest.mark.parametrize("row", list(EPS_ROWS))
def test_smoothed_optimum_n8_matches_spec_table(row):
    (name, params), expected = EPS_ROWS[row]
    np.testing.assert_allclose(solve(utility(name, **params), 8, smoothed=True), expected, atol=TOL, rtol=0)


def test_gaps_and_box_agree_on_smoothed_utility():
    # spec §2.5: both methods solve the ε-smoothed program; "gaps" keeps gaps > 0 but may approach 0
    for name, params in [("inverse", {}), ("neg_power", {"gamma": 0.5}), ("log", {})]:
        u = utility(name, **params)
        gaps = solve(u, 8, smoothed=True, method="gaps")
        box = solve(u, 8, smoothed=True, method="box")
        np.testing.assert_allclose(gaps, box, atol=TOL, rtol=0)


@pytest.mark.parametrize(
    "o, pure_row, eps_row",
    [(0.0, "x", "linear"), (0.25, "x^0.5", "power(0.5)"), (0.5, "log x", "log"), (0.75, "-x^-0.5", "neg_power(0.5)")]
    + [(1.0, "-1/x", "inv")],
)
@pytest.mark.parametrize("normalise", [True, False])
def test_openness_routing_reproduces_rows(o, pure_row, eps_row, normalise):
    # spec §4.1: o = 0, .25, .5, .75, 1 -> x, x^0.5, log x, −x^−0.5, −1/x (pure) and their ε rows
    u = openness_utility(o, normalise=normalise)
    np.testing.assert_allclose(solve(u, 8), PURE_ROWS[pure_row][1], atol=TOL, rtol=0)
    np.testing.assert_allclose(solve(u, 8, smoothed=True), EPS_ROWS[eps_row][1], atol=TOL, rtol=0)


def test_odd_n_linear_puts_middle_at_half():
    # U = x: the middle value of an odd n is not determined; rlxf returns ½ (spec §2.5)
    np.testing.assert_allclose(solve(utility("linear"), 5), [0, 0, 0.5, 1, 1])


def test_concave_optimum_is_symmetric_and_optimal():
    # Strictly concave U: unique optimum with r_i = 1 − r_{n+1−i}; nudging any interior point lowers S
    u = utility("inverse")
    r = solve(u, 8)
    np.testing.assert_allclose(r, 1 - r[::-1], atol=1e-4, rtol=0)
    best = objective(u, r)
    for i in range(1, 7):
        for step in (-1e-3, 1e-3):
            nudged = r.copy()
            nudged[i] += step
            assert objective(u, nudged) < best


def test_profile_std_gap_and_w1_numbers():
    # spec §4.1: population std x 0.50, log 0.367, −1/x 0.337; gap x vs −1/x 0.202 (pure), 0.186 (ε);
    # W1(Bernoulli(½), Uniform) = 0.25
    assert solve(utility("linear"), 8).std() == pytest.approx(0.50, abs=1e-3)
    assert solve(utility("log"), 8).std() == pytest.approx(0.367, abs=1e-3)
    assert solve(utility("inverse"), 8).std() == pytest.approx(0.337, abs=1e-3)
    x, inv = utility("linear"), utility("inverse")
    assert open_closed_gap(solve(inv, 8)[None], solve(x, 8)[None]) == pytest.approx(0.202, abs=1e-3)
    assert open_closed_gap(solve(inv, 8, True)[None], solve(x, 8, True)[None]) == pytest.approx(0.186, abs=1e-3)
    bernoulli = np.array([0, 0, 0, 0, 1, 1, 1, 1.0])
    assert w1_grid(bernoulli, stats.uniform(0, 1)) == pytest.approx(0.25)
    assert w1_exact(bernoulli, stats.uniform(0, 1)) == pytest.approx(0.25)


# ---- utilities: the forms by hand ---------------------------------------------------------------------------------
def test_training_forms_by_hand():
    d = np.array([0.2, 0.0, -0.1])
    # log, ε = 0.1: log(0.3) − log(0.1) = log 3; Ũ(0) = 0; slope 1/ε = 10 below 0 -> −1
    np.testing.assert_allclose(utility("log")(d), [math.log(3.0), 0.0, -1.0])
    # inverse: 1/ε − 1/(d + ε) = 10 − 1/0.3; slope 1/ε² = 100 -> −10
    np.testing.assert_allclose(utility("inverse")(d), [10 - 1 / 0.3, 0.0, -10.0])
    # power(0.5): √0.3 − √0.1; slope γ·ε^(γ−1) = 0.5/√0.1
    np.testing.assert_allclose(utility("power", gamma=0.5)(d), [0.3**0.5 - 0.1**0.5, 0.0, -0.1 * 0.5 / 0.1**0.5])
    # neg_power(2): ε^−2 − (d + ε)^−2; slope 2·ε^−3 = 2000; compat="repo" slope 1 (the paper's x_inv2)
    np.testing.assert_allclose(utility("neg_power", gamma=2)(d), [100 - 1 / 0.09, 0.0, -200.0])
    np.testing.assert_allclose(utility("neg_power", gamma=2, compat="repo")(d), [100 - 1 / 0.09, 0.0, -0.1])
    # log σ(4x) and x are used as they are, on all of ℝ
    np.testing.assert_allclose(utility("logsigmoid")(d), -np.log1p(np.exp(-4 * d)))
    np.testing.assert_allclose(utility("linear")(d), d)
    # pure forms
    np.testing.assert_allclose(utility("inverse").pure(np.array([0.5, 2.0])), [-2.0, -0.5])


def test_training_form_on_tensors_matches_numpy_and_autograd_matches_grad():
    d = np.linspace(-0.5, 1.0, 31)
    for u in [utility("log"), utility("inverse"), utility("power", gamma=0.3), utility("neg_power", gamma=1.5)]:
        t = torch.tensor(d, requires_grad=True)
        torch.testing.assert_close(u(t), torch.tensor(u(d)))
        u(t).sum().backward()
        torch.testing.assert_close(t.grad, torch.tensor(u.grad(d)))


@pytest.mark.parametrize("o, name", [(0.0, "linear"), (0.5, "log"), (1.0, "inverse")])
def test_boxcox_equals_named_forms_at_the_ends_and_middle(o, name):
    # spec §2.4: the normalised Box–Cox form equals x, log and inv exactly at o = 0, ½, 1, ε included
    d = np.linspace(-0.5, 1.0, 31)
    np.testing.assert_allclose(openness_utility(o)(d), utility(name)(d), atol=1e-12, rtol=1e-12)


def test_boxcox_is_scaled_raw_form():
    # ((d+ε)^λ − ε^λ)/λ = U_raw/|λ| on both sides of 0 (λ = 0.5: power(0.5); λ = −0.5: neg_power(0.5))
    d = np.linspace(-0.5, 1.0, 31)
    np.testing.assert_allclose(openness_utility(0.25)(d), utility("power", gamma=0.5)(d) / 0.5)
    np.testing.assert_allclose(openness_utility(0.75)(d), utility("neg_power", gamma=0.5)(d) / 0.5)


def test_utility_errors_speak():
    with pytest.raises(ValueError, match="choose one of"):
        utility("cubic")
    with pytest.raises(ValueError, match="needs gamma="):
        utility("power")
    with pytest.raises(ValueError, match="0 < gamma < 1"):
        utility("power", gamma=1.0)
    with pytest.raises(ValueError, match="unknown"):
        utility("log", gamma=0.5)
    assert utility("log", gamma=None, c=None) == utility("log")  # a CLI passes unset options as None
    with pytest.raises(ValueError, match="openness"):
        openness_utility(1.5)
    with pytest.raises(ValueError, match="eps=None"):
        solve(utility("log", eps=None), 8, smoothed=True)


def test_prompt_aware_precedence_and_fallback(caplog):
    # openness wins over prompt_type; closed -> x, open -> −1/x; neither -> o = ½ (log), counted in the log
    assert prompt_aware_utility("closed") == utility("linear")
    assert prompt_aware_utility("open") == utility("inverse")
    assert prompt_aware_utility("closed", openness=1.0) == openness_utility(1.0)
    with caplog.at_level(logging.WARNING, logger="rlxf.collapse.utilities"):
        us = prompt_aware_utilities(["open", None, "closed"], [None, None, 0.25])
    assert us == [utility("inverse"), openness_utility(0.5), openness_utility(0.25)]
    assert "1 of 3 prompts" in caplog.text
    assert binary_rule_utilities() == {"closed": utility("linear"), "open": utility("inverse")}


# ---- limit laws (spec §4.2, §4.3) ---------------------------------------------------------------------------------
# (utility, target law or None for limit_law(u), KS at n = 200, W1_grid at n = 200), spec §4.3
CONVERGENCE_200 = [
    (("power", {"gamma": 0.5}), None, 0.005, 0.0001),
    (("log", {}), None, 0.005, 0.0005),
    (("neg_power", {"gamma": 0.5}), None, 0.008, 0.0032),
    (("inverse", {}), None, 0.020, 0.012),
    (("neg_power", {"gamma": 2.0}), None, 0.006, 0.0021),
]


@pytest.mark.parametrize("spec", CONVERGENCE_200, ids=lambda s: s[0][0] + str(s[0][1].get("gamma", "")))
def test_optimum_converges_to_limit_law_n200(spec):
    (name, params), _, ks_max, w1_max = spec
    u = utility(name, **params)
    r = solve(u, 200)
    law = limit_law(u)
    # the table is rounded to its last digit: allow half a unit of it
    assert 1 / 200 - 1e-9 <= ks_distance(r, law) <= ks_max + 0.0005
    assert w1_grid(r, law) <= w1_max + 0.00005 if w1_max < 0.001 else w1_grid(r, law) <= w1_max + 0.0005


def test_wrong_target_is_far_and_limit_law_stops_at_gamma_one():
    # −x^−2 converges to Uniform, not to the Beta(1.5, 1.5) the γ ≤ 1 formula would give (KS .063, W1 .040)
    r = solve(utility("neg_power", gamma=2.0), 200)
    assert ks_distance(r, stats.beta(1.5, 1.5)) > 0.05
    assert w1_grid(r, stats.beta(1.5, 1.5)) > 0.03
    assert limit_law(utility("neg_power", gamma=2.0)).dist.name == "uniform"
    assert limit_law(utility("neg_power", gamma=0.5)).args == (0.75, 0.75)
    assert limit_law(utility("power", gamma=0.5)).args == (0.25, 0.25)
    assert limit_law(openness_utility(0.5)).args == (0.5, 0.5)


def test_n500_fast_cases():
    # spec §4.3 at n = 500 (log: KS .002; −1/x: KS .015, W1 .0095); solves in well under a second each
    r = solve(utility("log"), 500)
    assert ks_distance(r, stats.beta(0.5, 0.5)) <= 0.0025
    r = solve(utility("inverse"), 500)
    assert ks_distance(r, stats.uniform(0, 1)) <= 0.0155
    assert w1_grid(r, stats.uniform(0, 1)) <= 0.0100


@pytest.mark.parametrize("c, mass", [(1.0, 0.383), (2.0, 0.300), (4.0, 0.204), (8.0, 0.125)])
def test_logsigmoid_atoms_n500(c, mass):
    # spec §4.2: log σ(cx) has atoms at 0 and 1 of about these masses at n = 500 (±0.003)
    r = solve(utility("logsigmoid", c=c), 500)
    assert np.mean(r <= 1e-6) == pytest.approx(mass, abs=0.003)
    assert np.mean(r >= 1 - 1e-6) == pytest.approx(mass, abs=0.003)


def test_limit_quantiles():
    # x -> Bernoulli(½): quantiles at (i − ½)/n are 0 for the lower half, 1 above
    np.testing.assert_allclose(limit_quantiles(utility("linear"), 4), [0, 0, 1, 1])
    # −1/x -> Uniform: quantiles are (i − ½)/n
    np.testing.assert_allclose(limit_quantiles(utility("inverse"), 4), [0.125, 0.375, 0.625, 0.875])
    # arcsine law: F⁻¹(q) = sin²(πq/2)
    q = (np.arange(1, 6) - 0.5) / 5
    np.testing.assert_allclose(limit_quantiles(utility("log"), 5), np.sin(np.pi * q / 2) ** 2)
    with pytest.raises(NoClosedFormError, match="no closed-form"):
        limit_quantiles(utility("logsigmoid"), 8)


# ---- distances: naive twins ---------------------------------------------------------------------------------------
def test_distances_match_loops():
    rng = np.random.default_rng(0)
    profiles = np.sort(rng.uniform(size=(3, 10)), axis=-1)
    law = stats.beta(0.5, 0.5)
    for s, ks, w1 in zip(profiles, ks_distance(profiles, law), w1_grid(profiles, law)):
        n = len(s)
        ks_loop = max(max(i / n - law.cdf(s[i - 1]), law.cdf(s[i - 1]) - (i - 1) / n) for i in range(1, n + 1))
        w1_loop = sum(abs(s[i - 1] - law.ppf((i - 0.5) / n)) for i in range(1, n + 1)) / n
        assert ks == pytest.approx(ks_loop)
        assert w1 == pytest.approx(w1_loop)
        # W1_exact against a fine Riemann sum of |F_s − F|
        x = np.linspace(0, 1, 400_001)
        riemann = np.abs(np.searchsorted(s, x, side="right") / n - law.cdf(x)).mean()
        assert w1_exact(s, law) == pytest.approx(riemann, abs=1e-4)
    assert prediction_mae(profiles, profiles[0]).shape == (3,)
    assert prediction_mae(profiles[0], profiles[0]) == 0


def test_w1_exact_for_log_matches_spec():
    # spec §4.3: W1_exact for log is 0.0053 (n = 50) and 0.0013 (n = 200)
    law = stats.beta(0.5, 0.5)
    assert w1_exact(solve(utility("log"), 50), law) == pytest.approx(0.0053, abs=0.0001)
    assert w1_exact(solve(utility("log"), 200), law) == pytest.approx(0.0013, abs=0.0001)


# ---- diagnostics --------------------------------------------------------------------------------------------------
def _noisy(row, p, scale, seed):
    rng = np.random.default_rng(seed)
    return np.clip(np.asarray(row)[None] + scale * rng.standard_normal((p, len(row))), 0, 1)


def test_reward_profiles_sorts_and_masks():
    rewards = torch.tensor([[0.9, 0.1, 0.5, 7.0], [0.2, 0.8, 0.3, float("nan")]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, False]])
    np.testing.assert_allclose(reward_profiles(rewards, mask), [[0.1, 0.5, 0.9], [0.2, 0.3, 0.8]], rtol=1e-6)
    with pytest.raises(ValueError, match="different numbers"):
        reward_profiles(rewards, torch.tensor([[True] * 4, [True, True, True, False]]))


def test_profile_statistics_by_hand():
    profiles = np.array([[0.0, 0.2, 1.0], [0.0, 0.4, 1.0]])
    # mean profile (0, .3, 1) vs prediction (0, .5, 1): MAE = .2 / 3
    assert profile_error(profiles, np.array([0.0, 0.5, 1.0])) == pytest.approx(0.2 / 3)
    # population std over prompts per index: (0, .1, 0) -> mean .1 / 3
    assert prompt_independence(profiles) == pytest.approx(0.1 / 3)
    # gap: |.2 − .4| at the middle index only -> .2 / 3
    assert prompt_type_gap(profiles, ["open", "closed"]) == pytest.approx(0.2 / 3)
    means = mean_profiles(profiles, ["open", "closed"])
    assert means["all"]["count"] == 2 and means["open"]["count"] == 1
    np.testing.assert_allclose(means["all"]["mean"], [0, 0.3, 1])


def test_diagnose_collapsed_fixed_utility_passes():
    u = utility("log")
    row = solve(u, 8, smoothed=True)
    profiles = np.vstack([_noisy(row, 10, 0.01, 0), _noisy(row, 10, 0.01, 1)])
    report = diagnose(profiles, ["open"] * 10 + ["closed"] * 10, u)
    assert not report["prompt_aware"]
    assert report["gap"] < 0.03 and report["predicted_gap"] == 0
    assert report["profile_mae"]["all"] < 0.01
    assert report["checks"] == {"profile_mae": True, "prompt_independence": True, "gap": True}


def test_diagnose_prompt_aware():
    mapping = binary_rule_utilities()
    closed, open_ = solve(mapping["closed"], 8, True), solve(mapping["open"], 8, True)
    profiles = np.vstack([_noisy(closed, 6, 0.01, 0), _noisy(open_, 6, 0.01, 1)])
    types = ["closed"] * 6 + ["open"] * 6
    report = diagnose(profiles, types, mapping)
    assert report["prompt_aware"] and "all" not in report["profile_mae"]
    assert report["predicted_gap"] == pytest.approx(0.186, abs=1e-3)
    assert report["gap"] == pytest.approx(0.186, abs=0.01)
    assert all(report["checks"].values())
    # collapsed profiles under a prompt-aware utility fail the gap check
    collapsed = diagnose(np.vstack([_noisy(open_, 6, 0.01, 2), _noisy(open_, 6, 0.01, 3)]), types, mapping)
    assert not collapsed["checks"]["gap"] and not collapsed["checks"]["profile_mae"]


def test_plots_write_png(tmp_path):
    u = utility("inverse")
    row = solve(u, 8, smoothed=True)
    profiles = np.vstack([_noisy(row, 4, 0.02, 0), _noisy(row, 4, 0.02, 1)])
    types = ["open"] * 4 + ["closed"] * 4
    path = plot_profiles(profiles, types, tmp_path / "profiles.png", predictions=row)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pred = predict_plot(u, 8, tmp_path / "sub" / "predict.png")
    assert (tmp_path / "sub" / "predict.png").read_bytes()[:4] == b"\x89PNG"
    np.testing.assert_allclose(pred["pure"], PURE_ROWS["-1/x"][1], atol=TOL)
    np.testing.assert_allclose(pred["smoothed"], EPS_ROWS["inv"][1], atol=TOL)
    assert pred["limit_law"].startswith("uniform")
    assert predict_plot(utility("logsigmoid"), 8, tmp_path / "ls.png")["limit_quantiles"] is None
