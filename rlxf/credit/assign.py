"""Credit assignment of real responses: token rewards -> segments and keep-masks (adaptive segment reward,
arXiv:2411.00809; docs/methods/adaptive_segment_reward.md §2.4-2.6).

`assign_credit` is the one path every optimiser takes: DPO (chosen +1, rejected −1), rejection sampling (winners +1),
PPO / REINFORCE and RLOO (the sign of each response's task-score advantage). It works on response-aligned tensors,
(B, T) with column t = response token t and right padding, as the reward contract (`rlxf.rewards.contract`) gives
them; a trainer whose tensors have another layout places `keep` into its own.

Step boundaries come from character offsets (`rlxf.rewards.contract.token_char_offsets`): the text a token adds to
the decoded response, not the token decoded alone, so a token that ends a sentence and starts a multi-byte character
still ends its step.

`credit_counts` / `credit_metrics` give every trainer the same `asr/*` metrics.

Shapes: B responses, T tokens (the padded response axis).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from rlxf.credit.segments import CreditConfig, Segment, agreement_mask, batch_tau, segment, step_boundaries
from rlxf.errors import UserError
from rlxf.rewards.contract import RewardSource, response_mask, token_char_offsets


def token_texts(response_ids: Sequence[int], text: str, tokenizer: Any) -> list[str]:
    """The text each response token adds to `text` (= decode(response_ids, skip_special_tokens=True)), one string per
    token, through `token_char_offsets` (decoding growing prefixes): EOS and other special tokens give ""."""
    return [text[a:b] for a, b in token_char_offsets(response_ids, text, tokenizer)]


@dataclass
class ResponseCredit:
    """What credit assignment made of B responses."""

    token_rewards: Tensor
    """(B, T) float32: the reward for y_t in column t, 0 outside `mask`."""
    mask: Tensor
    """(B, T) bool: True on the response tokens (right padding)."""
    keep: Tensor
    """(B, T) bool: the tokens a trainer trains on (label · segment reward > 0; all tokens for 'sequence')."""
    segments: list[list[Segment]]
    """Per response, its segments in order (`rlxf.credit.segment`)."""
    tau: float
    """The pivot threshold of 'segment' for this batch (credit.tau, or tau_scale × std of the batch's rewards)."""
    texts: list[str]
    """The decoded responses (special tokens skipped); empty strings when neither texts nor a tokenizer were given."""
    tokens: list[list[str]] | None = None
    """Per response, the text of each token (`token_texts`), when asked for or needed ('step')."""


def assign_credit(
    credit: CreditConfig,
    labels: Sequence[int] | Tensor,
    response_ids: Sequence[Sequence[int]],
    tokenizer: Any,
    *,
    source: RewardSource | None = None,
    prompt_rows: Sequence[Mapping[str, Any]] | None = None,
    token_rewards: Tensor | None = None,
    texts: Sequence[str] | None = None,
    with_tokens: bool = False,
) -> ResponseCredit:
    """Token rewards -> segments and keep-masks of B responses, all in one batch: one τ
    (docs/methods/adaptive_segment_reward.md §2.4 step 2).

    labels: B values in {+1, −1, 0}. Token rewards come from `token_rewards` ((B, T') float, column t = token t;
    extra columns are cut) or else from `source(prompt_rows, response_ids, texts, tokenizer)`. Neither is needed for
    'sequence', which keeps every response token. 'step' cuts after the tokens whose text ends a step
    (`step_boundaries` of `token_texts`).
    """
    mask = response_mask(response_ids)  # (B, T)
    needs_text = source is not None or with_tokens or credit.granularity == "step"
    if texts is None:
        texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in response_ids] if needs_text else []
    texts = list(texts) or [""] * len(response_ids)
    if token_rewards is None and source is not None:
        if prompt_rows is None:
            raise ValueError("assign_credit: a reward source needs the prompt rows")
        token_rewards, _ = source(prompt_rows, response_ids, texts, tokenizer)
    if token_rewards is None:
        if credit.granularity != "sequence":
            raise UserError(f"granularity {credit.granularity!r} needs token rewards: pass a source or the rewards")
        token_rewards = torch.zeros(mask.shape)
    token_rewards = token_rewards.detach().float().cpu()
    if token_rewards.shape[0] != mask.shape[0] or token_rewards.shape[1] < mask.shape[1]:
        raise ValueError(f"token rewards {tuple(token_rewards.shape)} do not cover the responses {tuple(mask.shape)}")
    token_rewards = torch.where(mask, token_rewards[:, : mask.shape[1]], 0.0)  # (B, T)
    tokens = None
    if with_tokens or credit.granularity == "step":
        tokens = [token_texts(ids, text, tokenizer) for ids, text in zip(response_ids, texts)]
    boundaries = step_boundaries(tokens) if credit.granularity == "step" else None  # (B, T): one text per token
    if boundaries is not None and boundaries.shape[1] < mask.shape[1]:  # every row shorter than T: pad with False
        boundaries = torch.nn.functional.pad(boundaries, (0, mask.shape[1] - boundaries.shape[1]))
    tau = torch.as_tensor(credit.tau) if credit.tau is not None else batch_tau(token_rewards, mask, credit.tau_scale)
    options = {"boundaries": boundaries, "tau": tau, "window": credit.window, "min_len": credit.min_len}
    labels_t = torch.as_tensor(labels, dtype=torch.float32).flatten().cpu()  # (B,)
    keep = agreement_mask(token_rewards, mask, labels_t, credit.granularity, **options)
    segments = segment(token_rewards, mask, credit.granularity, **options)
    return ResponseCredit(token_rewards, mask, keep, segments, float(tau), texts, tokens)


