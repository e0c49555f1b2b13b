"""Log-probabilities of given tokens under a causal LM.

Shapes: B batch, T tokens, V vocab. Inputs are already aligned: `logits[:, t]` scores `labels[:, t]`
(the caller shifts by one), so left and right padding need no special case: the mask says which positions count.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of logits turned into log-probs at a time: bounds the float32 copy to chunk × T × V instead of B × T × V.
LOGSOFTMAX_CHUNK_ROWS = 4


def token_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels] per position: (B, T, V), (B, T) -> (B, T), in float32.

    Equals `logits.float().log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)` but computes it as
    `logit[label] - logsumexp(logits)` a few rows at a time, so no second (B, T, V) tensor is materialised.
    """
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, logits.shape[0], LOGSOFTMAX_CHUNK_ROWS):
        rows = logits[start : start + LOGSOFTMAX_CHUNK_ROWS].float()  # (b, T, V)
        picked = rows.gather(-1, labels[start : start + LOGSOFTMAX_CHUNK_ROWS, :, None]).squeeze(-1)  # (b, T)
        out[start : start + LOGSOFTMAX_CHUNK_ROWS] = picked - rows.logsumexp(-1)
    return out


def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probs of `labels` over positions where `mask` is 1: (B, T, V), (B, T), (B, T) -> (B,)."""
    safe_labels = labels.masked_fill(~mask.bool(), 0)  # padding may hold -100 or any id; it is masked out anyway
    return (token_logprobs(logits, safe_labels) * mask.to(torch.float32)).sum(-1)


def shift_for_next_token(logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Align a causal LM's outputs with its targets: position t predicts token t + 1.

    (B, L, V), (B, L), (B, L) -> logits (B, L-1, V), labels (B, L-1), mask (B, L-1); `target_mask` marks the
    tokens whose probability is wanted (e.g. the response tokens).
    """
    return logits[:, :-1], input_ids[:, 1:], target_mask[:, 1:]
