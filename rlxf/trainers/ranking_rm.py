"""Ranking reward models: K completions per prompt, each scored once, trained on all C(K, 2) margins.

Song, Cai, Lee & Su, "Reward Collapse in Aligning Large Language Models" (arXiv:2305.17608);
docs/methods/reward_collapse.md §2. Three losses on ranking rows (`prompt`, `responses` best -> worst, or + `scores`):
- "ranking": r = σ(value at the last token) ∈ (0, 1) and L = −mean Ũ_p(r_i − r_j) over the ranked pairs (i above j),
  with the utility U chosen **per prompt inside the batch** (a fixed U, or the prompt-aware rule: `openness` if
  given, else closed -> x, open -> −1/x, else o = ½);
- "plackett_luce": the listwise likelihood of the ranking on the raw value;
- "pairwise_bt": unbounded Bradley–Terry on the raw value, over all ranked pairs.

This module holds the config, the loss with its metrics and the training loop. Batching, packing, scoring and
held-out evaluation of ranking rows are in `rlxf.collapse.ranking` (shared with `rlxf collapse diagnose`); its
docstring describes the layouts and the units. Loss functions return sums over units, so accumulation and
multi-process runs give the mean over the whole step.

The config is its own (`RankingRewardModelConfig`), not the pairs trainer's: rankings have utilities and a reduction,
pairs have margins, soft labels and centring; so `rlxf.trainers.rm` and this module do not import each other.

Shapes: P prompts, K responses per prompt (the most in the batch).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from rlxf.collapse.losses import pairwise_bt_loss, plackett_luce_loss, ranking_pairs, utility_ranking_loss
from rlxf.collapse.ranking import (
    PROMPT_AWARE,
    RANKING_LOSSES,
    collate_rankings,
    completion_values,
    evaluate_rankings,
    row_utilities,
    unit_weights,
)
from rlxf.config import check_ranges
from rlxf.data.formats import load_rankings
from rlxf.data.packing import check_packing_supported
from rlxf.data.tokenize import encode_rankings
from rlxf.engine import Engine, TrainConfig
from rlxf.errors import UserError
from rlxf.hf import load_model, load_tokenizer
from rlxf.losses import pairwise_accuracy
from rlxf.models.lora import LoraSettings, add_lora
from rlxf.models.reward_model import RewardModel
from rlxf.trainers.common import check_eval_split, load_encoded_splits

logger = logging.getLogger(__name__)


@dataclass
class RankingRewardModelConfig:
    model: str = ""
    """save_pretrained directory of the backbone (a causal LM, e.g. the SFT model) or of a reward model. Required."""
    train_file: str = ""
    """Ranking rows: `prompt`, `responses` best -> worst (or + `scores`, higher is better), optional `prompt_type`
    (open / closed) and `openness` in [0, 1]. Required."""
    eval_file: str = ""
    """Held-out ranking rows for pairwise accuracy, loss and (loss=ranking) the collapse diagnostics (optional)."""
    eval_split: float = 0.0
    """Hold out this share of train_file's rows (e.g. 0.1) for evaluation when no eval_file is given: seeded by
    train.seed, deterministic, disjoint from training; the held-out rows are written to `<out>/eval_split.jsonl`.
    In [0, 1); 0 holds out nothing; giving it with eval_file is an error."""
    out: str = "runs/ranking_rm"
    """Output directory: metrics, checkpoints, and the final reward model in `final/`."""
    max_length: int = 256
    """Longest prompt + response in tokens; longer prompts are cut from the left."""
    max_prompt_length: int = 192
    """Longest prompt in tokens."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed or over-long row does: stop with an error, or be skipped and written to a side file."""
    pack: bool = True
    """Pack each prompt with all its responses into one segment, the prompt computed once and nothing padded (same
    rewards, fewer token positions); needs the 'sdpa' or 'eager' attention implementation."""
    loss: Literal["ranking", "plackett_luce", "pairwise_bt"] = "ranking"
    """'ranking' sums a utility U over all margins of rewards bounded in (0, 1) (reward-collapse paper),
    'plackett_luce' is the listwise likelihood, 'pairwise_bt' is unbounded Bradley–Terry over all pairs."""
    utility: str = "log"
    """U for loss=ranking: linear, log, inverse, power, neg_power, logsigmoid, or prompt_aware (per prompt:
    `openness` if given, else closed → linear, open → inverse)."""
    utility_gamma: float = 0.5
    """γ of the power / neg_power utilities."""
    utility_c: float = 4.0
    """c of the logsigmoid utility log σ(c·x)."""
    utility_eps: float = 0.1
    """ε of the smoothed utilities (linear extension below 0)."""
    ranking_reduction: Literal["prompt", "pairs"] = "prompt"
    """Mean over each prompt's pairs then over prompts, or mean over all pairs of the batch."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (`lora.r` > 0) instead of training every weight: final/ then holds the adapters, which
    `peft.PeftModel.from_pretrained`, `rlxf merge` and every rlxf stage load (README, "LoRA adapters")."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4, batch_size=32, epochs=1.0))
    """Optimisation settings (engine); batch sizes count prompts, each with all its responses."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "max_length": ">=2",
                "max_prompt_length": ">=1",
                "utility_gamma": ">0",
                "utility_c": ">0",
                "utility_eps": ">=0",
            },
        )
        check_eval_split(self.eval_split, self.eval_file)


