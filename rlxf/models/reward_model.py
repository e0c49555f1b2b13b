"""Reward models: a scalar head on a causal-LM backbone.

Stored as an ordinary `AutoModelForSequenceClassification` directory with one label (what TRL and vLLM expect),
but read here by our own pooling: the head is applied at every position, giving a value per token, and the
sequence reward is the value at the last real token. Pooling goes by the attention mask, never by the pad id,
so it is right with left or right padding and with a pad token equal to EOS.

Shapes: B batch, T tokens, H hidden size.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForSequenceClassification


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
        return cls(AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs))

    def save_pretrained(self, path: str | Path) -> None:
        self.hf.save_pretrained(path)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Reward head read at every position: (B, T) ids -> (B, T) values (float32).

        `attention_mask` is (B, T), 1 on real tokens; or a (B, 1, T, T) boolean mask with explicit `position_ids`
        for packed pairs (`rlxf.data.packing`).
        """
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        hidden = self.hf.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state  # (B, T, H)
        return self.hf.score(hidden).squeeze(-1).float()  # (B, T, 1) -> (B, T)

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
