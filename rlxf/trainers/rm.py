"""Reward-model training on preference pairs: Bradley–Terry with optional margins, soft labels and centring.

Chosen and rejected sequences go through the model in one forward pass (2B rows, chosen first); collating and scoring
pairs live in `rlxf.models.reward_model`, shared with `rlxf eval`. Rankings (K responses per prompt) have their own
trainer and config, `rlxf.trainers.ranking_rm`: the two share no fields beyond the basics, so neither imports the
other.

Shapes: B pairs.
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
from rlxf.data.packing import check_packing_supported, packed_attention, resolve_pack_shapes
from rlxf.data.tokenize import encode_preferences
from rlxf.engine import Engine, TrainConfig
from rlxf.errors import UserError
from rlxf.hf import load_model, load_tokenizer
from rlxf.losses import bradley_terry_losses, pairwise_accuracy, reward_centering_penalty
from rlxf.models.lora import LoraSettings, add_lora
from rlxf.models.reward_model import RewardModel, collate_pairs, evaluate_pairs, pair_rewards
from rlxf.trainers.common import check_eval_split, load_encoded_splits

logger = logging.getLogger(__name__)


@dataclass
class RewardModelConfig:
    model: str = ""
    """save_pretrained directory of the backbone (a causal LM, e.g. the SFT model) or of a reward model. Required."""
    train_file: str = ""
    """Preference pairs: `prompt`, `chosen`, `rejected` (+ optional `margin`, `label_prob`). Required."""
    eval_file: str = ""
    """Held-out pairs for pairwise accuracy (optional)."""
    eval_split: float = 0.0
    """Hold out this share of train_file's rows (e.g. 0.1) for evaluation when no eval_file is given: seeded by
    train.seed, deterministic, disjoint from training; the held-out rows are written to `<out>/eval_split.jsonl`.
    In [0, 1); 0 holds out nothing; giving it with eval_file is an error."""
    out: str = "runs/rm"
    """Output directory: metrics, checkpoints, and the final reward model in `final/`."""
    max_length: int = 256
    """Longest prompt + response in tokens; longer prompts are cut from the left."""
    max_prompt_length: int = 192
    """Longest prompt in tokens."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed or over-long row does: stop with an error, or be skipped and written to a side file."""
    allow_empty_responses: bool = False
    """Keep rows whose response is empty (or only whitespace) instead of rejecting them; the response is then EOS
    alone. Off by default (an empty response is usually a broken export); in HH-RLHF an empty reply is a refusal."""
    truncate_responses: bool = False
    """Cut over-long responses instead of rejecting the row (TRL's rule): the prompt keeps up to max_prompt_length
    tokens, the responses the rest of max_length (a cut response has no EOS); counted and logged."""
    use_margin: bool = True
    """Subtract the row's `margin` column (when present) inside the sigmoid."""
    use_label_prob: bool = True
    """Train on the row's soft label `label_prob` (when present) instead of a hard 1."""
    center_rewards_coef: float = 0.0
    """Weight of the (r_chosen + r_rejected)² penalty that keeps rewards centred on 0; 0 disables it."""
    pack: bool = True
    """Pack each micro-batch's pairs into rows without padding, each prompt computed once (same rewards, fewer
    token positions); needs the 'sdpa' or 'eager' attention implementation."""
    pack_length_multiple: int = 0
    """Packed rows are this many tokens long or a multiple of it, so micro-batch shapes repeat (a GPU reuses attention
    plans and memory blocks); same rewards up to float rounding. 0: 256 on a GPU, 1 (tightest) on the CPU."""
    pack_rows_multiple: int = 0
    """Packed rows per micro-batch rounded up to a multiple of this (rows of padding); 0: 2 on a GPU, 1 on the CPU."""
    packed_attention: Literal["auto", "efficient", "cudnn", "flash", "math"] = "auto"
    """SDPA kernel for packed rows (their block mask): 'auto' lets PyTorch choose (cuDNN on recent GPUs, which builds
    a plan per new shape); 'efficient' the memory-efficient kernel (no plans); 'math' the reference. No effect on
    the CPU beyond 'math'."""
    loss: Literal["bradley_terry"] = "bradley_terry"
    """The only loss on pairs; recorded in the run's config.json, where `rlxf collapse diagnose` reads it. Ranking
    losses (ranking, plackett_luce, pairwise_bt) are `rlxf ranking-rm`, which `rlxf rm --loss ranking` runs."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (`lora.r` > 0) instead of training every weight: final/ then holds the adapters, which
    `peft.PeftModel.from_pretrained`, `rlxf merge` and every rlxf stage load (README, "LoRA adapters")."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4, batch_size=32, epochs=1.0))
    """Optimisation settings (engine)."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "max_length": ">=2",
                "max_prompt_length": ">=1",
                "center_rewards_coef": ">=0",
                "pack_length_multiple": ">=0",
                "pack_rows_multiple": ">=0",
            },
        )
        check_eval_split(self.eval_split, self.eval_file)


