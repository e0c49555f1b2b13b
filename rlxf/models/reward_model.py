"""Reward models: a scalar head on a causal-LM backbone.

Stored as an ordinary `AutoModelForSequenceClassification` directory with one label (what TRL and vLLM expect),
but read here by our own pooling: the head is applied at every position, giving a value per token, and the
sequence reward is the value at the last real token. Pooling goes by the attention mask, never by the pad id,
so it is right with left or right padding and with a pad token equal to EOS.

Scoring preference pairs (collate, rewards, held-out accuracy) lives here too, beside the model it runs, because the
Bradley–Terry trainer (`rlxf.trainers.rm`) and `rlxf eval` both need it and evaluation must not depend on a trainer.

Shapes: B batch (pairs), T tokens, H hidden size, R packed rows.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

from rlxf.data.packing import PackShapes, pack_pairs
from rlxf.data.tokenize import pad
from rlxf.losses import bradley_terry_losses, pairwise_accuracy
from rlxf.models.lora import transformers_model

logger = logging.getLogger(__name__)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Position ids that start at 0 on the first real token, so left padding does not shift them. (B, T) -> (B, T)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last real token of each row: (B, T) -> (B,). Works for left and right padding."""
    t = attention_mask.shape[-1]
    return t - 1 - attention_mask.long().flip(-1).argmax(-1)


class RewardModel(nn.Module):
    """Wraps a `*ForSequenceClassification` model (num_labels=1); `forward` returns per-token values (B, T)."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if not hasattr(hf_model, "score"):
            raise ValueError(
                f"{type(hf_model).__name__} has no `score` head; rlxf reward models need a *ForSequenceClassification "
                "architecture with a `score` layer (Llama, Mistral, Qwen, GPT-2, ...)"
            )
        self.hf = hf_model
        self.config = hf_model.config

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> RewardModel:
        """Load a saved reward model, or start one from a causal-LM directory (the head is then freshly initialised)."""
        config = AutoConfig.from_pretrained(path)
        if config.pad_token_id is None:
            config.pad_token_id = config.eos_token_id
        config.num_labels = 1
        # transformers prints a table for the missing head of every causal-LM start; one line says it instead
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            model, info = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, output_loading_info=True, **kwargs
            )
        finally:
            hf_logging.set_verbosity(verbosity)
        new = sorted(k for k in info["missing_keys"] if k.startswith("score."))
        other = sorted(set(info["missing_keys"]) - set(new))
        if new:
            logger.info("reward head %s is new (initialised from scratch): %s holds a causal LM", new, path)
        if other or info["mismatched_keys"]:
            logger.warning(
                "%s: weights missing %s and of another shape %s were initialised from scratch",
                path, other, sorted(info["mismatched_keys"]),
            )  # fmt: skip
        return cls(model)

    def save_pretrained(self, path: str | Path) -> None:
        self.hf.save_pretrained(path)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Reward head read at every position: (B, T) ids -> (B, T) values (float32).

        `attention_mask` is (B, T), 1 on real tokens; or a (B, 1, T, T) boolean mask with explicit `position_ids`
        for packed pairs (`rlxf.data.packing`).
        """
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        net = transformers_model(self.hf)  # `hf` is a PeftModel when the reward model trains LoRA adapters
        hidden = net.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, T, H)
        return net.score(hidden).squeeze(-1).float()  # (B, T, 1) -> (B, T)

    def sequence_rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Reward at the last real token: (B, T) -> (B,)."""
        values = self(input_ids, attention_mask)
        return values.gather(-1, last_token_index(attention_mask)[:, None]).squeeze(-1)


@torch.no_grad()
def score_sequences(model: RewardModel, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 32) -> Tensor:
    """Sequence rewards for many rows, in chunks, in eval mode: (N, T) -> (N,)."""
    was_training = model.training
    model.eval()
    out = [
        model.sequence_rewards(input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
        for i in range(0, input_ids.shape[0], batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


# ---- preference pairs ----------------------------------------------------------------------------------------------
def collate_pairs(
    rows: list[dict[str, Any]],
    pad_id: int,
    use_margin: bool,
    use_label_prob: bool,
    pack: bool = False,
    shapes: PackShapes = PackShapes(),
) -> dict[str, Any]:
    """2B right-padded sequences, chosen rows first (or the pairs packed in `shapes`, see `rlxf.data.packing`), plus
    per-pair margin and soft label. `num_tokens` counts the tokens of the 2B sequences either way."""
    batch: dict[str, Any] = {
        "num_units": len(rows),
        "num_tokens": sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
    }
    if pack:
        batch |= pack_pairs(rows, pad_id, length_multiple=shapes.length_multiple, rows_multiple=shapes.rows_multiple)
    else:
        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
        batch["input_ids"], batch["attention_mask"] = pad(seqs, pad_id, side="right")
    if use_margin and any(r.get("margin") is not None for r in rows):
        batch["margin"] = torch.tensor([float(r.get("margin") or 0.0) for r in rows])
    if use_label_prob and any(r.get("label_prob") is not None for r in rows):
        lp = [r.get("label_prob") for r in rows]
        batch["label_prob"] = torch.tensor([1.0 if p is None else float(p) for p in lp])
    return batch


def pair_rewards(model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Rewards of the chosen and rejected sequences of a `collate_pairs` batch: (B,), (B,)."""
    if "last_index" in batch:  # packed pairs
        values = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (R, T)
        return values.flatten()[batch["last_index"]].chunk(2)  # (R*T,) -> (2B,)
    values = model(batch["input_ids"], batch["attention_mask"])  # (2B, T)
    rewards = values.gather(-1, last_token_index(batch["attention_mask"])[:, None]).squeeze(-1)  # (2B,)
    return rewards.chunk(2)


@torch.no_grad()
def evaluate_pairs(model: RewardModel, rows: list[dict[str, Any]], pad_id: int, batch_size: int, device) -> dict:
    """Pairwise accuracy (ties count half) and mean BT loss over encoded pairs `rows` (hard labels), in eval mode."""
    was_training = model.training
    model.eval()
    sums = {"acc": 0.0, "loss": 0.0}
    for i in range(0, len(rows), batch_size):
        batch = collate_pairs(rows[i : i + batch_size], pad_id, use_margin=False, use_label_prob=False)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        chosen, rejected = pair_rewards(model, batch)
        sums["acc"] += pairwise_accuracy(chosen, rejected, reduction="sum").item()
        sums["loss"] += bradley_terry_losses(chosen, rejected).sum().item()
    model.train(was_training)
    n = max(len(rows), 1)
    return {"eval/pairwise_accuracy": sums["acc"] / n, "eval/bt_loss": sums["loss"] / n}
