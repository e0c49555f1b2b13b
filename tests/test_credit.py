"""Tests for rlxf.credit: segmenters and the sign-agreement mask (spec adaptive_segment_reward.md §2.3-2.5, §4)."""

from __future__ import annotations

import math

import pytest
import torch

from rlxf.credit.segments import (
    CreditConfig,
    Segment,
    agreement_mask,
    centred_mean,
    hysteresis_pivots,
    merge_short,
    segment,
    step_boundaries,
)
from rlxf.logprobs import sequence_logprobs, weighted_sequence_logprobs

# Spec §4 worked example (the batch is this one sequence).
WORKED = [0.6, 0.5, 0.7, 0.4, -0.1, 0.5, -0.9, -1.2, -0.8, 0.3, 0.6, 0.5, 0.2, -0.6, 0.4]


def _row(values, dtype=torch.float64):
    r = torch.tensor([values], dtype=dtype)
    return r, torch.ones_like(r, dtype=torch.bool)


def _spans(segs):
    return [(s.start, s.end) for s in segs]


def _bits(keep):
    return "".join(str(int(x)) for x in keep.tolist())


def _naive_segments(r, tau, granularity, ends=None, window=3, min_len=2):
    """Plain-loop twin of one row (valid tokens only), written from the spec pseudo-code §2.7: list of (a, b, R)."""
    n = len(r)
    if n == 0:
        return []
    if granularity == "sequence":
        starts = [0]
    elif granularity == "token":
        starts = list(range(n))
    elif granularity == "step":
        starts = [0] + [t + 1 for t in range(n - 1) if ends[t]]
    else:
        h = window // 2
        s = []
        for t in range(n):
            win = [r[j] for j in range(t - h, t + h + 1) if 0 <= j < n]
            s.append(sum(win) / len(win))
        starts, side = [0], 0
        for t in range(n):
            if side == 0 and abs(s[t]) > tau:
                side = 1 if s[t] > 0 else -1
            elif side > 0 and s[t] < -tau:
                starts.append(t)
                side = -1
            elif side < 0 and s[t] > tau:
                starts.append(t)
                side = 1
        while len(starts) > 1:
            bounds = list(zip(starts, starts[1:] + [n]))
            short = [k for k, (a, b) in enumerate(bounds) if b - a < min_len]
            if not short:
                break
            k = short[0]
            del starts[1 if k == 0 else k]
    bounds = list(zip(starts, starts[1:] + [n]))
    return [(a, b, sum(r[a:b]) / (b - a)) for a, b in bounds]


def _naive_tau(rows, scale=0.1):
    flat = [x for row in rows for x in row]
    mu = sum(flat) / len(flat)
    return scale * math.sqrt(sum((x - mu) ** 2 for x in flat) / len(flat))


# ---------------------------------------------------------------------------------------------------------------------
# Worked example and building blocks
# ---------------------------------------------------------------------------------------------------------------------


def test_worked_example_segments_and_masks():
    r, m = _row(WORKED)
    # Pivots at 5, 10, 14 -> [0,5) [5,10) [10,14) [14,15); the singleton [14,15) merges left.
    # R = mean(.6,.5,.7,.4,-.1) = .42; mean(.5,-.9,-1.2,-.8,.3) = -.42; mean(.6,.5,.2,-.6,.4) = .22.
    (segs,) = segment(r, m, "segment")
    assert _spans(segs) == [(0, 5), (5, 10), (10, 15)]
    torch.testing.assert_close(torch.stack([s.reward for s in segs]), torch.tensor([0.42, -0.42, 0.22]).double())
    assert _bits(agreement_mask(r, m, torch.tensor([1]), "segment")[0]) == "111110000011111"
    assert _bits(agreement_mask(r, m, torch.tensor([-1]), "segment")[0]) == "000001111100000"
    assert _bits(agreement_mask(r, m, torch.tensor([1]), "token")[0]) == "111101000111101"
    assert _bits(agreement_mask(r, m, torch.tensor([-1]), "token")[0]) == "000010111000010"


def test_worked_example_smoothing_and_pivots():
    r, m = _row(WORKED)
    s = centred_mean(r, m)
    expected = [0.55, 0.6, 1.6 / 3, 1.0 / 3, 0.8 / 3, -0.5 / 3, -1.6 / 3, -2.9 / 3, -1.7 / 3, 0.1 / 3, 1.4 / 3]
    expected += [1.3 / 3, 0.1 / 3, 0.0, -0.1]  # edges average only the 2 tokens that exist
    torch.testing.assert_close(s[0], torch.tensor(expected, dtype=torch.float64))
    tau = 0.1 * r.std(correction=0)  # 0.061043
    torch.testing.assert_close(tau, torch.tensor(0.0610428, dtype=torch.float64), rtol=0, atol=1e-6)
    assert hysteresis_pivots(s, m, tau)[0].nonzero().flatten().tolist() == [5, 10, 14]


