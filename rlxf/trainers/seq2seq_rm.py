"""Seq2seq reward model training (arXiv 2409.00162): a causal LM learns to rewrite a response into the chosen one.

Each preference triple (x, y_w, y_l) becomes two rows, shuffled together: correction (x + y_l -> y_w + EOS) and
identity (x + y_w -> y_w + EOS), laid out as `P(x) ++ D1 ++ y_in ++ D2 ++ y_out ++ [eos]` from token ids, with the
loss (sequence MLE) on y_out + EOS only (docs/methods/seq2seq_rm.md §2.2, §2.3). The template, T_ref (median chosen
length), α = 1/T_ref, β and the tokenizer's fingerprint go into the RM's config.json, where the reward source
`seq2seq:DIR` checks them (`rlxf.rewards.seq2seq`). The sanity metrics of §2.6 (pairwise accuracy with R = Σ r_t,
copy rate on chosen, flag rate on rejected, their gap) are logged at every evaluation; training stops early when
the held-out flag-rate gap stops improving.

Shapes: B batch (rows), L sequence length.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlxf.config import check_ranges
from rlxf.data.formats import load_preferences
from rlxf.data.tokenize import encode_preferences, pad, truncate_prompt
from rlxf.engine import Engine, TrainConfig
from rlxf.errors import UserError
from rlxf.hf import load_model, load_tokenizer
from rlxf.logprobs import shift_for_next_token, token_logprobs
from rlxf.models.lora import LoraSettings, add_lora
from rlxf.rewards.seq2seq import (
    CONFIG_KEY,
    REVIEW_DELIMITER,
    REVISED_DELIMITER,
    Seq2SeqTemplate,
    as_encoded_pairs,
    oriented_pairs,
    reference_length,
    sanity_metrics,
)
from rlxf.trainers.common import check_eval_split, load_encoded_splits

logger = logging.getLogger(__name__)


@dataclass
class Seq2SeqRMConfig:
    model: str = ""
    """save_pretrained directory of the policy's SFT model: the RM starts from it and keeps its tokenizer. Required."""
    train_file: str = ""
    """Preference pairs in any format `rlxf rm` reads (standard, conversational, HH-RLHF implicit prompt; optional
    `label_prob`). Required."""
    eval_file: str = ""
    """Held-out pairs for the sanity metrics and the early stop (optional)."""
    eval_split: float = 0.0
    """Hold out this share of train_file's rows (e.g. 0.1) when no eval_file is given: seeded by train.seed,
    written to `<out>/eval_split.jsonl`. In [0, 1); 0 holds out nothing."""
    out: str = "runs/seq2seq_rm"
    """Output directory: metrics, checkpoints, and the final RM in `final/` (use it as `seq2seq:OUT/final`)."""
    max_length: int = 512
    """Longest row (prompt + D1 + response read + D2 + revision + EOS) in tokens; longer prompts are cut from the
    left, and a row that still does not fit is skipped and counted (responses are never cut)."""
    max_prompt_length: int = 256
    """Longest prompt in tokens."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed row of the data file does: stop with an error, or be skipped and written to a side file."""
    allow_empty_responses: bool = False
    """Keep rows whose response is empty (the response is then EOS alone)."""
    use_label_prob: bool = True
    """A row whose soft label `label_prob` (P(chosen ≻ rejected)) is below 0.5 prefers `rejected`: swap the two;
    a row at exactly 0.5 states no preference and is skipped (counted). Off: `chosen` is always the target."""
    alpha: float = 0.0
    """Reward of an agreeing token, saved with the RM; 0 means 1/T_ref, T_ref the median chosen length."""
    beta: float = 1.0
    """Penalty of a diverging token, saved with the RM."""
    review_delimiter: str = REVIEW_DELIMITER
    """D1, between the prompt and the response the RM reads; saved with the RM and checked at load."""
    revised_delimiter: str = REVISED_DELIMITER
    """D2, between the response read and the revision the RM writes; saved with the RM and checked at load."""
    sanity_variant: Literal["A", "B", "soft"] = "A"
    """Reward variant of the pairwise accuracy in the sanity metrics."""
    sanity_train_pairs: int = 64
    """Also log the sanity metrics on this many training pairs (the first ones), as `train_sanity/...`; 0 skips."""
    early_stop_patience: int = 3
    """Stop when the held-out flag-rate gap has not improved for this many evaluations (set train.eval_every);
    0 disables. Needs held-out pairs."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (`lora.r` > 0) instead of training every weight. Unlike the other trainers, final/ holds the
    adapters merged into the model: the RM's template lives in its config.json, which an adapter directory lacks."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, batch_size=32, epochs=2.0))
    """Optimisation settings (engine). The spec's recipe: lr 1e-5 to 2e-5, cosine, ~3% warm-up (warmup_steps),
    1-3 epochs."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "max_length": ">=4",
                "max_prompt_length": ">=1",
                "alpha": ">=0",
                "beta": ">=0",
                "sanity_train_pairs": ">=0",
                "early_stop_patience": ">=0",
            },
        )
        check_eval_split(self.eval_split, self.eval_file)
        if not self.review_delimiter or not self.revised_delimiter:
            raise UserError("review_delimiter and revised_delimiter must not be empty")