# ---- loss and metrics ----------------------------------------------------------------------------------------------
@torch.no_grad()
def _unit_stats(values: Tensor, mask: Tensor, scores: Tensor, weights: Tensor) -> dict[str, Tensor]:
    """Per-prompt accuracy (ties half), mean margin over ranked pairs, and std / mean of the rewards, each summed
    over prompts with the prompt's unit weight (so the engine's division by units gives the step's mean)."""
    pairs = ranking_pairs(mask, scores).to(values.dtype)  # (P, K, K)
    d = values[:, :, None] - values[:, None, :]  # (P, K, K)
    n_pairs = pairs.sum((-1, -2)).clamp(min=1)  # (P,)
    hits = pairwise_accuracy(values[:, :, None], values[:, None, :], reduction="none")  # (P, K, K)
    acc = (hits * pairs).sum((-1, -2)) / n_pairs  # (P,)
    margin = (d * pairs).sum((-1, -2)) / n_pairs  # (P,)
    m = mask.to(values.dtype)
    count = m.sum(-1).clamp(min=1)  # (P,)
    mean = (values * m).sum(-1) / count  # (P,)
    std = ((((values - mean[:, None]) ** 2) * m).sum(-1) / count).sqrt()  # (P,) population std over responses
    w = weights.to(values.dtype)
    return {
        "rewards/accuracies": (acc * w).sum(),
        "rewards/margins": (margin * w).sum(),
        "rewards/mean": (mean * w).sum(),
        "rewards/profile_std": (std * w).sum(),
    }


def ranking_loss_and_metrics(
    model: torch.nn.Module, batch: dict[str, Any], loss: str, reduction: str = "prompt"
) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed loss over the batch's units and summed metrics (units: see `rlxf.collapse.ranking`)."""
    values = completion_values(model, batch)  # (P, K)
    mask, scores = batch["completion_mask"], batch["scores"]
    weights = unit_weights(mask, scores, loss, reduction).to(values.device, values.dtype)  # (P,)
    if loss == "ranking":
        # r = σ(a) ∈ (0, 1): without the bound P_n has no finite optimum (docs/methods/reward_collapse.md §2.1)
        rewards = torch.sigmoid(values)
        mean_loss, _ = utility_ranking_loss(rewards, batch["utilities"], mask, scores, reduction)
    elif loss == "pairwise_bt":
        rewards = values
        mean_loss, _ = pairwise_bt_loss(values, mask, scores, reduction)
    elif loss == "plackett_luce":
        rewards = values
        mean_loss, _ = plackett_luce_loss(values, mask, scores)
    else:
        raise UserError(f"loss must be one of {list(RANKING_LOSSES)}, got {loss!r}")
    # The pure losses average over their units; × units turns that back into the sum the engine expects.
    loss_sum = mean_loss * weights.sum()
    metrics = {f"loss/{loss}": loss_sum.detach(), **_unit_stats(rewards.detach(), mask, scores, weights)}
    return loss_sum, metrics


