"""Rewards (stage 2): the one reward contract and the sources that fulfil it.

- `contract`: pure adapters from scalars, per-token lists and character spans to (B, T) rewards + mask;
- `sources`: reward sources built from a spec string (`rm:DIR`, `factworld:DIR:token`, `dpo:DIR`, `rlaif:...`,
  `callable:module:function`, weighted sums);
- `rlaif`: d-RLAIF, an LLM's expected 1-10 score as a reward.
"""

from rlxf.rewards.contract import (
    combine_rewards,
    list_to_token_rewards,
    load_callable,
    scalar_to_token_rewards,
    spans_to_token_rewards,
)

__all__ = [
    "combine_rewards",
    "list_to_token_rewards",
    "load_callable",
    "scalar_to_token_rewards",
    "spans_to_token_rewards",
]
