"""Ranking losses for reward models as pure tensor functions (no I/O, no config objects, no `.item()`).

Shapes: P prompts, K completions per prompt (ragged K is padded and marked by `mask`). Within a prompt, completion
i is ranked above j when scores[i] > scores[j]; by default the columns are ordered best -> worst (the ranking row
format), i.e. scores = −column index. Equal scores tie, and tied pairs are skipped.

- `utility_ranking_loss`: the utility loss of Song et al. (arXiv:2305.17608), docs/methods/reward_collapse.md §2.2,
  with the utility chosen per prompt inside the batch (the prompt-aware fix of reward collapse).
- `plackett_luce_loss` and `pairwise_bt_loss`: the usual listwise and pairwise losses on unbounded logits, for
  comparison (they have no finite optimum on separable data, so they fall outside the program P_n).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from rlxf.collapse.utilities import Utility
from rlxf.losses import pairwise_accuracy

Reduction = Literal["prompt", "pairs"]


def ranking_pairs(mask: Tensor, scores: Tensor | None = None) -> Tensor:
    """(P, K) validity mask and scores -> (P, K, K) bool, True where both completions are valid and i ranks above j.

    scores=None means the columns are ordered best -> worst (no ties).
    """
    p, k = mask.shape
    if scores is None:
        scores = -torch.arange(k, dtype=torch.float64, device=mask.device).expand(p, k)  # (P, K) column 0 is best
    mask = mask.to(torch.bool)
    above = scores[:, :, None] > scores[:, None, :]  # (P, K, K) tied completions are never above each other
    return above & mask[:, :, None] & mask[:, None, :]


def _reduce_pairs(pair_losses: Tensor, pairs: Tensor, reduction: Reduction) -> Tensor:
    """(P, K, K) per-pair losses and pair mask -> (). "prompt": mean over each prompt's pairs, then over prompts
    with at least one pair; "pairs": mean over all pairs of the batch (what the paper's code computed)."""
    w = pairs.to(pair_losses.dtype)
    total = (pair_losses * w).sum((-1, -2))  # (P,)
    count = w.sum((-1, -2))  # (P,)
    if reduction == "prompt":
        return (total / count.clamp(min=1)).sum() / (count > 0).sum().clamp(min=1)
    if reduction == "pairs":
        return total.sum() / count.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'prompt' or 'pairs', got {reduction!r}")


@torch.no_grad()
def _pair_stats(values: Tensor, pairs: Tensor) -> dict[str, Tensor]:
    """Detached stats over all ranked pairs: accuracy (ties count half), mean margin and the pair count."""
    d = values[:, :, None] - values[:, None, :]  # (P, K, K)
    w = pairs.to(values.dtype)
    n = w.sum().clamp(min=1)
    acc = (pairwise_accuracy(values[:, :, None], values[:, None, :], reduction="none") * w).sum() / n
    return {"rewards/accuracies": acc, "rewards/margins": (d * w).sum() / n, "rewards/pairs": w.sum()}


def utility_ranking_loss(
    rewards: Tensor,  # (P, K) r = σ(logit) ∈ (0, 1), columns best -> worst unless `scores` is given
    utilities: Utility | Sequence[Utility],  # one for the batch, or one per prompt (P,)
    mask: Tensor | None = None,  # (P, K) bool, True on real completions (ragged K)
    scores: Tensor | None = None,  # (P, K) higher is better; equal scores tie and their pair is skipped
    reduction: Reduction = "prompt",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Utility ranking loss L = (1/P) Σ_p (1/|Π_p|) Σ_{(i,j) ∈ Π_p} −Ũ_p(r_{p,i} − r_{p,j})
    (docs/methods/reward_collapse.md §2.2).

    Π_p holds prompt p's pairs with i ranked above j; Ũ_p is prompt p's ε-smoothed utility (Song et al.,
    arXiv:2305.17608: the ranking objective Σ U(r_i − r_j), made prompt-aware by choosing U per prompt). Each
    completion is scored once: the C(K, 2) margins come from the K rewards of its prompt. Entries outside `mask` are
    ignored (they may hold anything, NaN included). `reduction="pairs"` averages over all pairs of the batch instead.

    Returns the scalar loss and detached stats: rewards/accuracies, rewards/margins, rewards/pairs.
    """
    p, k = rewards.shape
    valid = torch.ones(p, k, dtype=torch.bool, device=rewards.device) if mask is None else mask.to(torch.bool)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))  # junk under the mask must not reach U or its grad
    pairs = ranking_pairs(valid, scores)  # (P, K, K)
    d = r[:, :, None] - r[:, None, :]  # (P, K, K) d[p, i, j] = r_i − r_j
    if isinstance(utilities, Utility):
        gains = utilities(d)  # (P, K, K)
    else:
        if len(utilities) != p:
            raise ValueError(f"got {len(utilities)} utilities for {p} prompts; give one per prompt or a single one")
        groups: dict[Utility, list[int]] = {}
        for i, u in enumerate(utilities):
            groups.setdefault(u, []).append(i)
        gains = torch.zeros_like(d)
        for u, rows in groups.items():
            idx = torch.tensor(rows, device=d.device)
            gains = gains.index_copy(0, idx, u(d.index_select(0, idx)))  # (|rows|, K, K) into (P, K, K)
    loss = _reduce_pairs(-gains, pairs, reduction)
    return loss, _pair_stats(r.detach(), pairs)


def pairwise_bt_loss(
    logits: Tensor,  # (P, K) unbounded scores a(x, y), columns best -> worst unless `scores` is given
    mask: Tensor | None = None,  # (P, K) bool
    scores: Tensor | None = None,  # (P, K) higher is better; ties skipped
    reduction: Reduction = "prompt",
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley–Terry over all ranked pairs: mean of −log σ(a_i − a_j) (Ouyang et al. 2022, eq. 1, with all C(K, 2)
    pairs of a ranking). Unbounded: on separable data the logits grow without limit. Same reductions and stats as
    `utility_ranking_loss`."""
    p, k = logits.shape
    valid = torch.ones(p, k, dtype=torch.bool, device=logits.device) if mask is None else mask.to(torch.bool)
    a = torch.where(valid, logits, torch.zeros_like(logits))
    pairs = ranking_pairs(valid, scores)
    d = a[:, :, None] - a[:, None, :]  # (P, K, K)
    loss = _reduce_pairs(-torch.nn.functional.logsigmoid(d), pairs, reduction)
    return loss, _pair_stats(a.detach(), pairs)


def plackett_luce_loss(
    logits: Tensor,  # (P, K) unbounded scores, columns best -> worst unless `scores` is given
    mask: Tensor | None = None,  # (P, K) bool
    scores: Tensor | None = None,  # (P, K) higher is better
) -> tuple[Tensor, dict[str, Tensor]]:
    """Plackett–Luce listwise negative log-likelihood, mean over prompts with at least two valid completions.

    −log P(ranking) = Σ_k [logsumexp_{j ranked at or below k} a_j − a_k] (Plackett 1975; Luce 1959; the listwise
    loss of Cao et al. 2007, "ListMLE" of Xia et al. 2008). Ties use Breslow's rule: a tied completion's
    denominator includes every completion tied with it, so without ties this is the exact PL likelihood.

    Returns the scalar loss and detached pair stats (rewards/accuracies, rewards/margins, rewards/pairs).
    """
    p, k = logits.shape
    valid = torch.ones(p, k, dtype=torch.bool, device=logits.device) if mask is None else mask.to(torch.bool)
    a = torch.where(valid, logits, torch.zeros_like(logits))
    if scores is None:
        scores = -torch.arange(k, dtype=torch.float64, device=logits.device).expand(p, k)  # (P, K)
    at_or_below = scores[:, None, :] <= scores[:, :, None]  # (P, K, K) [p, k, j]: j not ranked above k
    risk = at_or_below & valid[:, None, :] & valid[:, :, None]
    risk = risk | torch.eye(k, dtype=torch.bool, device=logits.device)  # keeps padded rows finite; masked below
    lse = torch.logsumexp(a[:, None, :].masked_fill(~risk, float("-inf")), dim=-1)  # (P, K)
    nll = ((lse - a) * valid.to(a.dtype)).sum(-1)  # (P,)
    has_list = valid.sum(-1) >= 2  # (P,)
    loss = (nll * has_list.to(a.dtype)).sum() / has_list.sum().clamp(min=1)
    return loss, _pair_stats(a.detach(), ranking_pairs(valid, scores))
