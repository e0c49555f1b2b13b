"""Reward-model training on preference pairs: Bradley–Terry with optional margins, soft labels and centring.

Chosen and rejected sequences go through the model in one forward pass (2B rows, chosen first).
Shapes: B pairs, L sequence length.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlxf.data.formats import load_preferences
from rlxf.data.packing import check_packing_supported, pack_pairs
from rlxf.data.tokenize import encode_preferences, pad
from rlxf.engine import Engine, TrainConfig
from rlxf.hf import load_tokenizer
from rlxf.losses import bradley_terry_losses, reward_centering_penalty
from rlxf.models.reward_model import RewardModel, last_token_index
from rlxf.trainers.common import load_encoded

logger = logging.getLogger(__name__)


@dataclass
class RewardModelConfig:
    model: str = ""
    """save_pretrained directory of the backbone (a causal LM, e.g. the SFT model) or of a reward model. Required."""
    train_file: str = ""
    """Preference pairs: `prompt`, `chosen`, `rejected` (+ optional `margin`, `label_prob`). Required."""
    eval_file: str = ""
    """Held-out pairs for pairwise accuracy (optional)."""
    out: str = "runs/rm"
    """Output directory: metrics, checkpoints, and the final reward model in `final/`."""
    max_length: int = 256
    """Longest prompt + response in tokens; longer prompts are cut from the left."""
    max_prompt_length: int = 192
    """Longest prompt in tokens."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed or over-long row does: stop with an error, or be skipped and written to a side file."""
    use_margin: bool = True
    """Subtract the row's `margin` column (when present) inside the sigmoid."""
    use_label_prob: bool = True
    """Train on the row's soft label `label_prob` (when present) instead of a hard 1."""
    center_rewards_coef: float = 0.0
    """Weight of the (r_chosen + r_rejected)² penalty that keeps rewards centred on 0; 0 disables it."""
    pack: bool = True
    """Pack each micro-batch's pairs into rows without padding, each prompt computed once (same rewards, fewer
    token positions); needs the 'sdpa' or 'eager' attention implementation."""
    loss: Literal["bradley_terry", "ranking", "plackett_luce", "pairwise_bt"] = "bradley_terry"
    """'bradley_terry' trains on preference pairs. On ranking data (`responses` best → worst): 'ranking' sums a
    utility U over all margins of rewards bounded in (0, 1) (reward-collapse paper), 'plackett_luce' is the
    listwise likelihood, 'pairwise_bt' is unbounded Bradley–Terry over all pairs."""
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
    """Ranking losses: mean over each prompt's pairs then over prompts, or mean over all pairs of the batch."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-4, batch_size=32, epochs=1.0))
    """Optimisation settings (engine)."""


def collate_pairs(
    rows: list[dict[str, Any]], pad_id: int, use_margin: bool, use_label_prob: bool, pack: bool = False
) -> dict[str, Any]:
    """2B right-padded sequences, chosen rows first (or the pairs packed, see `rlxf.data.packing`), plus per-pair margin
    and soft label. `num_tokens` counts the tokens of the 2B sequences either way."""
    batch: dict[str, Any] = {
        "num_units": len(rows),
        "num_tokens": sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
    }
    if pack:
        batch |= pack_pairs(rows, pad_id)
    else:
        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
        batch["input_ids"], batch["attention_mask"] = pad(seqs, pad_id, side="right")
    if use_margin and any(r.get("margin") is not None for r in rows):
        batch["margin"] = torch.tensor([float(r.get("margin") or 0.0) for r in rows])
    if use_label_prob and any(r.get("label_prob") is not None for r in rows):
        lp = [r.get("label_prob") for r in rows]
        batch["label_prob"] = torch.tensor([1.0 if p is None else float(p) for p in lp])
    return batch


def pair_rewards(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected sequences: (B,), (B,)."""
    if "last_index" in batch:  # packed pairs
        values = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (R, L)
        return values.flatten()[batch["last_index"]].chunk(2)  # (R*L,) -> (2B,)
    values = model(batch["input_ids"], batch["attention_mask"])  # (2B, L)
    rewards = values.gather(-1, last_token_index(batch["attention_mask"])[:, None]).squeeze(-1)  # (2B,)
    return rewards.chunk(2)


def pair_loss_and_metrics(
    model: torch.nn.Module, batch: dict[str, Any], center_coef: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
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
        "rewards/accuracies": ((margins > 0).float() + 0.5 * (margins == 0).float()).sum(),
    }
    return losses.sum(), metrics


@torch.no_grad()
def evaluate_pairs(model: RewardModel, rows: list[dict[str, Any]], pad_id: int, batch_size: int, device) -> dict:
    """Pairwise accuracy (ties count half) and mean BT loss over `rows` (hard labels)."""
    was_training = model.training
    model.eval()
    sums = {"acc": 0.0, "loss": 0.0}
    for i in range(0, len(rows), batch_size):
        batch = collate_pairs(rows[i : i + batch_size], pad_id, use_margin=False, use_label_prob=False)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        chosen, rejected = pair_rewards(model, batch)
        sums["acc"] += ((chosen > rejected).float() + 0.5 * (chosen == rejected).float()).sum().item()
        sums["loss"] += bradley_terry_losses(chosen, rejected).sum().item()
    model.train(was_training)
    n = max(len(rows), 1)
    return {"eval/pairwise_accuracy": sums["acc"] / n, "eval/bt_loss": sums["loss"] / n}


def train_reward_model(cfg: RewardModelConfig, model: RewardModel | None = None) -> dict[str, Any]:
    """Train a reward model on preference pairs; returns the metric history and the final evaluation."""
    if cfg.loss != "bradley_terry":
        from rlxf.trainers.ranking_rm import train_ranking_reward_model

        return train_ranking_reward_model(cfg, model)
    tokenizer = load_tokenizer(cfg.model)
    if model is None:
        model = RewardModel.from_pretrained(cfg.model)
    model.config.pad_token_id = tokenizer.pad_token_id
    out = Path(cfg.out)

    def encoded(path: str, split: str) -> list[dict[str, Any]]:
        lengths = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
        return load_encoded(
            load_preferences, encode_preferences, path, tokenizer, out, split, cfg.on_bad_row, **lengths
        )

    rows = encoded(cfg.train_file, "train")
    eval_rows = encoded(cfg.eval_file, "eval") if cfg.eval_file else []
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
    collate = lambda b: collate_pairs(b, pad_id, cfg.use_margin, cfg.use_label_prob, cfg.pack)
    for micro_batches in engine.steps(rows, collate, lengths):
        engine.train_step(micro_batches, lambda batch: pair_loss_and_metrics(rm, batch, cfg.center_rewards_coef))
        if engine.should_evaluate():
            evaluate()

    if engine.finished:
        engine.save_final(tokenizer)
    engine.close()
    return {"history": engine.history, "eval": final_eval, "finished": engine.finished, "out": str(out)}