def seq2seq_rows(
    pairs: list[dict[str, Any]], template: Seq2SeqTemplate, max_length: int, max_prompt_length: int, bos_id: int | None
) -> tuple[list[dict[str, Any]], int]:
    """Two supervised rows per pair, correction then identity: input_ids = context ++ y_w ++ [eos], target_mask 1 on
    y_w + EOS. The prompt loses tokens from the left (keeping BOS) to fit; a row that still does not fit is dropped.
    Returns the rows and the number dropped."""
    rows, too_long = [], 0
    for pair in pairs:
        target = [*pair["chosen"], template.eos_id]
        for kind, y_in in (("correction", pair["rejected"]), ("identity", pair["chosen"])):
            rest = len(template.context([], y_in)) + len(target)
            keep_first = 1 if bos_id is not None and pair["prompt_ids"][:1] == [bos_id] else 0
            prompt = truncate_prompt(
                pair["prompt_ids"], rest, max_length=max_length, max_prompt_length=max_prompt_length,
                keep_first=keep_first,
            )  # fmt: skip
            if prompt is None:
                too_long += 1
                continue
            context = template.context(prompt, y_in)
            rows.append(
                {
                    "input_ids": context + target,
                    "target_mask": [0] * len(context) + [1] * len(target),
                    "kind": kind,
                }
            )
    return rows, too_long


