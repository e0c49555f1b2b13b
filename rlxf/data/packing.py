"""Pack preference pairs into rows without padding, computing each pair's prompt once.

A pair (prompt, chosen, rejected) becomes one segment `prompt + chosen + rejected`. In the segment's attention mask
the rejected tokens see the prompt and themselves but never the chosen tokens, and their position ids continue from
the end of the prompt, so every token has the context and position it has in the padded two-sequence layout: the
hidden states are the same up to float rounding. Segments are placed into rows first-fit decreasing, a row holding
at most `capacity` tokens; a segment longer than that gets a row of its own.

Compared with 2B right-padded rows this computes the prompt once instead of twice and no padding; on FactWorld
(prompt ≈ 15, responses ≈ 12 tokens, batch 16) that is ≈ 39 token positions per pair instead of ≈ 90.

Shapes: B pairs, R packed rows, L row length, N response tokens of all 2B sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of `sizes` grouped into bins of total size <= capacity (an oversized item gets its own bin).

    Items are placed longest first (ties by index), each into the first bin it fits, so the result is deterministic.
    """
    bins: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for k in range(len(bins)):
            if fill[k] + sizes[i] <= capacity:
                bins[k].append(i)
                fill[k] += sizes[i]
                break
        else:
            bins.append([i])
            fill.append(sizes[i])
    return bins


