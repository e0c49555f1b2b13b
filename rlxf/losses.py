"""Preference losses as pure tensor functions (no I/O, no config objects).

Shapes: B batch (pairs).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor


def bradley_terry_loss(
    chosen_rewards: Tensor,  # (B,) r(x, y_chosen)
    rejected_rewards: Tensor,  # (B,) r(x, y_rejected)
    margin: Tensor | None = None,  # (B,) required reward gap, as in Llama 2's margin loss
    label_prob: Tensor | None = None,  # (B,) P(chosen ≻ rejected), a soft label in [0, 1]
) -> Tensor:
    """Bradley–Terry negative log-likelihood, mean over the batch.

    With d = r_chosen − r_rejected − margin, the hard-label loss is −log σ(d) (Ouyang et al. 2022, eq. 1; the margin
    as in Touvron et al. 2023, eq. 2). With a soft label p it is the cross-entropy against p:
    −p·log σ(d) − (1 − p)·log σ(−d), which is what RLAIF trains on (Lee et al. 2023, §2.2); p = 1 gives the hard loss.
    """
    return bradley_terry_losses(chosen_rewards, rejected_rewards, margin, label_prob).mean()


def bradley_terry_losses(
    chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | None = None, label_prob: Tensor | None = None
) -> Tensor:
    """Per-pair Bradley–Terry losses (B,) -> (B,); see `bradley_terry_loss`."""
    d = chosen_rewards - rejected_rewards
    if margin is not None:
        d = d - margin.to(d.dtype)
    if label_prob is None:
        return -F.logsigmoid(d)
    p = label_prob.to(d.dtype)
    return -(p * F.logsigmoid(d) + (1 - p) * F.logsigmoid(-d))


def reward_centering_penalty(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Per-pair (r_chosen + r_rejected)²: pushes the reward's mean to 0 (Eisenstein et al. 2023, §3), (B,) -> (B,)."""
    return (chosen_rewards + rejected_rewards) ** 2


def pairwise_accuracy(
    chosen_rewards: Tensor, rejected_rewards: Tensor, reduction: Literal["mean", "sum", "none"] = "mean"
) -> Tensor:
    """Fraction of pairs ranked correctly, a tie counting half: a model that cannot tell two responses apart does
    as well as a coin flip, not worse. (B,), (B,) -> () with "mean".

    The one definition for pairs, ranked pairs of rankings and evaluation alike. "sum" gives the number of hits (what
    a trainer logs, the engine dividing by its units); "none" gives the hit per pair, 1, ½ or 0, for any two
    broadcastable shapes (e.g. (P, K, 1) against (P, 1, K) for all pairs of P rankings). Float inputs keep their
    dtype; other inputs give the default float dtype.
    """
    dtype = torch.promote_types(chosen_rewards.dtype, rejected_rewards.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    hits = (chosen_rewards > rejected_rewards).to(dtype) + 0.5 * (chosen_rewards == rejected_rewards).to(dtype)
    if reduction == "mean":
        return hits.mean()
    if reduction == "sum":
        return hits.sum()
    if reduction == "none":
        return hits
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


DPOLossType = Literal["sigmoid", "ipo"]


def dpo_loss(
    policy_chosen_logps: Tensor,  # (B,) log π_θ(y_chosen | x), summed over response tokens
    policy_rejected_logps: Tensor,  # (B,)
    ref_chosen_logps: Tensor,  # (B,) log π_ref(y_chosen | x), no grad
    ref_rejected_logps: Tensor,  # (B,)
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: DPOLossType = "sigmoid",
    label_prob: Tensor | None = None,  # (B,) P(chosen ≻ rejected), a soft label in [0, 1]
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference optimisation losses and implicit rewards, per example.

    h = (log π_θ(y_c) − log π_ref(y_c)) − (log π_θ(y_r) − log π_ref(y_r)), the implicit reward margin over β.
    - "sigmoid" (Rafailov et al. 2023, eq. 7): −log σ(β·h). With a target probability p of "chosen wins" it is the
      cross-entropy −p·log σ(β·h) − (1 − p)·log σ(−β·h); conservative DPO (label smoothing ε, Mitchell 2023) is
      p = 1 − ε, and a soft label p combines with ε as p·(1 − ε) + (1 − p)·ε.
    - "ipo" (Azar et al. 2023, eq. 17): (h − (p − ½)/β)², i.e. (h − 1/(2β))² for a hard label.

    Returns (losses, chosen_rewards, rejected_rewards), each (B,); the rewards β·(log π_θ − log π_ref) are detached.
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios  # (B,)
    p = torch.ones_like(h) if label_prob is None else label_prob.to(h.dtype)
    p = p * (1 - label_smoothing) + (1 - p) * label_smoothing
    if loss_type == "sigmoid":
        losses = -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))
    else:
        losses = (h - (p - 0.5) / beta) ** 2
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
