"""The reward of the RLOO speed benchmark (`bench_trl_rloo.py`), one function in each library's calling convention.

Reward of a response = (number of the letter "e" in its text) / 10: deterministic, cheap (microseconds for a whole
rollout), and it varies between samples, so the leave-one-out advantages are not all zero on either side.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def letter_score(text: str) -> float:
    return text.count("e") / 10.0


def rlxf_reward(prompt_rows: Sequence[dict[str, Any]], texts: Sequence[str]) -> list[float]:
    """rlxf's `callable:` reward contract: (prompt rows, response texts) -> one float per response."""
    return [letter_score(t) for t in texts]


def trl_reward(prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """TRL's reward-function contract: keyword arguments, one float per completion."""
    return [letter_score(c) for c in completions]
