"""Every "log π of these tokens" under a causal LM, one function per layout: per token, summed per sequence,
weighted per sequence (credit masks), and summed per packed sequence.

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


def weighted_sequence_logprobs(
    logits: Tensor,  # (B, T, V) logits[:, t] scores labels[:, t] (already shifted)
    labels: Tensor,  # (B, T) token ids; any value where weight is 0
    weight: Tensor,  # (B, T) float token weights w_t (the keep-mask as float, 0 outside the response)
) -> Tensor:
    """Σ_t w_t · log π(labels_t) per row: (B, T, V), (B, T), (B, T) -> (B,) float32 (docs/methods/adaptive_segment_reward.md §2.6, h = Σ_t w_t Δ_t).

    With w = the response mask as float it equals `rlxf.logprobs.sequence_logprobs` bit for bit (same kernel, same
    products and sums), so an all-ones keep-mask reproduces the unmasked losses exactly. The gradient with respect to
    the logits of a position with w_t = 0 is exactly 0.
    """
    safe_labels = labels.masked_fill(weight == 0, 0)  # positions of weight 0 contribute 0 · finite = 0
    return (token_logprobs(logits, safe_labels) * weight.to(torch.float32)).sum(-1)


def packed_sequence_logprobs(
    logits: Tensor, batch: dict[str, Tensor], num_sequences: int, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Summed log-probs of each packed sequence's response tokens and their counts (`rlxf.data.packing.pack_pairs`):
    (R, L, V) logits -> (S,), (S,) with S = num_sequences.

    Only the N predicting positions are normalised: `logit[target] - logsumexp(logits)` on an (N, V) float32 copy.
    With `weight` (N,) (token weights aligned with `batch["target_index"]`, e.g. a credit keep-mask) the sums are
    Σ_t w_t log π(y_t) and the counts Σ_t w_t; all-ones weights give the unweighted numbers bit for bit.
    """
    picked = logits.flatten(0, 1)[batch["target_index"]].float()  # (R*L, V) -> (N, V)
    logps = picked.gather(-1, batch["target_ids"][:, None]).squeeze(-1) - picked.logsumexp(-1)  # (N,)
    w = torch.ones_like(logps) if weight is None else weight.to(logps.dtype)  # (N,)
    terms = logps if weight is None else logps * w
    sums = logps.new_zeros(num_sequences).index_add(0, batch["target_seq"], terms)  # (S,)
    counts = logps.new_zeros(num_sequences).index_add(0, batch["target_seq"], w)  # (S,)
    return sums, counts
