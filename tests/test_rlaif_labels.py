"""RLAIF label math (rlxf.feedback.label_math): hand-computed values from the spec (§4) and naive float64 loop twins."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from rlxf.feedback import debias, preference_from_logprobs
from rlxf.feedback.label_math import (
    alignment,
    binomial_test_two_sided,
    check_ending_tokenization,
    direct_reward,
    expected_calibration_error,
    expected_score,
    invert_for_harmless,
    label_logprobs,
    label_logprobs_from_topk,
    label_prob,
    label_token_ids,
    position_bias,
    reliability_bins,
    same_position,
    self_consistency,
    single_order,
    split_ten,
)
from rlxf.feedback.prompts import HARMLESS_BASE, LabellingTemplate
from rlxf.models.tiny import train_tokenizer

NAN = float("nan")


def t64(*xs):
    return torch.tensor(xs, dtype=torch.float64)


# --- one order ---------------------------------------------------------------------------------------------------------


def test_preference_from_logprobs_by_hand():
    # ℓ₁ = −0.5, ℓ₂ = −1.5: p = e^−0.5 / (e^−0.5 + e^−1.5) = σ(1) = 0.731059 (spec §4)
    torch.testing.assert_close(preference_from_logprobs(t64(-0.5), t64(-1.5)), t64(1 / (1 + math.exp(-1.0))))
    torch.testing.assert_close(preference_from_logprobs(t64(-0.5), t64(-1.5)), t64(0.731059), atol=1e-6, rtol=0)
    # a missing label (−inf) gives 0 or 1; both missing is an invalid order (NaN)
    p = preference_from_logprobs(t64(-math.inf, -1.0, -math.inf), t64(-1.0, -math.inf, -math.inf))
    torch.testing.assert_close(p, t64(0.0, 1.0, NAN), equal_nan=True)


def test_preference_from_logprobs_matches_loop():
    torch.manual_seed(0)
    l1, l2 = torch.randn(50, dtype=torch.float64) * 3, torch.randn(50, dtype=torch.float64) * 3
    loop = t64(*[math.exp(a) / (math.exp(a) + math.exp(b)) for a, b in zip(l1.tolist(), l2.tolist())])
    torch.testing.assert_close(preference_from_logprobs(l1, l2), loop)
    # shift invariance: only ℓ₁ − ℓ₂ matters (softmax over the two label tokens only)
    torch.testing.assert_close(preference_from_logprobs(l1 - 7.0, l2 - 7.0), loop)


# --- both orders -------------------------------------------------------------------------------------------------------


def test_debias_by_hand():
    # ½·[0.8 + (1 − 0.6)] = 0.6 ; ½·[0.9 + (1 − 0.3)] = 0.8 (spec §4)
    torch.testing.assert_close(debias(t64(0.8, 0.9), t64(0.6, 0.3)), t64(0.6, 0.8))
    # geometric: σ(½·[logit 0.9 − logit 0.3]) = σ(½·[2.197225 + 0.847298]) = σ(1.522261) = 0.820871
    torch.testing.assert_close(debias(t64(0.9), t64(0.3), "geometric"), t64(0.820871), atol=1e-6, rtol=0)
    # symmetry: swapping the orders of a pair gives P(b ≻ a) = 1 − P(a ≻ b)
    torch.testing.assert_close(debias(t64(0.6), t64(0.8)), 1 - debias(t64(0.8), t64(0.6)))
    with pytest.raises(ValueError, match="method"):
        debias(t64(0.5), t64(0.5), "harmonic")  # type: ignore[arg-type]


def test_debias_matches_loop():
    torch.manual_seed(1)
    p_ab, p_ba = torch.rand(40, dtype=torch.float64), torch.rand(40, dtype=torch.float64)
    arith = [0.5 * (a + 1 - b) for a, b in zip(p_ab.tolist(), p_ba.tolist())]
    logit = lambda p: math.log(p / (1 - p))
    geo = [1 / (1 + math.exp(-0.5 * (logit(a) - logit(b)))) for a, b in zip(p_ab.tolist(), p_ba.tolist())]
    torch.testing.assert_close(debias(p_ab, p_ba), t64(*arith))
    torch.testing.assert_close(debias(p_ab, p_ba, "geometric"), t64(*geo))


def test_debias_uses_the_valid_order_alone():
    # order (b, a) invalid: P(a ≻ b) = p_ab; order (a, b) invalid: 1 − p_ba; both invalid: NaN (spec §2.4)
    p_ab, p_ba = t64(0.8, NAN, NAN), t64(NAN, 0.3, NAN)
    torch.testing.assert_close(debias(p_ab, p_ba), t64(0.8, 0.7, NAN), equal_nan=True)
    torch.testing.assert_close(debias(p_ab, p_ba, "geometric"), t64(0.8, 0.7, NAN), equal_nan=True)
    assert single_order(p_ab, p_ba).tolist() == [True, True, False]


def test_harmless_inversion():
    # P(a more harmful) = 0.7 ⇒ p_a = 0.3 (spec §4); the flag comes from the preamble
    torch.testing.assert_close(invert_for_harmless(t64(0.7)), t64(0.3))
    torch.testing.assert_close(invert_for_harmless(t64(0.7), invert=False), t64(0.7))
    # end to end: the labeller calls a (listed first) more harmful with 0.9, and again (listed second) with 1 − 0.3
    template = LabellingTemplate("harmless", HARMLESS_BASE)
    p_a = invert_for_harmless(debias(t64(0.9), t64(0.3)), template.invert)  # 1 − 0.8
    torch.testing.assert_close(p_a, t64(0.2))


# --- diagnostics and metrics ----------------------------------------------------------------------------------------

# Position-bias set of spec §4: P(a) = 0.75, 0.55, 0.375, 0.30
P_AB, P_BA = t64(0.8, 0.7, 0.2, 0.5), t64(0.3, 0.6, 0.45, 0.9)


def test_position_bias_set_by_hand():
    torch.testing.assert_close(debias(P_AB, P_BA), t64(0.75, 0.55, 0.375, 0.30))
    # F (orders disagree), T (slot 1 both times), T (slot 2 both times), F (first order is a tie at ½)
    assert same_position(P_AB, P_BA).tolist() == [False, True, True, False]
    stats = position_bias(P_AB, P_BA)
    torch.testing.assert_close(stats["rate"], t64(0.5).squeeze())
    torch.testing.assert_close(stats["slot1_share"], t64(0.5).squeeze())
    assert (int(stats["n_biased"]), int(stats["n_slot1"]), int(stats["n_evaluated"])) == (2, 1, 4)
    # an invalid order removes the pair from the denominator
    stats = position_bias(torch.cat([P_AB, t64(NAN)]), torch.cat([P_BA, t64(0.9)]))
    assert int(stats["n_evaluated"]) == 4


def test_binomial_test_by_hand():
    # 1 of 2 at p = ½: every outcome is at most as likely, so p-value = 1
    assert math.isclose(binomial_test_two_sided(1, 2), 1.0)
    # 9 of 10: P(X ≥ 9) + P(X ≤ 1) = 2·(1 + 10)/1024
    assert math.isclose(binomial_test_two_sided(9, 10), 22 / 1024)
    # 94 of 100 (PaLM 2 L's slot-1 share): tiny p-value
    assert binomial_test_two_sided(94, 100) < 1e-15


def test_binomial_test_large_n_matches_exact_rationals():
    # n beyond ~1030 overflowed a float pmf; compare with exact integer arithmetic at p = ½
    n, k = 2000, 1050
    pmf = [math.comb(n, i) for i in range(n + 1)]  # × 2⁻ⁿ, exact
    exact = Fraction(sum(c for c in pmf if c <= pmf[k]), 2**n)
    assert math.isclose(binomial_test_two_sided(k, n), float(exact), rel_tol=1e-9)
    assert math.isclose(binomial_test_two_sided(n // 2, n), 1.0, rel_tol=1e-9)
    with pytest.raises(ValueError, match="0 < p < 1"):
        binomial_test_two_sided(1, 2, p=1.0)


def test_alignment_by_hand():
    # AI picks a, a, b, b; humans a, b, b, a ⇒ right, wrong, right, wrong = 50% (spec §4)
    out = alignment(debias(P_AB, P_BA), [True, False, False, True])
    torch.testing.assert_close(out["accuracy"], t64(0.5).squeeze())
    assert int(out["n_ties"]) == 0 and int(out["n"]) == 4
    # a tie (p_a = ½) counts wrong whatever the human chose; an invalid pair (NaN) is excluded
    out = alignment(t64(0.5, 0.5, 0.9, NAN), [True, False, True, True])
    torch.testing.assert_close(out["accuracy"], t64(1 / 3).squeeze())
    assert int(out["n_ties"]) == 2 and int(out["n"]) == 3


def test_label_prob():
    torch.testing.assert_close(label_prob(t64(0.2, 0.5, 0.9)), t64(0.8, 0.5, 0.9))


def test_calibration_by_hand():
    # bins of width 0.1 on [0.5, 1]: 0.55 → bin 0 (wrong), 0.65 → bin 1 (right), 0.92 and 0.96 → bin 4 (one right)
    conf, correct = t64(0.55, 0.65, 0.92, 0.96), [False, True, True, False]
    bins = reliability_bins(conf, correct, n_bins=5)
    torch.testing.assert_close(bins["count"], t64(1, 1, 0, 0, 2))
    torch.testing.assert_close(bins["confidence"], t64(0.55, 0.65, NAN, NAN, 0.94), equal_nan=True)
    torch.testing.assert_close(bins["accuracy"], t64(0, 1, NAN, NAN, 0.5), equal_nan=True)
    # ECE = (1·0.55 + 1·0.35 + 2·0.44) / 4 = 1.78 / 4 = 0.445
    torch.testing.assert_close(expected_calibration_error(conf, correct, n_bins=5), t64(0.445).squeeze())
    # confidence exactly 1 falls in the last (closed) bin
    assert reliability_bins(t64(1.0), [True], n_bins=5)["count"].tolist() == [0, 0, 0, 0, 1]


def test_ece_matches_loop():
    torch.manual_seed(2)
    conf = 0.5 + 0.5 * torch.rand(200, dtype=torch.float64)
    correct = (torch.rand(200, dtype=torch.float64) < conf).tolist()
    n_bins, total = 10, 0.0
    for b in range(n_bins):
        lo, hi = 0.5 + 0.05 * b, 0.5 + 0.05 * (b + 1)
        members = [i for i, c in enumerate(conf.tolist()) if lo <= c < hi or (b == n_bins - 1 and c == hi)]
        if members:
            acc = sum(correct[i] for i in members) / len(members)
            mean_conf = sum(conf[i].item() for i in members) / len(members)
            total += len(members) * abs(acc - mean_conf)
    torch.testing.assert_close(expected_calibration_error(conf, correct, n_bins), t64(total / 200).squeeze())


def test_self_consistency_mean_of_samples():
    # (0.6 + 0.8) / 2 = 0.7, the invalid sample skipped; all-invalid rows stay NaN
    p = t64(0.6, 0.8, NAN, NAN, NAN, NAN).reshape(2, 3)
    torch.testing.assert_close(self_consistency(p), t64(0.7, NAN), equal_nan=True)


# --- d-RLAIF -----------------------------------------------------------------------------------------------------------


def test_expected_score_and_reward_by_hand():
    neg = -math.inf
    half = [neg] * 7 + [math.log(0.5)] * 2 + [neg]  # P(8) = P(9) = ½
    uniform = [math.log(0.1)] * 10
    ten = [neg] * 9 + [0.0]
    s = expected_score(t64(half, uniform, ten))
    # s = 8·½ + 9·½ = 8.5; uniform: (1 + … + 10)/10 = 5.5; all on 10: 10
    torch.testing.assert_close(s, t64(8.5, 5.5, 10.0))
    # r = (s − 5.5)/4.5 = 3/4.5 = 0.666667, 0, 1 (spec §4)
    torch.testing.assert_close(direct_reward(s), t64(2 / 3, 0.0, 1.0))
    # renormalised over the ten scores: unnormalised log-probs (total mass ¼ on 8 and 9) give the same s
    torch.testing.assert_close(expected_score(t64([neg] * 7 + [math.log(0.125)] * 2 + [neg])), t64(8.5))
    # "0-9": all mass on 9 gives s = 9 and r = (9 − 4.5)/4.5 = 1; uniform gives 4.5 and 0
    s09 = expected_score(t64([neg] * 9 + [0.0], uniform), scale="0-9")
    torch.testing.assert_close(s09, t64(9.0, 4.5))
    torch.testing.assert_close(direct_reward(s09, scale="0-9"), t64(1.0, 0.0))


def test_expected_score_matches_loop():
    torch.manual_seed(3)
    logp = torch.randn(6, 10, dtype=torch.float64)
    loop = []
    for row in logp.tolist():
        z = sum(math.exp(v) for v in row)
        loop.append(sum((i + 1) * math.exp(v) / z for i, v in enumerate(row)))
    torch.testing.assert_close(expected_score(logp), t64(*loop))
    with pytest.raises(ValueError, match="10 columns"):
        expected_score(torch.zeros(2, 9))


def test_split_ten_by_hand():
    # P("1") = 0.3, q = P("0" | "1") = 0.4: P(10) = 0.12, P(1) = 0.18 (spec §4)
    logp_1, logp_10 = split_ten(t64(math.log(0.3)), t64(math.log(0.4)))
    torch.testing.assert_close(logp_1.exp(), t64(0.18))
    torch.testing.assert_close(logp_10.exp(), t64(0.12))


# --- tokenisation traps with a real BPE tokenizer ----------------------------------------------------------------------

TEXTS = [
    "Preferred Summary=1",
    "Preferred Summary=2",
    "Preferred Response= 1",
    "SCORE: 1",
    "SCORE: 10",
    "answer 1 or 2, rated 10/10",
] * 40


@pytest.fixture(scope="module")
def tok():
    # byte-level BPE trained on texts with "1", " 1" and "10", so the merges "Ġ1", "Ġ2" and "10" exist
    return train_tokenizer(TEXTS, vocab_size=300)


def test_label_token_ids_has_both_variants(tok):
    ids = label_token_ids(tok)
    # bare digit first, then the space-prefixed token (byte-level "Ġ1")
    assert ids == {"1": tok.convert_tokens_to_ids(["1", "Ġ1"]), "2": tok.convert_tokens_to_ids(["2", "Ġ2"])}
    assert len(set(ids["1"])) == 2 and tok.decode(ids["1"][1]) == " 1"
    # "10" and " 10" were merged into single tokens here, so P(10) can be read directly (no `split_ten`)
    assert label_token_ids(tok, ("10",)) == {"10": tok.convert_tokens_to_ids(["10", "Ġ10"])}


def test_label_token_ids_without_merges():
    # no " 1" or "10" in the training texts: " 1" splits into "Ġ" + "1" and is dropped; "10" has no single token
    plain = train_tokenizer(["Preferred Summary=1", "Preferred Summary=2", "3 4 5 6 7 8 9"] * 40, vocab_size=300)
    assert len(plain.encode(" 1", add_special_tokens=False)) == 2
    assert label_token_ids(plain) == {"1": [plain.convert_tokens_to_ids("1")], "2": [plain.convert_tokens_to_ids("2")]}
    with pytest.raises(ValueError, match="'10' is not a single token"):
        label_token_ids(plain, ("9", "10"))
    assert label_token_ids(plain, ("9", "10"), allow_missing=True)["10"] == []


def test_check_ending_tokenization(tok):
    check_ending_tokenization(tok, "Preferred Summary=")  # "=" and "1" stay separate tokens
    check_ending_tokenization(tok, "SCORE:", labels=("1", "10"))
    # a trailing space: "SCORE: 1" is encoded "SCORE", ":", "Ġ1", so the ending's last token "Ġ" is never followed
    # by "1" in real text and reading the label after it would be wrong
    with pytest.raises(ValueError, match="trailing space"):
        check_ending_tokenization(tok, "SCORE: ")


def test_label_logprobs_sum_variants(tok):
    torch.manual_seed(4)
    logp = torch.randn(3, len(tok), dtype=torch.float64).log_softmax(-1)  # (B, V)
    ids = label_token_ids(tok)
    got = label_logprobs(logp, ids)  # (B, 2)
    # ℓ_k = log(P("k") + P(" k"))
    want = [[math.log(sum(math.exp(logp[b, i].item()) for i in ids[k])) for k in ("1", "2")] for b in range(3)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    # a label with no ids gets −inf
    assert torch.isneginf(label_logprobs(logp, {"10": []})).all()


# --- top-k maps with a missing label ----------------------------------------------------------------------------------

TOP5 = {"1": -0.2, "The": -2.5, " 1": -3.0, "\n": -3.5, "**": -4.0}


def test_topk_missing_label_upper_bound_by_hand():
    out = label_logprobs_from_topk(TOP5)
    # ℓ(1) = logsumexp(−0.2, −3.0) = −0.140967
    assert math.isclose(out.logprobs[0], math.log(math.exp(-0.2) + math.exp(-3.0)))
    assert math.isclose(out.logprobs[0], -0.140967, abs_tol=1e-6)
    # returned mass 0.999116 ⇒ ℓ(2) = min(−4.0, log 0.000884) = −7.030875
    mass = sum(math.exp(v) for v in TOP5.values())
    assert math.isclose(out.logprobs[1], math.log(1 - mass)) and math.isclose(out.logprobs[1], -7.030875, abs_tol=1e-6)
    assert out.imputed and out.valid
    p = preference_from_logprobs(*out.logprobs)
    torch.testing.assert_close(p, t64(0.998983).squeeze(), atol=1e-6, rtol=0)


def test_topk_missing_label_other_modes():
    # k-th log-prob only: ℓ(2) = −4.0 ⇒ p = σ(−0.140967 + 4.0) = 0.979347 (spec §4)
    out = label_logprobs_from_topk(TOP5, mode="kth")
    assert out.logprobs[1] == -4.0 and out.imputed
    torch.testing.assert_close(preference_from_logprobs(*out.logprobs), t64(0.979347).squeeze(), atol=1e-6, rtol=0)
    # drop: one missing label invalidates the order
    assert not label_logprobs_from_topk(TOP5, mode="drop").valid


def test_topk_edge_cases():
    # both labels present: no imputation
    out = label_logprobs_from_topk({"1": -0.5, " 2": -1.5, "x": -3.0})
    assert out.logprobs == (-0.5, -1.5) and not out.imputed and out.valid
    # both missing: invalid, NaN log-probs, and the order is skipped by debias
    out = label_logprobs_from_topk({"The": -0.1, "A": -2.5})
    assert not out.valid and all(math.isnan(v) for v in out.logprobs)
    p_ab = preference_from_logprobs(*out.logprobs)
    torch.testing.assert_close(debias(p_ab, t64(0.3).squeeze()), t64(0.7).squeeze())
    # returned mass rounds to 1: the missing mass is floored at min_missing_mass, not log(0) = −inf
    out = label_logprobs_from_topk({"1": 0.0}, min_missing_mass=1e-12)
    assert out.logprobs[1] == math.log(1e-12)
    with pytest.raises(ValueError, match="mode"):
        label_logprobs_from_topk(TOP5, mode="guess")  # type: ignore[arg-type]