# ---- training ------------------------------------------------------------------------------------------------------
def train_ranking_reward_model(cfg: RankingRewardModelConfig, model: RewardModel | None = None) -> dict[str, Any]:
    """Train a reward model on ranking rows with cfg.loss in ("ranking", "plackett_luce", "pairwise_bt").

    Returns {"history": logged metrics, "eval": the last evaluation, "finished": bool, "out": run directory}; the
    final model is saved to `<out>/final` (reload it with `RewardModel.from_pretrained`).
    """
    if cfg.loss not in RANKING_LOSSES:
        raise UserError(f"train_ranking_reward_model needs loss in {list(RANKING_LOSSES)}, got {cfg.loss!r}")
    if cfg.loss == "plackett_luce" and cfg.ranking_reduction != "prompt":
        raise UserError("plackett_luce is a per-prompt (listwise) likelihood; use --ranking_reduction prompt")
    if cfg.loss != "ranking" and cfg.utility == PROMPT_AWARE:
        logger.warning(
            "--utility prompt_aware has no effect with loss=%s (it only routes U for loss=ranking)", cfg.loss
        )
    tokenizer = load_tokenizer(cfg.model)
    if model is None:
        torch.manual_seed(cfg.train.seed)  # the new reward head is drawn here, before the engine seeds
        model = load_model(
            cfg.model, RewardModel.from_pretrained, "reward model", tokenizer=tokenizer, **cfg.train.load_kwargs()
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    model = add_lora(model, cfg.lora, cfg.model, cfg.train.seed)
    out = Path(cfg.out)

    lengths = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
    rows, eval_rows = load_encoded_splits(load_rankings, encode_rankings, cfg, tokenizer, out, **lengths)
    if cfg.loss == "ranking":
        for enc in (rows, eval_rows) if eval_rows else (rows,):
            for row, u in zip(enc, row_utilities(enc, cfg.utility, cfg.utility_gamma, cfg.utility_c, cfg.utility_eps)):
                row["_utility"] = u
    if cfg.loss == "ranking":
        used = Counter(str(r["_utility"]) for r in rows)
        logger.info("loss=ranking, r = σ(value); utilities in training: %s", dict(used))
    pad_id = tokenizer.pad_token_id
    engine = Engine(cfg.train, out, model, num_examples=len(rows), config_dict=asdict(cfg))
    rm = engine.model
    final_eval: dict[str, float] = {}
    if engine.step == 0 and cfg.loss == "ranking" and cfg.utility == PROMPT_AWARE:
        fallbacks = sum(r.get("openness") is None and r.get("prompt_type") is None for r in rows)
        engine.log({"data/utility_fallbacks": float(fallbacks)})

    eval_sequences = cfg.train.per_device_batch_size * 8  # per forward pass: a training micro-batch's worth at K = 8

    def evaluate() -> None:
        nonlocal final_eval
        if eval_rows and engine.is_main:
            final_eval = evaluate_rankings(engine.unwrap(), eval_rows, pad_id, cfg.loss, eval_sequences, engine.device)
            engine.log(final_eval)

    if engine.step == 0:
        evaluate()
    # Cost of a row for length bucketing: its packed segment, or its longest padded sequence.
    longest = sum if cfg.pack else max
    lengths = [len(r["prompt_ids"]) + longest(map(len, r["responses_ids"])) for r in rows]
    if cfg.pack:
        check_packing_supported(engine.unwrap())
    collate = lambda b: collate_rankings(b, pad_id, cfg.loss, cfg.ranking_reduction, cfg.pack)
    for micro_batches in engine.steps(rows, collate, lengths):
        engine.train_step(micro_batches, lambda b: ranking_loss_and_metrics(rm, b, cfg.loss, cfg.ranking_reduction))
        if engine.should_evaluate():
            evaluate()

    if engine.finished:
        engine.save_final(tokenizer)
    engine.close()
    return {"history": engine.history, "eval": final_eval, "finished": engine.finished, "out": str(out)}
