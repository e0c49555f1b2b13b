"""Credit assignment (stage 3): which response tokens an optimiser trains on.

- `segments`: the pure segmenters and the sign-agreement mask (adaptive segment reward, arXiv:2411.00809);
- `assign`: token rewards of real responses -> segments and keep-masks; the one path DPO, PPO, REINFORCE, RLOO and
  rejection sampling use;
- `inspect`: `rlxf segments show` / `rlxf segments quality`, to look at what a trainer would train on.
"""

from rlxf.credit.segments import (
    GRANULARITIES,
    CreditConfig,
    Segment,
    agreement_mask,
    batch_tau,
    centred_mean,
    hysteresis_pivots,
    merge_short,
    segment,
    step_boundaries,
)

__all__ = [
    "GRANULARITIES",
    "CreditConfig",
    "Segment",
    "agreement_mask",
    "batch_tau",
    "centred_mean",
    "hysteresis_pivots",
    "merge_short",
    "segment",
    "step_boundaries",
]
