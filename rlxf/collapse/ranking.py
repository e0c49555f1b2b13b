"""Ranking rows scored by a reward model: per-prompt utilities, the (P, K) batch layout, packing, scoring and held-out
evaluation. The ranking trainer (`rlxf.trainers.ranking_rm`) and `rlxf collapse diagnose` (`rlxf.collapse.commands`)
both use them; they live here, beside the collapse losses and diagnostics, so that the diagnostics never depend on a
trainer.

A ranking row is `prompt`, `responses` best -> worst (or + `scores`, higher is better), optional `prompt_type` /
`openness`. One forward pass scores the real completions of a batch's P prompts, each once, and the (P, K) reward
matrix is rebuilt from them (the paper's code encoded every pair separately: 56 passes for K = 8). Two layouts give
the same rewards up to float rounding: N ≤ P·K right-padded rows (prompt + response; a prompt with fewer responses
adds fewer rows), or, packed, one segment per prompt, prompt + all its responses, each response attending to the
prompt and to itself only (`pack_rankings`): the prompt is computed once and nothing is padded.

Units (what a trainer's engine divides by, `unit_weights`): prompts with at least one ranked pair for reduction
"prompt" (the rlxf default, docs/methods/reward_collapse.md §2.2), ranked pairs for reduction "pairs", prompts with at
least two responses for Plackett–Luce.

Shapes: P prompts, K responses per prompt (the most in the batch), N real completions, L sequence length, R packed
rows.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from rlxf.collapse.diagnose import diagnose, reward_profiles
from rlxf.collapse.losses import pairwise_bt_loss, plackett_luce_loss, ranking_pairs, utility_ranking_loss
from rlxf.collapse.utilities import Utility, prompt_aware_utility, utility
from rlxf.data.packing import first_fit_decreasing
from rlxf.data.tokenize import pad
from rlxf.losses import pairwise_accuracy
from rlxf.models.reward_model import last_token_index

logger = logging.getLogger(__name__)

RANKING_LOSSES = ("ranking", "plackett_luce", "pairwise_bt")
"""Losses on ranking rows: the utility loss of the reward-collapse paper on σ(value), Plackett–Luce and all-pairs
Bradley–Terry on the raw value (see `rlxf.collapse.losses`)."""
PROMPT_AWARE = "prompt_aware"
UNTYPED = "untyped"
"""Diagnostic group of prompts with neither `prompt_type` nor `openness`."""


# ---- utilities per prompt ------------------------------------------------------------------------------------------
def utility_from_options(name: str, gamma: float = 0.5, c: float = 4.0, eps: float | None = 0.1) -> Utility:
    """A fixed utility from the CLI options (`--utility`, `--utility_gamma`, `--utility_c`, `--utility_eps`): γ goes
    to power / neg_power only, c to logsigmoid only. `prompt_aware` is a rule, not one utility: see
    `row_utilities`."""
    if name == PROMPT_AWARE:
        raise ValueError("prompt_aware chooses U per prompt; build the per-prompt utilities with row_utilities()")
    params: dict[str, Any] = {"eps": eps}
    if name in ("power", "neg_power"):
        params["gamma"] = gamma
    if name == "logsigmoid":
        params["c"] = c
    return utility(name, **params)


def row_utilities(
    rows: Sequence[dict[str, Any]], name: str, gamma: float = 0.5, c: float = 4.0, eps: float | None = 0.1
) -> list[Utility]:
    """One utility per ranking row: the same U for every row, or, for name="prompt_aware", the rule of
    docs/methods/reward_collapse.md §2.4 (`openness` wins over `prompt_type`; closed -> x, open -> −1/x; neither ->
    o = ½, i.e. log).

    Logs how the rows were routed, the openness distribution, and (WARNING) the number of fallbacks to o = ½.
    """
    if name != PROMPT_AWARE:
        u = utility_from_options(name, gamma, c, eps)
        return [u] * len(rows)
    out = [prompt_aware_utility(r.get("prompt_type"), r.get("openness"), eps=eps) for r in rows]
    routes = Counter(
        "openness" if r.get("openness") is not None else r.get("prompt_type") or "fallback (o = 0.5, log)"
        for r in rows
    )
    logger.info("prompt-aware utility for %d prompts: %s", len(rows), dict(routes))
    opens = np.array([r["openness"] for r in rows if r.get("openness") is not None], dtype=np.float64)
    if opens.size:
        q = np.quantile(opens, [0.0, 0.25, 0.5, 0.75, 1.0]).round(3).tolist()
        logger.info("openness of %d prompts: min/q1/median/q3/max = %s", opens.size, q)
    fallbacks = sum(r.get("openness") is None and r.get("prompt_type") is None for r in rows)
    if fallbacks:
        logger.warning(
            "%d of %d prompts have neither prompt_type nor openness; they use o = 0.5 (log)", fallbacks, len(rows)
        )
    return out


def diagnostic_groups(
    rows: Sequence[dict[str, Any]], utilities: Sequence[Utility]
) -> tuple[list[str] | None, Utility | dict[str, Utility]]:
    """Group label per row and the utility of each group, as `rlxf.collapse.diagnose` wants them.

    A row's label is its `prompt_type`, or "openness=<o>" when it has an openness, or "untyped"; labels are None
    when no row has either. The utility is one `Utility` when every row has the same, else a mapping label -> U.
    """
    labels = [
        f"openness={r['openness']:g}" if r.get("openness") is not None else r.get("prompt_type") or UNTYPED
        for r in rows
    ]
    if not utilities:
        raise ValueError("no rows to group")
    if len(set(utilities)) == 1:
        return (None if set(labels) == {UNTYPED} else labels), utilities[0]
    mapping: dict[str, Utility] = {}
    for label, u in zip(labels, utilities):
        if mapping.setdefault(label, u) != u:
            raise ValueError(
                f"prompts labelled {label!r} were trained with different utilities ({mapping[label]}, {u})"
            )
    return labels, mapping


# ---- batches ---------------------------------------------------------------------------------------------------------
def unit_weights(completion_mask: Tensor, scores: Tensor, loss: str, reduction: str) -> Tensor:
    """Units each prompt contributes, (P, K), (P, K) -> (P,): 1 per prompt with a ranked pair ("prompt"), its number
    of ranked pairs ("pairs"), or 1 per prompt with at least two responses (Plackett–Luce)."""
    if loss == "plackett_luce":
        return (completion_mask.sum(-1) >= 2).to(torch.float64)
    pairs = ranking_pairs(completion_mask, scores).sum((-1, -2)).to(torch.float64)  # (P,)
    return (pairs > 0).to(torch.float64) if reduction == "prompt" else pairs


def ranking_layout(rows: Sequence[dict[str, Any]]) -> tuple[Tensor, Tensor]:
    """(P, K) completion mask (bool) and scores (float64, higher is better) of P ranking rows: a row's `scores`, or
    −column index when it has none (columns are best -> worst); −inf under padding."""
    k = max(len(r["responses_ids"]) for r in rows)
    mask = torch.zeros(len(rows), k, dtype=torch.bool)  # (P, K)
    scores = torch.full((len(rows), k), -math.inf, dtype=torch.float64)  # (P, K)
    for p, r in enumerate(rows):
        kp = len(r["responses_ids"])
        mask[p, :kp] = True
        given = r.get("scores")
        scores[p, :kp] = torch.tensor(given, dtype=torch.float64) if given is not None else -torch.arange(kp)
    return mask, scores


def pack_rankings(rows: Sequence[dict[str, Any]], pad_id: int, capacity: int = 0) -> dict[str, Tensor]:
    """Pack P encoded ranking rows into R rows without padding, each prompt computed once (`rlxf.data.packing` does the
    same for pairs); `capacity` 0 = the longest segment.

    A row (prompt, K responses) becomes one segment `prompt + response_1 + … + response_K`. Response j attends to the
    prompt and to its own earlier tokens only, and its position ids continue from the end of the prompt, so each token
    has the context and position it has in the padded P·K layout (same values up to float rounding). Segments are
    placed first-fit decreasing; padding at a row's end attends causally to padding only, so no query row is empty.

    Returns input_ids, position_ids (R, L) int64; attention_mask (R, 1, L, L) bool; last_index (N,) flat index into
    R*L of each response's last token, prompt by prompt, best first (the order of `completion_mask`).
    """
    seg_len = [len(r["prompt_ids"]) + sum(map(len, r["responses_ids"])) for r in rows]
    bins = first_fit_decreasing(seg_len, max(capacity, max(seg_len, default=1)))
    length = max(sum(seg_len[i] for i in members) for members in bins)
    ids, pos, seg, part = [], [], [], []  # flat over R*L; part: 0 prompt, j + 1 response j, −1 padding
    last: list[int] = [0] * sum(len(r["responses_ids"]) for r in rows)
    first_of_row = [0]
    for r in rows:
        first_of_row.append(first_of_row[-1] + len(r["responses_ids"]))
    for k, members in enumerate(bins):
        offset = k * length
        for i in members:
            prompt = rows[i]["prompt_ids"]
            ids += prompt
            pos += range(len(prompt))
            part += [0] * len(prompt)
            offset += len(prompt)
            for j, resp in enumerate(rows[i]["responses_ids"]):
                ids += resp
                pos += range(len(prompt), len(prompt) + len(resp))
                part += [j + 1] * len(resp)
                offset += len(resp)
                last[first_of_row[i] + j] = offset - 1
            seg += [i] * seg_len[i]
        tail = (k + 1) * length - offset
        ids += [pad_id] * tail
        pos += [0] * tail
        seg += [-1] * tail
        part += [-1] * tail
    n_rows = len(bins)
    seg_t, part_t = torch.tensor(seg).view(n_rows, length), torch.tensor(part).view(n_rows, length)
    same_segment = seg_t[:, :, None] == seg_t[:, None, :]  # (R, L, L)
    same_part_or_prompt = (part_t[:, :, None] == part_t[:, None, :]) | (part_t[:, None, :] == 0)  # (R, L, L)
    causal = torch.ones(length, length, dtype=torch.bool).tril()  # (L, L)
    return {
        "input_ids": torch.tensor(ids).view(n_rows, length),
        "position_ids": torch.tensor(pos).view(n_rows, length),
        "attention_mask": (same_segment & same_part_or_prompt & causal)[:, None],  # (R, 1, L, L)
        "last_index": torch.tensor(last),
    }


def collate_rankings(
    rows: list[dict[str, Any]], pad_id: int, loss: str = "ranking", reduction: str = "prompt", pack: bool = False
) -> dict[str, Any]:
    """P encoded ranking rows -> N right-padded sequences (prompt + response, prompt by prompt, best first), or the
    rows packed (`pack_rankings`), and the (P, K) layout to put their rewards back: completion_mask (bool), scores
    (float64, higher is better; −column index when a row has no `scores`), plus `utilities` (the rows' "_utility",
    when set), num_units and num_tokens (tokens of the N sequences either way)."""
    completion_mask, scores = ranking_layout(rows)  # (P, K), (P, K)
    batch: dict[str, Any] = {
        "completion_mask": completion_mask,
        "scores": scores,
        "num_units": float(unit_weights(completion_mask, scores, loss, reduction).sum()),
        "num_tokens": sum(len(r["prompt_ids"]) + len(resp) for r in rows for resp in r["responses_ids"]),
    }
    if pack:
        batch |= pack_rankings(rows, pad_id)
    else:
        seqs = [r["prompt_ids"] + resp for r in rows for resp in r["responses_ids"]]
        batch["input_ids"], batch["attention_mask"] = pad(seqs, pad_id, side="right")  # (N, L)
    if all("_utility" in r for r in rows):
        batch["utilities"] = [r["_utility"] for r in rows]
    return batch


# ---- scoring and evaluation ----------------------------------------------------------------------------------------
def completion_values(model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
    """Raw value at the last real token of every completion, in the batch's (P, K) layout (0 outside the mask)."""
    if "last_index" in batch:  # packed rows
        values = model(batch["input_ids"], batch["attention_mask"], batch["position_ids"])  # (R, L)
        last = values.flatten()[batch["last_index"]]  # (R*L,) -> (N,)
    else:
        values = model(batch["input_ids"], batch["attention_mask"])  # (N, L)
        last = values.gather(-1, last_token_index(batch["attention_mask"])[:, None]).squeeze(-1)  # (N,)
    mask = batch["completion_mask"]
    # masked_scatter fills the True entries in row-major order: prompt by prompt, best first, as collated.
    return last.new_zeros(mask.shape).masked_scatter(mask, last)  # (N,) -> (P, K)


