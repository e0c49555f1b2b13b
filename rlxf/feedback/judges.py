"""Judges label a pair of responses to one prompt with P(a ≻ b) and a sampled hard label.

A judge is any object with `judge(prompt_row, a, b, rng) -> (p_a_wins, a_wins)`; `prompt_row` is the row from the
prompts file (with whatever metadata the judge needs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


class Judge(Protocol):
    def judge(self, prompt_row: dict[str, Any], a: str, b: str, rng: random.Random) -> tuple[float, bool]: ...


@dataclass
class FactWorldHumanJudge:
    """The FactWorld simulated annotator: Bradley–Terry on the gold score, with temperature and length bias."""

    world_dir: str | Path
    temperature: float = 0.5
    length_bias: float = 0.0

    def __post_init__(self) -> None:
        from rlxf.worlds.factworld import load_factworld

        self.world = load_factworld(self.world_dir)

    def judge(self, prompt_row: dict[str, Any], a: str, b: str, rng: random.Random) -> tuple[float, bool]:
        from rlxf.worlds.factworld import simulated_preference

        return simulated_preference(self.world.row_for(prompt_row), a, b, self.temperature, self.length_bias, rng)

    def gold(self, prompt_row: dict[str, Any], response: str) -> float:
        return self.world.score(prompt_row, response).score