def collate_rows(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    ids, attention_mask = pad([r["input_ids"] for r in rows], pad_id, side="right")
    target_mask, _ = pad([r["target_mask"] for r in rows], 0, side="right")
    return {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "target_mask": target_mask,
        "num_units": int(target_mask[:, 1:].sum()),  # the loss is a mean over target tokens
        "num_tokens": int(attention_mask.sum()),
    }


def target_nll(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Summed NLL of the target tokens (y_w + EOS) of the batch: L_corr + L_id of §2.3 over its rows."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    logits, labels, mask = shift_for_next_token(logits, batch["input_ids"], batch["target_mask"])
    return -(token_logprobs(logits, labels) * mask.float()).sum()


def train_seq2seq_rm(cfg: Seq2SeqRMConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train a seq2seq RM on preference pairs; returns the metric history and the last sanity metrics."""
    tokenizer = load_tokenizer(cfg.model)
    if model is None:
        model = load_model(cfg.model, tokenizer=tokenizer, **cfg.train.load_kwargs())
    model = add_lora(model, cfg.lora, cfg.model, cfg.train.seed)
    out = Path(cfg.out)

    # 1. preference rows in any format -> ids; the response side is never cut here (the row layout decides)
    encoded, eval_encoded = load_encoded_splits(
        functools.partial(load_preferences, allow_empty_responses=cfg.allow_empty_responses),
        encode_preferences,
        cfg,
        tokenizer,
        out,
        max_length=None,
        max_prompt_length=None,
    )
    eos = tokenizer.eos_token_id
    pairs, counts = oriented_pairs(encoded, eos, cfg.use_label_prob)
    eval_pairs, _ = oriented_pairs(eval_encoded, eos, cfg.use_label_prob)
    if not pairs:
        raise UserError(f"{cfg.train_file}: no preference pair left to train on ({counts})")

    # 2. the template and the reward scale, saved in config.json with every checkpoint and the final model
    t_ref = reference_length([len(p["chosen"]) for p in pairs])
    template = Seq2SeqTemplate.for_tokenizer(
        tokenizer, t_ref, alpha=cfg.alpha or None, beta=cfg.beta, max_length=cfg.max_length,
        review_delimiter=cfg.review_delimiter, revised_delimiter=cfg.revised_delimiter,
    )  # fmt: skip
    setattr(model.config, CONFIG_KEY, template.to_dict())

    # 3. two rows per pair (correction, identity); the engine shuffles them together
    rows, too_long = seq2seq_rows(pairs, template, cfg.max_length, cfg.max_prompt_length, tokenizer.bos_token_id)
    logger.info(
        "seq2seq RM: %d pairs -> %d rows (correction + identity); skipped %d identical, %d without preference, "
        "%d over-long rows; swapped %d by label_prob; T_ref=%g, α=%.4g, β=%g",
        len(pairs), len(rows), counts["identical"], counts["no_preference"], too_long, counts["swapped"], t_ref,
        template.alpha, template.beta,
    )  # fmt: skip
    if not rows:
        raise UserError(f"every row is longer than max_length={cfg.max_length}; raise it")
    pad_id = tokenizer.pad_token_id
    engine = Engine(cfg.train, out, model, num_examples=len(rows), config_dict=asdict(cfg))
    rm = engine.model
    if engine.step == 0:
        data_counts = {"pairs": len(pairs), "rows": len(rows), "skipped_identical": counts["identical"],
                       "skipped_no_preference": counts["no_preference"], "skipped_too_long": too_long,
                       "swapped": counts["swapped"], "t_ref": t_ref}  # fmt: skip
        engine.log({f"data/{k}": float(v) for k, v in data_counts.items()})
    sanity_train = as_encoded_pairs(pairs[: cfg.sanity_train_pairs], eos)
    sanity_eval = as_encoded_pairs(eval_pairs, eos)
    early = engine.extra_state.setdefault("early_stop", {"best_gap": None, "evals_since_best": 0})
    last: dict[str, float] = {}

    def evaluate() -> bool:
        """Log the sanity metrics; True when the held-out gap has stopped improving (early stop)."""
        nonlocal last
        if not engine.is_main:
            return False
        batch = cfg.train.per_device_batch_size
        logged = {}
        for prefix, data in (("eval", sanity_eval), ("train_sanity", sanity_train)):
            if data:
                m = sanity_metrics(engine.unwrap(), template, data, pad_id, batch, cfg.sanity_variant)
                logged |= {f"{prefix}/{k}": v for k, v in m.items()}
        engine.log(logged)
        last = logged
        if not sanity_eval or not cfg.early_stop_patience:
            return False
        gap = logged["eval/flag_rate_gap"]
        if early["best_gap"] is None or gap > early["best_gap"]:
            early["best_gap"], early["evals_since_best"] = gap, 0
        else:
            early["evals_since_best"] += 1
        return early["evals_since_best"] >= cfg.early_stop_patience

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll = target_nll(rm, batch)
        return nll, {"loss/nll": nll.detach()}

    if engine.step == 0:
        evaluate()  # the starting point: an SFT model copies little and flags at random
    lengths = [len(r["input_ids"]) for r in rows]
    stopped_early = False
    for micro_batches in engine.steps(rows, lambda b: collate_rows(b, pad_id), lengths):
        engine.train_step(micro_batches, loss_fn)
        # rank 0 evaluates; every process must leave the loop together (the engine's collective ops would hang)
        stop = engine._any_rank(evaluate()) if engine.should_evaluate() else False
        if stop and engine.step < engine.total_steps:
            logger.info(
                "early stop at step %d: the held-out flag-rate gap has not improved on %.4g for %d evaluations",
                engine.step, early["best_gap"], cfg.early_stop_patience,
            )  # fmt: skip
            stopped_early = True
            break

    if engine.finished or stopped_early:
        trained = engine.unwrap()
        # training is over: merging in place is safe, and the merged model keeps the template in its config.json
        engine.save_final(tokenizer, model=trained.merge_and_unload() if cfg.lora.enabled else None)
    engine.close()
    return {
        "history": engine.history,
        "eval": last,
        "finished": engine.finished or stopped_early,
        "stopped_early": stopped_early,
        "template": template.to_dict(),
        "out": str(out),
    }