@torch.no_grad()
def score_rankings(
    model: torch.nn.Module, rows: Sequence[dict[str, Any]], pad_id: int, batch_size: int = 64, device=None
) -> list[np.ndarray]:
    """Raw values of every response of every encoded ranking row, in eval mode: one (K_p,) array per row, best
    first. Sequences are sorted by length and cut into chunks of `batch_size`, so padding stays small."""
    was_training = model.training
    model.eval()
    device = device or next(model.parameters()).device
    flat = [(p, j, r["prompt_ids"] + resp) for p, r in enumerate(rows) for j, resp in enumerate(r["responses_ids"])]
    flat.sort(key=lambda t: len(t[2]))
    out = [np.zeros(len(r["responses_ids"])) for r in rows]
    for i in range(0, len(flat), batch_size):
        chunk = flat[i : i + batch_size]
        ids, mask = pad([s for _, _, s in chunk], pad_id, side="right")  # (B, L)
        values = model(ids.to(device), mask.to(device))  # (B, L)
        last = values.gather(-1, last_token_index(mask.to(device))[:, None]).squeeze(-1).double().cpu().numpy()
        for (p, j, _), v in zip(chunk, last):
            out[p][j] = v
    model.train(was_training)
    return out


def ranking_pairwise_accuracy(values: Sequence[np.ndarray], rows: Sequence[dict[str, Any]]) -> float:
    """Fraction of ranked pairs (i above j, over all prompts) with value_i > value_j, ties counting half: the one
    `rlxf.losses.pairwise_accuracy`, applied to every ranked pair of ragged rows (one (K_p,) value array per row, as
    `score_rankings` returns them)."""
    hits, total = 0.0, 0
    for v, r in zip(values, rows):
        s = np.asarray(r["scores"], dtype=np.float64) if r.get("scores") is not None else -np.arange(len(v))
        above, below = (torch.from_numpy(x) for x in np.nonzero(s[:, None] > s[None, :]))  # ranked pairs (i, j)
        x = torch.as_tensor(np.asarray(v, dtype=np.float64))  # (K_p,)
        hits += float(pairwise_accuracy(x[above], x[below], reduction="sum"))
        total += len(above)
    return hits / max(total, 1)


