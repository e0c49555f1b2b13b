"""Credit-assignment segmenters and sign-agreeing token masks (rlxf-ASR).

Adaptive Segment-level Reward, Li et al., arXiv:2411.00809: cut a response into segments where a token-level reward
changes sign, and train only on the segments whose reward agrees in sign with the sequence label. The exact pivot
rule of the paper was not available; this is the rlxf rule of docs/methods/adaptive_segment_reward.md §2.3-2.4.

Shapes: B batch (responses), T tokens (response axis, padded).

Padding. `mask` is (B, T) bool, True on response tokens. Segmentation runs per row on the masked tokens *in order*,
as if the unmasked columns were removed: right padding, left padding and holes all give the same segments (the
smoothing window and the hysteresis see the previous/next *valid* token). `Segment.start`/`Segment.end` are column
indices into the original T axis: `start` is the column of the segment's first valid token and `end` is one past the
column of its last valid token, so with left padding the first segment starts at the first valid column. Nothing
outside the mask changes any result, and every (B, T) output is False outside the mask.

Loss side. `weighted_sequence_logprobs` sums log π(y_t) over the kept tokens with weights w_t = m_t + λ·(1 − m_t)
(docs/methods/adaptive_segment_reward.md §2.1, §2.6): masked DPO ("ADPO") applies it to the policy and the reference, masked rejection sampling ("ARJ")
divides it by Σ_t w_t.

`agreement_mask` is vectorised except for the short-segment merge of `segment` granularity, which is sequential by
definition and runs as a Python loop over each row's pivot indices (one device-to-host copy of the pivot flags).
`segment` returns Python lists, so it copies segment boundaries to the host too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from rlxf.config import check_ranges

Granularity = Literal["sequence", "token", "step", "segment"]
SegmentReduce = Literal["mean", "sum"]
GRANULARITIES: tuple[str, ...] = ("sequence", "token", "step", "segment")
STEP_DELIMITERS: tuple[str, ...] = (".", "!", "?", ";")


@dataclass
class CreditConfig:
    """Which tokens an optimiser trains on (the `credit:` section of DPO, PPO, REINFORCE, RLOO, rejection sampling)."""

    granularity: Granularity = "sequence"
    """'sequence' trains on every response token (the usual method); 'token', 'step' or 'segment' keep only the
    tokens whose token / step / adaptive-segment reward agrees in sign with the sequence label (arXiv 2411.00809)."""
    token_reward: str = ""
    """Reward spec of the token rewards that are segmented, e.g. 'rm:DIR:token' (increments of a BT reward head),
    'dpo:DIR' (β·(log π − log π_ref) of a DPO model), 'factworld:DIR:token' (gold). Empty: the stage's own reward
    (RL) or required (DPO, rejection sampling) when granularity is not 'sequence'."""
    tau: float | None = None
    """Pivot threshold of 'segment'; None = tau_scale × std of the batch's token rewards."""
    tau_scale: float = 0.1
    """τ as a multiple of the token rewards' standard deviation, when tau is None."""
    window: int = 3
    """Width of the centred moving average that smooths token rewards before pivots are found ('segment')."""
    min_len: int = 2
    """Segments shorter than this many tokens are merged into a neighbour ('segment')."""

    def __post_init__(self) -> None:
        check_ranges(self, {"tau_scale": ">=0", "window": ">=1", "min_len": ">=1"})
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r}: choose one of {list(GRANULARITIES)}")

    @property
    def options(self) -> dict[str, object]:
        """Keyword options for `segment` / `agreement_mask`."""
        return {"tau": self.tau, "tau_scale": self.tau_scale, "window": self.window, "min_len": self.min_len}