def pair_loss_and_metrics(
    model: torch.nn.Module, batch: dict[str, Any], center_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """BT loss (+ centring penalty) and metrics, each summed over the batch's pairs: the engine divides by pairs."""
    chosen, rejected = pair_rewards(model, batch)
    losses = bradley_terry_losses(chosen, rejected, batch.get("margin"), batch.get("label_prob"))
    metrics = {"loss/bt": losses.sum().detach()}
    if center_coef:
        penalty = center_coef * reward_centering_penalty(chosen, rejected)
        losses = losses + penalty
        metrics["loss/centering"] = penalty.sum().detach()
    margins = (chosen - rejected).detach()
    metrics |= {
        "rewards/chosen": chosen.detach().sum(),
        "rewards/rejected": rejected.detach().sum(),
        "rewards/margins": margins.sum(),
        "rewards/accuracies": pairwise_accuracy(chosen.detach(), rejected.detach(), reduction="sum"),
    }
    return losses.sum(), metrics


def train_reward_model(cfg: RewardModelConfig, model: RewardModel | None = None) -> dict[str, Any]:
    """Train a reward model on preference pairs; returns the metric history and the final evaluation."""
    if cfg.loss != "bradley_terry":
        raise UserError(
            f"loss={cfg.loss!r} is not Bradley–Terry on pairs; ranking losses train with rlxf.trainers.ranking_rm."
            "train_ranking_reward_model(RankingRewardModelConfig(...)) (`rlxf ranking-rm`)"
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

    rows, eval_rows = load_encoded_splits(
        functools.partial(load_preferences, allow_empty_responses=cfg.allow_empty_responses),
        encode_preferences,
        cfg,
        tokenizer,
        out,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        truncate_responses=cfg.truncate_responses,
    )
    pad_id = tokenizer.pad_token_id
    engine = Engine(cfg.train, out, model, num_examples=len(rows), config_dict=asdict(cfg))
    rm = engine.model
    final_eval: dict[str, float] = {}

    def evaluate() -> None:
        nonlocal final_eval
        if eval_rows and engine.is_main:
            final_eval = evaluate_pairs(
                engine.unwrap(), eval_rows, pad_id, cfg.train.per_device_batch_size, engine.device
            )
            engine.log(final_eval)

    if engine.step == 0:
        evaluate()
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    if cfg.pack:
        check_packing_supported(engine.unwrap())
    shapes = resolve_pack_shapes(cfg.pack_length_multiple, cfg.pack_rows_multiple, engine.device)
    collate = lambda b: collate_pairs(b, pad_id, cfg.use_margin, cfg.use_label_prob, cfg.pack, shapes)
    for micro_batches in engine.steps(rows, collate, lengths):
        with packed_attention(cfg.packed_attention if cfg.pack else "auto"):
            engine.train_step(micro_batches, lambda batch: pair_loss_and_metrics(rm, batch, cfg.center_rewards_coef))
        if engine.should_evaluate():
            evaluate()

    if engine.finished:
        engine.save_final(tokenizer)
    engine.close()
    return {"history": engine.history, "eval": final_eval, "finished": engine.finished, "out": str(out)}