def round_up(x: int, multiple: int) -> int:
    """`x` rounded up to a multiple of `multiple` (>= 1)."""
    return -(-x // multiple) * multiple


def pack_pairs(
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    capacity: int = 0,
    length_multiple: int = 1,
    rows_multiple: int = 1,
) -> dict[str, Tensor]:
    """Pack B encoded pairs (`prompt_ids`, `chosen_ids`, `rejected_ids`) into R rows; `capacity` 0 = longest segment.

    Shape buckets (`length_multiple`, `rows_multiple` > 1, see `PackShapes`): the row length L is the capacity
    rounded up to a multiple of `length_multiple` and segments fill rows up to that L; R is rounded up to a multiple
    of `rows_multiple` with rows of padding. Repeating shapes let a GPU reuse attention plans and allocator blocks;
    the log-probs are those of the unbucketed layout up to float rounding (padding never reaches a real token).

    Returns
      input_ids, position_ids  (R, L) int64;
      attention_mask           (R, 1, L, L) bool, True where a query may attend a key (causal, same segment, and
                               never rejected -> chosen); padding at a row's end attends causally to padding only,
                               so no query row is empty;
      last_index               (2B,) flat index into R*L of the last token of each sequence, chosen rows first;
      target_index             (N,) flat index of the position that predicts each response token;
      target_ids               (N,) that response token;
      target_seq               (N,) which of the 2B sequences it belongs to (chosen rows first).
    """
    b = len(rows)
    seg_len = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    capacity = max(capacity, max(seg_len, default=1))
    if length_multiple > 1:
        capacity = round_up(capacity, length_multiple)
    bins = first_fit_decreasing(seg_len, capacity)
    length = capacity if length_multiple > 1 else max(sum(seg_len[i] for i in members) for members in bins)
    bins += [[] for _ in range(round_up(len(bins), max(rows_multiple, 1)) - len(bins))]  # rows of padding only
    ids, pos, seg, part = [], [], [], []  # flat over R*L; part: 0 prompt / padding, 1 chosen, 2 rejected
    last = [0] * (2 * b)
    target_index, target_ids, target_seq = [], [], []
    for k, members in enumerate(bins):
        offset = k * length
        for i in members:
            p, c, r = rows[i]["prompt_ids"], rows[i]["chosen_ids"], rows[i]["rejected_ids"]
            start_c, start_r = offset + len(p), offset + len(p) + len(c)
            ids += [*p, *c, *r]
            pos += [*range(len(p) + len(c)), *range(len(p), len(p) + len(r))]
            seg += [i] * seg_len[i]
            part += [0] * len(p) + [1] * len(c) + [2] * len(r)
            last[i], last[b + i] = start_r - 1, start_r + len(r) - 1
            # Token j of a response is predicted by the position before it in its own sequence: the prompt's last
            # token for j = 0 (for the rejected response too, which sits after the chosen one in the row).
            target_index += [start_c - 1 + j for j in range(len(c))]
            target_index += [start_c - 1, *(start_r - 1 + j for j in range(1, len(r)))]
            target_ids += [*c, *r]
            target_seq += [i] * len(c) + [b + i] * len(r)
            offset += seg_len[i]
        tail = (k + 1) * length - offset
        ids += [pad_id] * tail
        pos += [0] * tail
        seg += [-1] * tail
        part += [0] * tail
    n_rows = len(bins)
    seg_t = torch.tensor(seg).view(n_rows, length)
    part_t = torch.tensor(part).view(n_rows, length)
    same_segment = seg_t[:, :, None] == seg_t[:, None, :]  # (R, L, L)
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
    rejected_to_chosen = (part_t[:, :, None] == 2) & (part_t[:, None, :] == 1)  # (R, L, L)
    return {
        "input_ids": torch.tensor(ids).view(n_rows, length),
        "position_ids": torch.tensor(pos).view(n_rows, length),
        "attention_mask": (same_segment & causal & ~rejected_to_chosen)[:, None],  # (R, 1, L, L)
        "last_index": torch.tensor(last),
        "target_index": torch.tensor(target_index, dtype=torch.long),
        "target_ids": torch.tensor(target_ids, dtype=torch.long),
        "target_seq": torch.tensor(target_seq, dtype=torch.long),
    }


@dataclass(frozen=True)
class PackShapes:
    """How packed micro-batches are shaped: row length a multiple of `length_multiple`, row count a multiple of
    `rows_multiple` (1 and 1: the tightest packing, every batch its own shape).

    On a GPU every new (R, L) costs host time (cuDNN / SDPA plans, allocator blocks; a profile of HH-RLHF DPO on an
    H200 found 48 plan builds per step), so the trainers default to 256 and 2 there (`resolve_pack_shapes`): on
    480 HH-RLHF pairs, 16 per step, 30 distinct shapes per epoch become 7, for 9.6% more token positions. On the
    CPU there is no plan to reuse and padding costs compute: 1 and 1."""

    length_multiple: int = 1
    rows_multiple: int = 1


def resolve_pack_shapes(length_multiple: int, rows_multiple: int, device: torch.device | str) -> PackShapes:
    """The configured multiples, where 0 means the default for `device` (256 / 2 on CUDA, 1 / 1 elsewhere)."""
    cuda = torch.device(device).type == "cuda"
    return PackShapes(length_multiple or (256 if cuda else 1), rows_multiple or (2 if cuda else 1))


PACKED_SDPA_BACKENDS = ("auto", "efficient", "cudnn", "flash", "math")
"""Choices of `packed_attention`: 'auto' leaves the choice to PyTorch; the others put that SDPA kernel first (with
the math kernel as a fallback). Flash attention takes no mask, so PyTorch skips it for packed rows."""


def packed_attention(choice: str) -> AbstractContextManager:
    """A context in which SDPA calls prefer the `choice` kernel (see PACKED_SDPA_BACKENDS); forward and backward.

    On a GPU PyTorch picks cuDNN attention for a boolean mask when it can; cuDNN builds an execution plan for every
    new shape (≈ 2–3 ms of host time per call in the H200 profile), which shape buckets make rare; the
    memory-efficient kernel needs no plan. Which is faster on a given GPU is measured by benchmarks/race_gpu.py."""
    if choice not in PACKED_SDPA_BACKENDS:
        raise ValueError(f"packed_attention must be one of {PACKED_SDPA_BACKENDS}, got {choice!r}")
    if choice == "auto":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "math": SDPBackend.MATH,
    }[choice]
    return sdpa_kernel(list(dict.fromkeys([first, SDPBackend.MATH])), set_priority=True)


PACKING_ATTENTION = ("sdpa", "eager")
"""Attention implementations that take the (R, 1, L, L) boolean mask of packed pairs as it is."""


def check_packing_supported(model: torch.nn.Module) -> None:
    """Raise if `model` cannot run packed pairs: its attention must accept a 4-D boolean mask."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in PACKING_ATTENTION:
        raise ValueError(
            f"packed pairs need attention_implementation in {PACKING_ATTENTION}, the model uses {impl!r}; "
            "pass --pack false or load the model with attn_implementation='sdpa'"
        )
