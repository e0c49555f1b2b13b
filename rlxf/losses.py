"""Preference losses as pure tensor functions (no I/O, no config objects).

Shapes: B batch (pairs).
"""

from __future__ import annotations

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


def pairwise_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Fraction of pairs ranked correctly; ties count half. (B,), (B,) -> ()."""
    return ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).mean()
