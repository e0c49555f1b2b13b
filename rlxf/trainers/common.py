"""Small pieces the trainers share: reading and tokenizing a data file, the micro-batch of prompts of the RL trainers,
the gold world whose score they log."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def load_encoded(
    load: Callable[..., list[dict[str, Any]]],
    encode: Callable[..., list[dict[str, Any]]],
    path: str,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    split: str,
    on_bad_row: str,
    **lengths: int,
) -> list[dict[str, Any]]:
    """Read a data file with `load` (e.g. `load_sft`) and tokenize it with `encode` (e.g. `encode_sft`).

    In skip mode the rows rejected by either step go to `rejected_<split>.jsonl` and `rejected_tokenized_<split>.jsonl`
    in the run directory `out`, so nothing disappears silently.
    """
    rows = load(path, on_bad_row=on_bad_row, rejected_path=out / f"rejected_{split}.jsonl")
    return encode(
        rows, tokenizer, on_bad_row=on_bad_row, rejected_path=out / f"rejected_tokenized_{split}.jsonl", **lengths
    )


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine's micro-batch of prompts: the rows themselves (rollouts are built from them)."""
    return {"rows": rows, "num_units": len(rows)}


def load_gold_world(path: str) -> Any:
    """The FactWorld of `--gold_world` (its gold score of the rollouts is logged, never trained on), or None."""
    if not path:
        return None
    from rlxf.worlds.factworld import load_factworld

    return load_factworld(path)
