"""FactWorld's simulated human: Bradley–Terry on the gold score plus an optional length bias."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol

from rlxf.worlds.factworld.gold import score_response

logger = logging.getLogger(__name__)


LENGTH_UNIT_WORDS = 4
"""L in the labeller's length term: the words of one fact sentence."""


# ---------------------------------------------------------------------------------------------------------------
# Simulated human labeller
# ---------------------------------------------------------------------------------------------------------------


class _Uniform(Protocol):
    def random(self) -> float: ...


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def simulated_preference(
    prompt_row: Mapping[str, Any], a: str, b: str, temperature: float, length_bias: float, rng: _Uniform
) -> tuple[float, bool]:
    """A noisy annotator's choice between responses a and b (Bradley-Terry on the gold score plus a length bias).

    P(a > b) = sigmoid((g(a) - g(b)) / T + length_bias * (len(a) - len(b)) / LENGTH_UNIT_WORDS), g = gold score,
    len = whitespace-separated words. T = 0: sign of g(a) - g(b) (hard label); on a tie, sigmoid(length term).
    `rng` is anything with .random() in [0, 1) (random.Random, numpy Generator). Returns (P(a > b), a_wins).
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    diff = score_response(prompt_row, a).score - score_response(prompt_row, b).score
    length_term = length_bias * (len(a.split()) - len(b.split())) / LENGTH_UNIT_WORDS
    if temperature == 0:
        logit = math.copysign(math.inf, diff) if diff != 0 else length_term
    else:
        logit = diff / temperature + length_term
    p = _sigmoid(logit)
    return p, rng.random() < p