class Segment(NamedTuple):
    """One segment of a response: columns [start, end) of the T axis, and its reward (a 0-dim tensor)."""

    start: int
    end: int
    reward: Tensor


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def step_boundaries(token_strings: Sequence[Sequence[str]], delimiters: Sequence[str] = STEP_DELIMITERS) -> Tensor:
    """Decoded token texts -> (B, T) bool, True on tokens that END a step (docs/methods/adaptive_segment_reward.md §2.3 `step`).

    A token ends a step if its text contains a newline, or if it ends in one of `delimiters` once trailing whitespace
    is stripped. Pass one string per column, aligned with the reward tensor (use "" for prompt/padding columns, which
    never end a step); ragged rows are right-padded with False up to the longest row.
    """
    width = max((len(row) for row in token_strings), default=0)
    out = torch.zeros(len(token_strings), width, dtype=torch.bool)
    for b, row in enumerate(token_strings):
        for t, text in enumerate(row):
            out[b, t] = "\n" in text or text.rstrip().endswith(tuple(delimiters))
    return out


def _compact_order(mask: Tensor) -> Tensor:
    """(B, T) bool -> (B, T) long: per row, the valid columns in order, then the invalid ones (stable)."""
    return torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices


def centred_mean(r: Tensor, valid: Tensor, window: int = 3) -> Tensor:
    """Centred moving average over a width-`window` window, clipped to the valid tokens (docs/methods/adaptive_segment_reward.md §2.4 step 1).

    r: (B, T) rewards with the valid tokens first in each row; valid: (B, T) bool, a prefix of each row.
    At the edges only the tokens that exist are averaged. Returns (B, T), 0 on invalid positions.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be a positive odd integer, got {window}")
    h = window // 2
    v = valid.to(r.dtype)
    x = torch.where(valid, r, torch.zeros_like(r))
    zeros = x.new_zeros(x.shape[0], 1)
    cx = torch.cat([zeros, x.cumsum(-1)], dim=-1)  # (B, T + 1)
    cv = torch.cat([zeros, v.cumsum(-1)], dim=-1)  # (B, T + 1)
    t = torch.arange(x.shape[-1], device=x.device)
    lo = (t - h).clamp(min=0).expand_as(x)
    hi = (t + h + 1).clamp(max=x.shape[-1]).expand_as(x)
    total = cx.gather(-1, hi) - cx.gather(-1, lo)  # (B, T)
    count = cv.gather(-1, hi) - cv.gather(-1, lo)  # (B, T)
    return torch.where(valid, total / count.clamp(min=1), torch.zeros_like(x))


def batch_tau(token_rewards: Tensor, mask: Tensor, scale: float = 0.1) -> Tensor:
    """τ = scale · population std of the raw rewards of all valid tokens in the batch (docs/methods/adaptive_segment_reward.md §2.4 step 2) -> ().

    0 when the std is 0 or there are no valid tokens.
    """
    x = token_rewards[mask]
    if x.numel() == 0:
        return token_rewards.new_zeros(())
    return scale * x.std(correction=0)


def hysteresis_pivots(smoothed: Tensor, valid: Tensor, tau: Tensor | float) -> Tensor:
    """(B, T) smoothed rewards (valid tokens first) -> (B, T) bool, True where a new segment starts (docs/methods/adaptive_segment_reward.md §2.4 step 3).

    Side starts undecided; the first |s_t| > τ decides it (not a pivot); afterwards a pivot is a token whose s_t
    crosses to the other side of ±τ. Values within [-τ, τ] never change the side.
    """
    event = torch.where(smoothed > tau, 1, torch.where(smoothed < -tau, -1, 0)) * valid  # (B, T) in {-1, 0, 1}
    t = torch.arange(smoothed.shape[-1], device=smoothed.device).expand_as(event)
    last = torch.where(event != 0, t, torch.full_like(t, -1)).cummax(-1).values  # last decided index ≤ t
    prev_last = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=-1)  # last decided index < t
    prev_side = torch.where(prev_last >= 0, event.gather(-1, prev_last.clamp(min=0)), torch.zeros_like(event))
    return (event != 0) & (prev_side != 0) & (event != prev_side)


def merge_short(starts: list[int], length: int, min_len: int = 2) -> list[int]:
    """Merge segments shorter than `min_len` (docs/methods/adaptive_segment_reward.md §2.4 step 4); `starts` begins with 0, segments end at `length`.

    While more than one segment remains and one is shorter than `min_len`, the leftmost such segment merges into its
    left neighbour; the first segment merges into its right neighbour. Returns the new start list.
    """
    starts = list(starts)
    while len(starts) > 1:
        ends = starts[1:] + [length]
        short = [k for k, (a, e) in enumerate(zip(starts, ends)) if e - a < min_len]
        if not short:
            break
        k = short[0]
        del starts[1 if k == 0 else k]  # dropping a start joins segment k with its neighbour
    return starts


def _segment_starts(
    r: Tensor,  # (B, T) compacted rewards
    valid: Tensor,  # (B, T) bool prefix
    bnd: Tensor | None,  # (B, T) bool compacted step ends, for "step"
    granularity: str,
    tau: Tensor | float,
    window: int,
    min_len: int,
) -> Tensor:
    """(B, T) bool segment-start flags in compacted coordinates (True at t = 0 of every non-empty row)."""
    first = torch.zeros_like(valid)
    first[:, 0] = True
    first &= valid
    if granularity == "sequence":
        return first
    if granularity == "token":
        return valid.clone()
    if granularity == "step":
        assert bnd is not None
        after_end = torch.cat([torch.zeros_like(bnd[:, :1]), bnd[:, :-1]], dim=-1)  # previous valid token ended a step
        return first | (after_end & valid)
    # "segment": smoothing, hysteresis, then the sequential merge on the host.
    pivots = hysteresis_pivots(centred_mean(r, valid, window), valid, tau)
    starts = torch.zeros_like(valid)
    for b, (row, n) in enumerate(zip(pivots.cpu().tolist(), valid.sum(-1).cpu().tolist())):
        if n == 0:
            continue
        kept = merge_short([0] + [t for t in range(n) if row[t]], n, min_len)
        starts[b, kept] = True
    return starts


def _segment_compact(
    token_rewards: Tensor,
    mask: Tensor,
    granularity: str,
    boundaries: Tensor | None,
    tau: Tensor | float | None,
    tau_scale: float,
    window: int,
    min_len: int,
    reduce: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared core, all (B, T) in compacted coordinates: (order, valid, starts, seg_r, seg_r_per_token).

    order maps compacted -> original columns; seg_r[b, k] is the reward of row b's k-th segment.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if token_rewards.shape != mask.shape:
        raise ValueError(f"token_rewards {tuple(token_rewards.shape)} and mask {tuple(mask.shape)} must match")
    if granularity == "step" and boundaries is None:
        raise ValueError("granularity 'step' needs boundaries: (B, T) bool from step_boundaries(token_strings)")
    mask = mask.bool()
    order = _compact_order(mask)
    r = token_rewards.gather(-1, order)  # (B, T) valid tokens first
    valid = mask.gather(-1, order)  # (B, T) bool prefix
    r = torch.where(valid, r, torch.zeros_like(r))
    bnd = None if boundaries is None else boundaries.bool().gather(-1, order)
    if tau is None:
        tau = batch_tau(token_rewards, mask, tau_scale)
    starts = _segment_starts(r, valid, bnd, granularity, tau, window, min_len)
    seg_id = (starts.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) segment index of each compacted token
    total = torch.zeros_like(r).scatter_add_(-1, seg_id, r)  # (B, T) indexed by segment
    count = torch.zeros_like(r).scatter_add_(-1, seg_id, valid.to(r.dtype))
    seg_r = total / count.clamp(min=1) if reduce == "mean" else total
    return order, valid, starts, seg_r, seg_r.gather(-1, seg_id)


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def segment(
    token_rewards: Tensor,  # (B, T) float, the reward for y_t at y_t's log-prob position
    mask: Tensor,  # (B, T) bool, True on response tokens (prompt and padding excluded)
    granularity: Granularity = "segment",
    *,
    boundaries: Tensor | None = None,  # (B, T) bool, True on tokens that end a step; needed for "step"
    tau: Tensor | float | None = None,
    tau_scale: float = 0.1,
    window: int = 3,
    min_len: int = 2,
    reduce: SegmentReduce = "mean",
) -> list[list[Segment]]:
    """Split each row's masked tokens into segments (rlxf-ASR, arXiv:2411.00809; docs/methods/adaptive_segment_reward.md §2.3-2.4).

    granularity: "sequence" one segment per response; "token" one per token; "step" cut after every token flagged in
    `boundaries` (no smoothing, no merging); "segment" adaptive: centred mean over `window` tokens, pivots where the
    smoothed reward crosses to the other side of ±τ (hysteresis), then segments shorter than `min_len` merged.
    tau: pivot threshold; None = `tau_scale` · population std of the valid raw rewards of this batch (spec
    `tau_scope="batch"`); pass a number for a fixed, reproducible τ (`tau_scope="dataset"`). Only used by "segment".
    reduce: segment reward = "mean" (rlxf default) or "sum" of the *raw* token rewards of the segment.

    Returns, per row, the segments in order as `Segment(start, end, reward)`: [start, end) are columns of the T axis
    (see the module docstring for padding), reward is a 0-dim tensor. A row with no valid token gives [].
    """
    order, valid, starts, seg_r, _ = _segment_compact(
        token_rewards, mask, granularity, boundaries, tau, tau_scale, window, min_len, reduce
    )
    out: list[list[Segment]] = []
    for b, (row_starts, cols, n) in enumerate(
        zip(starts.cpu().tolist(), order.cpu().tolist(), valid.sum(-1).tolist())
    ):
        firsts = [t for t in range(n) if row_starts[t]]
        lasts = [t - 1 for t in firsts[1:]] + [n - 1] if firsts else []
        out.append([Segment(cols[a], cols[z] + 1, seg_r[b, k]) for k, (a, z) in enumerate(zip(firsts, lasts))])
    return out


def agreement_mask(
    token_rewards: Tensor | None,  # (B, T) float; may be None for "sequence"
    mask: Tensor,  # (B, T) bool, True on response tokens
    labels: Tensor,  # (B,) in {+1, -1, 0}: +1 chosen / positive advantage, -1 rejected / negative, 0 no signal
    granularity: Granularity = "segment",
    *,
    boundaries: Tensor | None = None,
    tau: Tensor | float | None = None,
    tau_scale: float = 0.1,
    window: int = 3,
    min_len: int = 2,
    reduce: SegmentReduce = "mean",
    margin: float = 0.0,
) -> Tensor:
    """(B, T) bool keep-mask: token t is kept iff label · R_{k(t)} > margin (rlxf-ASR, arXiv:2411.00809; docs/methods/adaptive_segment_reward.md §2.4-2.5).

    R_k is the reward of t's segment as computed by `segment` with the same options. "sequence" is the vanilla method:
    every valid token is kept whatever the rewards and labels (token_rewards may be None). Label 0 keeps nothing at
    the other granularities. False outside `mask`. Loss weights are then w = keep + λ·(1 − keep).
    """
    mask = mask.bool()
    if granularity == "sequence":
        return mask.clone()
    if token_rewards is None:
        raise ValueError(f"granularity {granularity!r} needs token_rewards")
    order, valid, _, _, tok_seg_r = _segment_compact(
        token_rewards, mask, granularity, boundaries, tau, tau_scale, window, min_len, reduce
    )
    keep_c = (labels.to(tok_seg_r.dtype)[:, None] * tok_seg_r > margin) & valid  # (B, T) compacted
    return torch.zeros_like(mask).scatter(-1, order, keep_c)
