"""REINFORCE with a learned value baseline: the RL algorithm of the RLAIF paper (arXiv 2309.00267 §2.3; Williams
1992): A_t = G_t − V(s_t), one on-policy update per rollout.

It is PPO's loop (`rlxf.trainers.ppo`) with other defaults: the critic is a baseline fitted by plain regression,
there is one pass over each rollout (so the probability ratio is 1 and clipping never acts) and no advantage
whitening. `rlxf reinforce` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from rlxf.trainers.ppo import PPOConfig, train_ppo


@dataclass
class ReinforceConfig(PPOConfig):
    out: str = "runs/reinforce"
    """Output directory: metrics, checkpoints, the final policy in `final/` and its critic in `final/value_model/`."""
    advantage: Literal["gae", "reinforce"] = "reinforce"
    """'reinforce': A_t = G_t − V(s_t), the critic as a learned baseline (RLAIF paper); 'gae' turns this into PPO."""
    ppo_epochs: int = 1
    """Passes over each rollout (1: on-policy REINFORCE; the ratio is then 1 and clipping never acts)."""
    whiten_advantages: bool = False
    """Normalise the rollout's advantages to mean 0 and variance 1 over its response tokens."""
    value_clip_eps: float = float("inf")
    """Value clip (inf: the baseline is fitted by plain regression)."""


def train_reinforce(cfg: ReinforceConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Optimise `cfg.model` with REINFORCE and a learned baseline; returns the metric history."""
    return train_ppo(cfg, model)