def credit_counts(rc: ResponseCredit, labels: Sequence[int] | Tensor) -> dict[str, float]:
    """Sums over a batch, to be added up across batches and turned into metrics by `credit_metrics`."""
    lab = torch.as_tensor(labels).flatten().cpu()
    n_tok, n_keep = rc.mask.sum(-1), rc.keep.sum(-1)  # (B,)
    return {
        "tokens_pos": float(n_tok[lab > 0].sum()),
        "kept_pos": float(n_keep[lab > 0].sum()),
        "tokens_neg": float(n_tok[lab < 0].sum()),
        "kept_neg": float(n_keep[lab < 0].sum()),
        "kept": float(n_keep.sum()),
        "responses": float((n_tok > 0).sum()),
        "zero_label": float(((lab == 0) & (n_tok > 0)).sum()),
        "tokens": float(n_tok.sum()),
        "segments": float(sum(len(s) for s in rc.segments)),
        "tau_sum": rc.tau,
        "batches": 1.0,
    }


def credit_metrics(counts: Mapping[str, float]) -> dict[str, float]:
    """The `asr/` metrics of every optimiser (docs/methods/adaptive_segment_reward.md §2.6 "Logging") from summed
    `credit_counts`:

    - `asr/kept_frac`: kept tokens / response tokens;
    - `asr/kept_frac_pos`, `asr/kept_frac_neg`: the same over the responses labelled +1 (DPO's chosen, a rejection
      sampling winner, a positive advantage) and −1 (rejected, a negative advantage);
    - `asr/zero_label_frac`: responses with label 0 (an advantage of exactly 0: nothing kept);
    - `asr/tau`: mean τ over batches; `asr/segments_per_seq`, `asr/mean_segment_len`.
    A metric without data (e.g. no response labelled −1) is left out."""
    out: dict[str, float] = {}
    if counts.get("tokens"):
        out["asr/kept_frac"] = counts["kept"] / counts["tokens"]
    if counts.get("tokens_pos"):
        out["asr/kept_frac_pos"] = counts["kept_pos"] / counts["tokens_pos"]
    if counts.get("tokens_neg"):
        out["asr/kept_frac_neg"] = counts["kept_neg"] / counts["tokens_neg"]
    if counts.get("responses"):
        out["asr/zero_label_frac"] = counts["zero_label"] / counts["responses"]
        out["asr/segments_per_seq"] = counts["segments"] / counts["responses"]
    if counts.get("batches"):
        out["asr/tau"] = counts["tau_sum"] / counts["batches"]
    if counts.get("segments"):
        out["asr/mean_segment_len"] = counts["tokens"] / counts["segments"]
    return out