def test_merge_short():
    assert merge_short([0, 5, 10, 14], 15) == [0, 5, 10]  # last singleton into its left neighbour
    assert merge_short([0, 1, 5], 8) == [0, 5]  # first singleton into its right neighbour
    # [0,3) [3,4) [4,5) [5,8): leftmost short [3,4) joins [0,3) -> [0,4) [4,5) [5,8); then [4,5) joins [0,4)
    assert merge_short([0, 3, 4, 5], 8) == [0, 5]
    assert merge_short([0, 1], 2) == [0]  # two singletons become one segment
    assert merge_short([0], 1) == [0]  # a lone short segment stays
    assert merge_short([0, 1, 2], 3, min_len=1) == [0, 1, 2]  # min_len 1: no merge


def test_step_split():
    ends = step_boundaries([["x", "=", "3", ";", " y", "=", "4", ".\n", "done"], ["a", "!  ", "", "b?"]])
    assert ends.shape == (2, 9)
    assert ends[0].nonzero().flatten().tolist() == [3, 7]
    assert ends[1].nonzero().flatten().tolist() == [1, 3]  # trailing whitespace stripped; ragged row padded False
    r = torch.arange(9, dtype=torch.float64)[None]
    (segs,) = segment(r, torch.ones_like(r, dtype=torch.bool), "step", boundaries=ends[:1])
    assert _spans(segs) == [(0, 4), (4, 8), (8, 9)]
    torch.testing.assert_close(torch.stack([s.reward for s in segs]), torch.tensor([1.5, 5.5, 8.0]).double())


# ---------------------------------------------------------------------------------------------------------------------
# Hand-made reward sequences
# ---------------------------------------------------------------------------------------------------------------------


def test_hysteresis_small_wiggle_does_not_split():
    # std of the batch is large (rewards ±1 around a small wiggle), τ = 0.1·std; the wiggle ±0.02 stays inside ±τ.
    vals = [1.0, 1.0, 1.0, 0.02, -0.02, 0.02, -0.02, 1.0, 1.0]
    other = [-1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0]
    r = torch.tensor([vals, other], dtype=torch.float64)
    m = torch.ones_like(r, dtype=torch.bool)
    tau = 0.1 * r.std(correction=0)
    assert tau > 0.05
    segs = segment(r, m, "segment")
    assert _spans(segs[0]) == [(0, 9)]
    assert _spans(segs[1]) == [(0, 9)]
    # Without hysteresis (τ = 0), no smoothing (window 1) and no merging, the wiggle does split.
    raw = segment(r, m, "segment", tau=0.0, window=1, min_len=1)
    assert _spans(raw[0]) == [(0, 4), (4, 5), (5, 6), (6, 7), (7, 9)]


