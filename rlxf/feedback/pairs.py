"""`rlxf pairs`: sample k responses per prompt from a policy and label every distinct pair with a judge."""

from __future__ import annotations

import itertools
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rlxf.config import check_ranges
from rlxf.data.formats import write_jsonl
from rlxf.errors import UserError
from rlxf.feedback.judges import FactWorldHumanJudge, Judge
from rlxf.hf import load_policy
from rlxf.sampling import GenerationSettings, load_encoded_prompts, sample_responses

logger = logging.getLogger(__name__)


@dataclass
class PairsConfig:
    model: str = ""
    """save_pretrained directory of the policy that writes the responses. Required."""
    prompts_file: str = ""
    """Prompts (JSONL / Parquet / datasets dir) with a `prompt` column. Required."""
    out: str = "runs/pairs.jsonl"
    """Preference pairs to write: prompt, chosen, rejected, label_prob (+ gold scores when the judge knows them)."""
    judge: Literal["factworld"] = "factworld"
    """Who labels: 'factworld' is the simulated human of a FactWorld directory (LLM judges: `rlxf label`)."""
    world: str = ""
    """FactWorld directory (for judge=factworld)."""
    label_temperature: float = 0.5
    """Simulated human: temperature T of P(a ≻ b) = σ(Δgold / T + ...); 0 gives noiseless labels."""
    length_bias: float = 0.0
    """Simulated human: preference for longer answers, per 4 words."""
    k: int = 2
    """Responses per prompt; every pair of distinct responses is labelled."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Decoding settings."""
    max_prompt_length: int = 192
    """Longest prompt in tokens; longer prompts keep their end."""
    seed: int = 0
    """Seed of the sampling and of the sampled labels."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed prompt row does: stop with an error, or be skipped and written to a side file."""

    def __post_init__(self) -> None:
        check_ranges(self, {"label_temperature": ">=0", "k": ">=2", "max_prompt_length": ">=1", "seed": ">=0"})


def build_judge(cfg: PairsConfig) -> Judge:
    if cfg.judge == "factworld":
        if not cfg.world:
            raise UserError("--judge factworld needs --world DIR (a directory written by `rlxf world factworld`)")
        return FactWorldHumanJudge(cfg.world, cfg.label_temperature, cfg.length_bias)
    raise UserError(f"unknown judge {cfg.judge!r}; choose 'factworld'")


def label_pairs(samples: list[dict[str, Any]], judge: Judge, seed: int) -> list[dict[str, Any]]:
    """Group samples by prompt, label each pair of distinct responses; the sampled winner becomes `chosen`."""
    rng = random.Random(seed)
    by_prompt: dict[str, list[dict[str, Any]]] = {}
    for s in samples:
        by_prompt.setdefault(s["prompt"], []).append(s)
    pairs, identical = [], 0
    gold = getattr(judge, "gold", None)
    for prompt, group in by_prompt.items():
        row = {k: v for k, v in group[0].items() if k not in ("response", "sample_index", "finished")}
        for a, b in itertools.combinations([g["response"] for g in group], 2):
            if a.strip() == b.strip() or not a.strip() or not b.strip():
                identical += 1
                continue
            p_a, a_wins = judge.judge(row, a, b, rng)
            chosen, rejected, p = (a, b, p_a) if a_wins else (b, a, 1.0 - p_a)
            pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "label_prob": p}
            if gold is not None:
                pair |= {"gold_chosen": gold(row, chosen), "gold_rejected": gold(row, rejected)}
            pairs.append(pair)
    logger.info("labelled %d pairs; %d pairs of identical or empty responses dropped", len(pairs), identical)
    return pairs


def run_pairs(cfg: PairsConfig) -> Path:
    if cfg.k < 2:
        raise UserError(f"k={cfg.k}: need at least 2 responses per prompt to make a pair")
    judge = build_judge(cfg)
    model, tokenizer = load_policy(cfg.model)
    out = Path(cfg.out)
    rows = load_encoded_prompts(cfg.prompts_file, tokenizer, out, cfg.on_bad_row, cfg.max_prompt_length)
    samples = sample_responses(model, tokenizer, rows, cfg.k, cfg.generation, cfg.seed)
    pairs = label_pairs(samples, judge, cfg.seed)
    if not pairs:
        raise UserError("no pairs: every prompt's responses were identical; raise generation.temperature or k")
    write_jsonl(out, pairs)
    return out
