"""Reward collapse and prompt-aware utilities for ranking reward models.

Song, Cai, Lee & Su, "Reward Collapse in Aligning Large Language Models" (arXiv:2305.17608); the rlxf spec is
methods/reward_collapse.md. Modules:
- `utilities`: the utilities U (pure and ε-smoothed) and the prompt-aware choice of U per example;
- `theory`: the per-prompt program P_n, its solver and the limit laws;
- `distances`: KS, W1, MAE and the open-vs-closed gap between profiles and predictions;
- `losses`: the utility ranking loss (and Plackett–Luce / pairwise BT for comparison), pure tensor functions;
- `diagnose`: collapse checks of a trained reward model and plots.
"""

from rlxf.collapse.diagnose import (
    diagnose,
    mean_profiles,
    plot_profiles,
    predict,
    predict_plot,
    predicted_profile,
    profile_error,
    prompt_independence,
    prompt_type_gap,
    reward_profiles,
)
from rlxf.collapse.distances import ks_distance, open_closed_gap, prediction_mae, w1_exact, w1_grid
from rlxf.collapse.losses import pairwise_bt_loss, plackett_luce_loss, ranking_pairs, utility_ranking_loss
from rlxf.collapse.theory import NoClosedFormError, limit_law, limit_quantiles, objective, solve
from rlxf.collapse.utilities import (
    BINARY_RULE,
    DEFAULT_EPS,
    UTILITY_NAMES,
    Utility,
    binary_rule_utilities,
    openness_to_lambda,
    openness_utility,
    prompt_aware_utilities,
    prompt_aware_utility,
    utility,
)

__all__ = [
    "BINARY_RULE",
    "DEFAULT_EPS",
    "NoClosedFormError",
    "UTILITY_NAMES",
    "Utility",
    "binary_rule_utilities",
    "diagnose",
    "ks_distance",
    "limit_law",
    "limit_quantiles",
    "mean_profiles",
    "objective",
    "open_closed_gap",
    "openness_to_lambda",
    "openness_utility",
    "pairwise_bt_loss",
    "plackett_luce_loss",
    "plot_profiles",
    "predict",
    "predict_plot",
    "predicted_profile",
    "prediction_mae",
    "profile_error",
    "prompt_aware_utilities",
    "prompt_aware_utility",
    "prompt_independence",
    "prompt_type_gap",
    "ranking_pairs",
    "reward_profiles",
    "solve",
    "utility",
    "utility_ranking_loss",
    "w1_exact",
    "w1_grid",
]