def test_side_undecided_until_outside_tau():
    # τ fixed at 0.5: the leading small negatives do not decide the side, so the first big positive is not a pivot.
    r, m = _row([-0.1, -0.2, 1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    (segs,) = segment(r, m, "segment", tau=0.5, window=1)
    assert _spans(segs) == [(0, 5), (5, 8)]


def test_short_segment_merges_into_left_neighbour():
    # window 1, τ = 0.5: pivots at 3 (down) and 4 (up) -> [0,3) [3,4) [4,7); the singleton joins [0,3).
    r, m = _row([1.0, 1.0, 1.0, -1.0, 1.0, 1.0, 1.0])
    (segs,) = segment(r, m, "segment", tau=0.5, window=1)
    assert _spans(segs) == [(0, 4), (4, 7)]
    torch.testing.assert_close(segs[0].reward, torch.tensor(0.5, dtype=torch.float64))  # (1+1+1-1)/4


def test_first_segment_merges_right():
    r, m = _row([-1.0, 1.0, 1.0, 1.0])
    (segs,) = segment(r, m, "segment", tau=0.5, window=1)
    assert _spans(segs) == [(0, 4)]
    torch.testing.assert_close(segs[0].reward, torch.tensor(0.5, dtype=torch.float64))


@pytest.mark.parametrize("granularity", ["sequence", "token", "segment"])
def test_all_positive_and_all_negative(granularity):
    r = torch.tensor([[0.3, 0.1, 0.7, 0.2], [-0.3, -0.1, -0.7, -0.2]], dtype=torch.float64)
    m = torch.ones_like(r, dtype=torch.bool)
    keep_pos = agreement_mask(r, m, torch.tensor([1, 1]), granularity)
    keep_neg = agreement_mask(r, m, torch.tensor([-1, -1]), granularity)
    if granularity == "sequence":  # vanilla: everything kept
        assert keep_pos.all() and keep_neg.all()
        return
    assert _bits(keep_pos[0]) == "1111" and _bits(keep_pos[1]) == "0000"
    assert _bits(keep_neg[0]) == "0000" and _bits(keep_neg[1]) == "1111"
    if granularity == "segment":
        assert [len(s) for s in segment(r, m, granularity)] == [1, 1]


def test_constant_rewards_one_segment():
    r, m = _row([0.5] * 6)  # std 0 -> τ = 0; every s_t = 0.5 on the same side
    (segs,) = segment(r, m)
    assert _spans(segs) == [(0, 6)]


@pytest.mark.parametrize("granularity", ["sequence", "token", "step", "segment"])
def test_single_token(granularity):
    r, m = _row([-0.4])
    (segs,) = segment(r, m, granularity, boundaries=torch.zeros_like(m))
    assert _spans(segs) == [(0, 1)]
    torch.testing.assert_close(segs[0].reward, torch.tensor(-0.4, dtype=torch.float64))
    keep = agreement_mask(r, m, torch.tensor([-1]), granularity, boundaries=torch.zeros_like(m))
    assert keep.tolist() == [[True]]


def test_right_and_left_padding_and_empty_row():
    r0, _ = _row(WORKED)
    pad = torch.full((1, 3), 99.0, dtype=torch.float64)  # junk in padding must not matter
    right = torch.cat([r0, pad], dim=-1)
    left = torch.cat([pad, r0], dim=-1)
    on, off = torch.ones(1, 15, dtype=torch.bool), torch.zeros(1, 3, dtype=torch.bool)
    r = torch.cat([right, left, torch.full((1, 18), 5.0, dtype=torch.float64)])
    m = torch.cat([torch.cat([on, off], -1), torch.cat([off, on], -1), torch.zeros(1, 18, dtype=torch.bool)])
    segs = segment(r, m, "segment", tau=0.0610428)  # τ of the single sequence (the batch std includes row 1 here)
    assert _spans(segs[0]) == [(0, 5), (5, 10), (10, 15)]
    assert _spans(segs[1]) == [(3, 8), (8, 13), (13, 18)]  # columns shifted by the 3 left-pad columns
    assert segs[2] == []
    keep = agreement_mask(r, m, torch.tensor([1, 1, 1]), "segment", tau=0.0610428)
    assert _bits(keep[0]) == "111110000011111" + "000"
    assert _bits(keep[1]) == "000" + "111110000011111"
    assert not keep[2].any()


def test_batch_tau_uses_all_valid_tokens():
    # Row 1 alone: std = 0 -> τ = 0, so the tiny ±0.01 wiggle would split. With row 0 in the batch τ = 0.1·std
    # of both rows' valid tokens, well above 0.01, and row 1 is one segment.
    r = torch.tensor([[5.0, -5.0, 5.0, -5.0], [0.01, 0.01, -0.01, -0.01]], dtype=torch.float64)
    m = torch.ones_like(r, dtype=torch.bool)
    assert len(segment(r[1:], m[1:], window=1)[0]) == 2
    assert len(segment(r, m, window=1)[1]) == 1


def test_mask_rule_labels_and_margin():
    r = torch.tensor([[0.5, 0.4, -0.6, -0.3], [0.5, 0.4, -0.6, -0.3], [0.5, 0.4, -0.6, -0.3]], dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    keep = agreement_mask(r, m, torch.tensor([1.0, -1.0, 0.0]), "segment", tau=0.1, window=1)
    # segments [0,2) R=.45, [2,4) R=-.45 -> chosen keeps 1100, rejected 0011, label 0 keeps nothing
    assert [_bits(k) for k in keep] == ["1100", "0011", "0000"]
    keep_token = agreement_mask(r, m, torch.tensor([1, -1, -1]), "token", margin=0.35)
    assert [_bits(k) for k in keep_token] == ["1100", "0010", "0010"]  # |r| > .35 only; padding column 3 is 0


def test_sequence_ignores_rewards():
    m = torch.tensor([[0, 1, 1], [1, 1, 0]], dtype=torch.bool)
    keep = agreement_mask(None, m, torch.tensor([1, -1]), "sequence")
    assert torch.equal(keep, m)


def test_errors():
    r, m = _row([0.1, 0.2])
    with pytest.raises(ValueError, match="granularity"):
        segment(r, m, "sentence")
    with pytest.raises(ValueError, match="boundaries"):
        segment(r, m, "step")
    with pytest.raises(ValueError, match="token_rewards"):
        agreement_mask(None, m, torch.tensor([1]), "token")
    with pytest.raises(ValueError, match="window"):
        segment(r, m, window=2)


# ---------------------------------------------------------------------------------------------------------------------
# Naive loop twin
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("granularity", ["sequence", "token", "step", "segment"])
def test_matches_naive_loop(seed, granularity):
    g = torch.Generator().manual_seed(seed)
    b, t = 5, 13
    r = torch.randn(b, t, generator=g, dtype=torch.float64) + 0.3 * torch.randn(b, 1, generator=g, dtype=torch.float64)
    m = torch.rand(b, t, generator=g) < 0.8  # holes, left and right padding all appear
    m[0] = False
    m[0, 4:9] = True  # left and right padded
    m[1] = False  # empty row
    ends = torch.rand(b, t, generator=g) < 0.3
    labels = torch.tensor([1, -1, 1, -1, 0])
    window = [1, 3, 5][seed % 3]
    min_len = [1, 2, 3][seed % 3]
    opts = dict(boundaries=ends, window=window, min_len=min_len)
    segs = segment(r, m, granularity, **opts)
    keep = agreement_mask(r, m, labels, granularity, **opts)
    rows = [[r[i, j].item() for j in range(t) if m[i, j]] for i in range(b)]
    tau = _naive_tau(rows)
    for i in range(b):
        cols = [j for j in range(t) if m[i, j]]
        naive = _naive_segments(rows[i], tau, granularity, [bool(ends[i, j]) for j in cols], window, min_len)
        assert [(s.start, s.end) for s in segs[i]] == [(cols[a], cols[z - 1] + 1) for a, z, _ in naive]
        got = [s.reward.item() for s in segs[i]]
        assert got == pytest.approx([rr for _, _, rr in naive], rel=1e-12, abs=1e-12)  # float64 vs Python floats
        expected = [False] * t
        for a, z, rr in naive:
            for k in range(a, z):
                expected[cols[k]] = granularity == "sequence" or labels[i].item() * rr > 0
        assert keep[i].tolist() == expected


def test_segment_namedtuple_and_float32():
    r, m = _row(WORKED, dtype=torch.float32)
    (segs,) = segment(r, m)
    assert isinstance(segs[0], Segment) and segs[0].reward.dtype == torch.float32
    assert _bits(agreement_mask(r, m, torch.tensor([1]))[0]) == "111110000011111"


# ---------------------------------------------------------------------------------------------------------------------
# Loss side: weighted log-prob sums (spec §2.6)
# ---------------------------------------------------------------------------------------------------------------------


def test_weighted_logprobs_by_hand():
    # V = 2, logits [0, 0] -> log π = log ½ for either token; logits [ln 3, 0] -> log π(0) = log ¾.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]], dtype=torch.float64)  # (1, 3, 2)
    labels = torch.tensor([[1, 0, 7]])  # the last label is junk: its weight is 0
    weight = torch.tensor([[1.0, 1.0, 0.0]])
    # Σ w log π = log ½ + log ¾
    torch.testing.assert_close(
        weighted_sequence_logprobs(logits, labels, weight), torch.tensor([math.log(0.5) + math.log(0.75)])
    )


def test_weighted_logprobs_match_loop_and_unmasked_sum_exactly():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.arange(6) < torch.tensor([[6], [4], [1]])  # (3, 6) right padding
    weight = (torch.rand(3, 6, generator=g) < 0.6) & mask
    got = weighted_sequence_logprobs(logits, labels, weight.double())
    naive = []
    for b in range(3):  # plain loop twin: Σ over kept tokens of logit[label] − logsumexp(logits)
        total = 0.0
        for t in range(6):
            if weight[b, t]:
                row = logits[b, t].tolist()
                total += row[labels[b, t]] - math.log(sum(math.exp(x) for x in row))
        naive.append(total)
    torch.testing.assert_close(got, torch.tensor(naive, dtype=torch.float32))
    # weight = the mask as float: the unmasked sum bit for bit (masked DPO with an all-ones mask is plain DPO)
    x = logits.float()
    assert torch.equal(weighted_sequence_logprobs(x, labels, mask.float()), sequence_logprobs(x, labels, mask))


def test_weighted_logprobs_gradient_is_zero_on_masked_tokens():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g, requires_grad=True)
    weight = torch.tensor([[1.0, 0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 0.0]])
    weighted_sequence_logprobs(logits, torch.randint(0, 7, (2, 5), generator=g), weight).sum().backward()
    per_position = logits.grad.abs().sum(-1)  # (2, 5)
    assert (per_position[weight == 0] == 0).all() and (per_position[weight == 1] > 0).all()


def test_credit_config_validates_and_gives_options():
    with pytest.raises(ValueError, match="granularity 'segments'"):
        CreditConfig(granularity="segments")
    assert CreditConfig(tau=0.2, window=5).options == {"tau": 0.2, "tau_scale": 0.1, "window": 5, "min_len": 2}