def evaluate_rankings(
    model: torch.nn.Module,
    rows: Sequence[dict[str, Any]],
    pad_id: int,
    loss: str,
    batch_size: int = 64,
    device=None,
) -> dict[str, float]:
    """Held-out pairwise accuracy over all ranked pairs, mean loss per prompt and, for loss="ranking" with an equal
    number of responses per prompt, the collapse diagnostics of the rows' own utilities ("_utility"): profile MAE
    vs the ε-smoothed prediction per group, open-vs-closed gap, prompt independence."""
    values = score_rankings(model, rows, pad_id, batch_size, device)
    out = {"eval/pairwise_accuracy": ranking_pairwise_accuracy(values, rows)}
    mask, scores = ranking_layout(rows)  # (P, K), (P, K)
    v = torch.zeros(mask.shape, dtype=torch.float64)  # (P, K)
    for p, x in enumerate(values):
        v[p, : len(x)] = torch.from_numpy(x)
    if loss == "ranking":
        mean_loss, _ = utility_ranking_loss(torch.sigmoid(v), [r["_utility"] for r in rows], mask, scores)
    elif loss == "pairwise_bt":
        mean_loss, _ = pairwise_bt_loss(v, mask, scores)
    else:
        mean_loss, _ = plackett_luce_loss(v, mask, scores)
    out[f"eval/{loss}_loss"] = float(mean_loss)
    counts = {len(x) for x in values}
    if loss == "ranking" and len(counts) == 1:
        labels, utilities = diagnostic_groups(rows, [r["_utility"] for r in rows])
        report = diagnose(reward_profiles(torch.sigmoid(v)), labels, utilities, held_out=True)
        out |= {f"eval/profile_mae/{g}": x for g, x in report["profile_mae"].items()}
        out |= {f"eval/prompt_independence/{g}": x for g, x in report["prompt_independence"].items()}
        if report["gap"] is not None:
            out["eval/gap"] = report["gap"]
    return out
