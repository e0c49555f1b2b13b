"""Small pieces the trainers share: reading and tokenizing a data file, the held-out split of a train file, the
micro-batch of prompts of the RL trainers, the gold world whose score they log, the frozen reference policy."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from rlxf.config import ConfigError
from rlxf.data.formats import write_jsonl
from rlxf.engine import TrainConfig
from rlxf.hf import load_model
from rlxf.models.lora import AdaptersOff, LoraSettings

logger = logging.getLogger(__name__)

EVAL_SPLIT_FILE = "eval_split.jsonl"
"""The held-out rows of `--eval_split`, written into the run directory (normalised columns, e.g. `prompt`, so
`rlxf eval --prompts_file <out>/eval_split.jsonl` can read it)."""


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


def check_eval_split(eval_split: float, eval_file: str) -> None:
    """A ConfigError unless 0 <= eval_split < 1 and at most one of eval_split / eval_file is given (configs call
    this from `__post_init__`)."""
    if isinstance(eval_split, bool) or not isinstance(eval_split, (int, float)) or not 0.0 <= eval_split < 1.0:
        raise ConfigError(f"eval_split must be in [0, 1), got {eval_split!r}")
    if eval_split and eval_file:
        raise ConfigError(
            f"eval_split={eval_split} and eval_file={eval_file!r} both choose the held-out rows; give one of them"
        )


def _split_key(seed: int, index: int, row: dict[str, Any]) -> str:
    origin = row.get("_origin", f"<rows>:row {index}")
    return hashlib.sha256(f"{seed}\0{origin}".encode()).hexdigest()


def split_for_eval(
    rows: list[dict[str, Any]], eval_split: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train rows, held-out rows): round(len(rows) * eval_split) rows (at least 1 when eval_split > 0) held out.

    Deterministic and seeded: the held-out rows are those with the smallest sha256(seed, row `_origin`) (file and
    line / row index), so the choice does not depend on the machine, the process, or the other rows: two trainers
    reading the same file with the same seed hold out the same rows, up to rows one of them rejected. Both parts keep
    file order and are disjoint. Raises a ConfigError when no training row would be left.
    """
    check_eval_split(eval_split, "")
    if not eval_split:
        return list(rows), []
    n_eval = max(1, round(len(rows) * eval_split))
    if n_eval >= len(rows):
        raise ConfigError(
            f"eval_split={eval_split} of {len(rows)} rows holds out {n_eval} and leaves no training row; "
            "lower eval_split or give more rows"
        )
    order = sorted(range(len(rows)), key=lambda i: _split_key(seed, i, rows[i]))
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def load_train_eval(
    load: Callable[..., list[dict[str, Any]]],
    train_file: str,
    eval_file: str,
    eval_split: float,
    seed: int,
    out: Path,
    on_bad_row: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The loaded (not yet tokenized) train and held-out rows of a trainer: `eval_file` when given, else an
    `eval_split` share of `train_file` (`split_for_eval`, seeded by `seed` = train.seed), else none. The held-out rows
    of a split are written to `<out>/eval_split.jsonl`. Rejected rows go to `<out>/rejected_<split>.jsonl`."""
    check_eval_split(eval_split, eval_file)
    rows = load(train_file, on_bad_row=on_bad_row, rejected_path=out / "rejected_train.jsonl")
    if eval_file:
        return rows, load(eval_file, on_bad_row=on_bad_row, rejected_path=out / "rejected_eval.jsonl")
    if not eval_split:
        return rows, []
    rows, held_out = split_for_eval(rows, eval_split, seed)
    write_jsonl(out / EVAL_SPLIT_FILE, held_out)
    logger.info(
        "eval_split=%s: held out %d of %d rows of %s (seed %d); wrote them to %s",
        eval_split,
        len(held_out),
        len(rows) + len(held_out),
        train_file,
        seed,
        out / EVAL_SPLIT_FILE,
    )
    return rows, held_out


def load_encoded_splits(
    load: Callable[..., list[dict[str, Any]]],
    encode: Callable[..., list[dict[str, Any]]],
    cfg: Any,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    **encode_kwargs: Any,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`load_train_eval` with a trainer config's `train_file`, `eval_file`, `eval_split`, `train.seed`, `on_bad_row`,
    then `encode` of both parts (rows rejected there go to `<out>/rejected_tokenized_<split>.jsonl`)."""
    rows, eval_rows = load_train_eval(
        load, cfg.train_file, cfg.eval_file, cfg.eval_split, cfg.train.seed, out, cfg.on_bad_row
    )

    def encoded(part: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        if not part:
            return []
        rejected = out / f"rejected_tokenized_{split}.jsonl"
        return encode(part, tokenizer, on_bad_row=cfg.on_bad_row, rejected_path=rejected, **encode_kwargs)

    return encoded(rows, "train"), encoded(eval_rows, "eval")


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine's micro-batch of prompts: the rows themselves (rollouts are built from them)."""
    return {"rows": rows, "num_units": len(rows)}


def load_gold_world(path: str) -> Any:
    """The FactWorld of `--gold_world` (its gold score of the rollouts is logged, never trained on), or None."""
    if not path:
        return None
    from rlxf.worlds.factworld import load_factworld

    return load_factworld(path)


def load_reference(
    model: str, ref_model: str, lora: LoraSettings, policy: torch.nn.Module, train: TrainConfig, device: torch.device
) -> torch.nn.Module:
    """The frozen reference policy of DPO / PPO / RLOO (eval mode, no gradients).

    With LoRA adapters and no `ref_model` named, it is `policy` with its adapters switched off: exactly the model the
    run started from, with no second copy of the weights in memory. Otherwise it is loaded from disk (`ref_model`, or
    the policy's own starting point `model`), not copied from the policy: on resume the policy has already moved."""
    if lora.enabled and not ref_model:
        return AdaptersOff(policy)
    ref = load_model(ref_model or model, what="reference model", **train.load_kwargs()).to(device).eval()
    ref.requires_grad_(False)
    return ref
