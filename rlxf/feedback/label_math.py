"""RLAIF label math as pure functions (Lee et al. 2023, arXiv:2309.00267; docs/methods/rlaif.md).

Tensor functions take and return torch tensors (floats are accepted and converted); the top-k readers take the
plain `{token: logprob}` maps that completions APIs return. No I/O, no logging.

Shapes: B pairs (or rollouts), K samples per pair (self-consistency), L labels (2 for "1"/"2", 10 for scores),
V vocab.

Conventions: p_first = P(the labeller prefers the response listed first); p_ab is p_first with a listed first,
p_ba with b listed first; p_a = P(a ≻ b) after debiasing (and inversion for harmless preambles). NaN marks an
invalid value (an order whose label tokens were all missing) and is propagated or skipped as each function says.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor

DebiasMethod = Literal["arithmetic", "geometric"]
MissingMode = Literal["upper_bound", "kth", "drop"]
ScoreScale = Literal["1-10", "0-9"]


def _t(x: Tensor | float | Sequence[float]) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x, dtype=torch.float64)


# --- one order: two-token softmax (docs/methods/rlaif.md §2.2) ------------------------------------------------------------------------


def preference_from_logprobs(logp_first: Tensor | float, logp_second: Tensor | float) -> Tensor:
    """P(first-listed response preferred) = softmax over the two label tokens only (Lee et al. 2023, §2.1):

        p_first = exp(ℓ₁) / (exp(ℓ₁) + exp(ℓ₂)) = σ(ℓ₁ − ℓ₂)

    Args:
        logp_first: (B,) or any shape, log-prob of label "1" (variants already summed, `label_logprobs`).
        logp_second: same shape, log-prob of label "2".
    Returns: same shape. ℓ₁ = −inf with ℓ₂ finite gives 0 (and vice versa); both −inf give NaN (invalid order).
    """
    logp_first, logp_second = _t(logp_first), _t(logp_second)
    both_missing = torch.isneginf(logp_first) & torch.isneginf(logp_second)
    p = torch.sigmoid(logp_first - logp_second)
    return torch.where(both_missing, torch.full_like(p, float("nan")), p)


# --- both orders (docs/methods/rlaif.md §2.3) -----------------------------------------------------------------------------------------


def debias(p_ab: Tensor | float, p_ba: Tensor | float, method: DebiasMethod = "arithmetic") -> Tensor:
    """P(a ≻ b) from the two presentation orders (Lee et al. 2023, §2.1 "position bias"; rlxf default: arithmetic).

        arithmetic: P(a ≻ b) = ½ · [p_ab + (1 − p_ba)]
        geometric:  P(a ≻ b) = σ(½ · [logit(p_ab) − logit(p_ba)])   (mean of the two log-odds for a)

    Args:
        p_ab: (B,) P(first wins) with a listed first.
        p_ba: (B,) P(first wins) with b listed first.
        method: "arithmetic" | "geometric".
    Returns: (B,) P(a ≻ b). An order that is NaN (invalid) is skipped and the other is used alone (docs/methods/rlaif.md §2.4,
    `single_order`); NaN when both are. "geometric" is also NaN for contradictory certainties (p_ab = p_ba = 1).
    """
    p_ab, p_ba = _t(p_ab), _t(p_ba)
    if method == "arithmetic":
        votes = torch.stack([p_ab, 1 - p_ba])  # (2, B) votes for a
    elif method == "geometric":
        votes = torch.stack([torch.logit(p_ab), -torch.logit(p_ba)])  # (2, B) log-odds for a
    else:
        raise ValueError(f"method must be 'arithmetic' or 'geometric', got {method!r}")
    combined = votes.nanmean(0)  # (2, B) -> (B,); NaN only when both orders are invalid
    return combined if method == "arithmetic" else torch.sigmoid(combined)


def single_order(p_ab: Tensor | float, p_ba: Tensor | float) -> Tensor:
    """(B,) bool: exactly one order is valid, so `debias` used it alone."""
    return torch.isnan(_t(p_ab)) ^ torch.isnan(_t(p_ba))


def invert_for_harmless(p: Tensor | float, invert: bool = True) -> Tensor:
    """p_a = 1 − P(labeller picks a) when the preamble asks for the *more harmful* response (`Preamble.invert`).

    Worked example (docs/methods/rlaif.md §4): P(a more harmful) = 0.7 gives p_a = 0.3. With invert=False, p is returned unchanged.
    """
    p = _t(p)
    return 1 - p if invert else p


def same_position(p_ab: Tensor | float, p_ba: Tensor | float) -> Tensor:
    """(B,) bool: both orders prefer the same slot (both p_first > ½ or both < ½). Exactly ½ is no preference,
    so such a pair is never `same_position`; NaN (invalid) orders are never either."""
    p_ab, p_ba = _t(p_ab), _t(p_ba)
    return ((p_ab > 0.5) & (p_ba > 0.5)) | ((p_ab < 0.5) & (p_ba < 0.5))


def position_bias(p_ab: Tensor | float, p_ba: Tensor | float) -> dict[str, Tensor]:
    """Position-bias diagnostics over a set of pairs (paper: "% Same Position Preferred", Table 4).

    Args:
        p_ab, p_ba: (B,) per-order p_first. Pairs with an invalid order (NaN) are not evaluated.
    Returns:
        rate: () share of evaluated pairs with `same_position` (0–1).
        slot1_share: () among those pairs, the share preferring slot 1 (NaN when there are none).
        n_biased, n_slot1, n_evaluated: () counts, e.g. for `binomial_test_two_sided(n_slot1, n_biased)`.
    """
    p_ab, p_ba = _t(p_ab), _t(p_ba)
    evaluated = ~(torch.isnan(p_ab) | torch.isnan(p_ba))  # (B,)
    same = same_position(p_ab, p_ba) & evaluated  # (B,)
    slot1 = same & (p_ab > 0.5)  # (B,)
    n_eval, n_same, n_slot1 = evaluated.sum(), same.sum(), slot1.sum()
    return {
        "rate": n_same.double() / n_eval.double(),
        "slot1_share": n_slot1.double() / n_same.double(),
        "n_biased": n_same,
        "n_slot1": n_slot1,
        "n_evaluated": n_eval,
    }


def binomial_test_two_sided(k: int, n: int, p: float = 0.5) -> float:
    """Exact two-sided binomial test p-value (the "minlike" rule, as scipy.stats.binomtest): the total probability
    of outcomes no more likely than k successes in n trials. Used on `position_bias`'s (n_slot1, n_biased)."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if not 0 < p < 1:
        raise ValueError(f"need 0 < p < 1, got p={p}")
    # log space: math.comb(n, i) * p**i overflows a float beyond n ≈ 1000
    log_pmf = [
        math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p) + (n - i) * math.log1p(-p)
        for i in range(n + 1)
    ]
    # relative tolerance as scipy uses, so outcomes equally likely as k (e.g. symmetric ones at p = ½) count
    threshold = log_pmf[k] + math.log1p(1e-7)
    return min(1.0, sum(math.exp(q) for q in log_pmf if q <= threshold))


# --- metrics (docs/methods/rlaif.md §2.9) ---------------------------------------------------------------------------------------------


def label_prob(p_a: Tensor | float) -> Tensor:
    """(B,) the preference row's `label_prob` = max(p_a, 1 − p_a) ∈ [½, 1] (confidence in the AI choice)."""
    p_a = _t(p_a)
    return torch.maximum(p_a, 1 - p_a)


def alignment(p_a: Tensor | float, human_prefers_a: Tensor | Sequence[bool]) -> dict[str, Tensor]:
    """AI-labeller alignment: share of pairs where argmax(p_a, 1 − p_a) equals the human choice (Lee et al. 2023,
    §3.3). rlxf default: p_a = ½ counts as wrong and is reported in `n_ties`; NaN (invalid) pairs are excluded.

    Args:
        p_a: (B,) debiased P(a ≻ b).
        human_prefers_a: (B,) bool, True where the human chose a.
    Returns: accuracy (), n_ties (), n (number of valid pairs).
    """
    p_a = _t(p_a)
    human = torch.as_tensor(human_prefers_a, dtype=torch.bool)
    valid = ~torch.isnan(p_a)  # (B,)
    correct = torch.where(human, p_a > 0.5, p_a < 0.5) & valid  # (B,); ties are False either way
    n = valid.sum()
    return {"accuracy": correct.sum().double() / n.double(), "n_ties": (p_a == 0.5).sum(), "n": n}


def reliability_bins(
    confidence: Tensor | Sequence[float], correct: Tensor | Sequence[bool], n_bins: int = 5, low: float = 0.5
) -> dict[str, Tensor]:
    """Reliability-diagram bins of the labeller's confidence against agreement with human labels.

    Args:
        confidence: (B,) `label_prob` = max(p_a, 1 − p_a) ∈ [low, 1].
        correct: (B,) bool, the AI choice equals the human choice (ties count as wrong, as in `alignment`).
        n_bins: equal-width bins over [low, 1]; the last bin is closed at 1. Values below `low` go to bin 0.
        low: lower edge; ½ because label_prob is never below ½ (use 0 for raw probabilities).
    Returns: (n_bins,) tensors: confidence (mean confidence per bin, NaN if empty), accuracy (share correct per bin,
    NaN if empty), count, and edges (n_bins + 1,).
    """
    conf = _t(confidence).double()
    corr = torch.as_tensor(correct, dtype=torch.float64)
    edges = torch.linspace(low, 1.0, n_bins + 1, dtype=torch.float64)  # (n_bins + 1,)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)  # (B,)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, conf)
    corr_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, idx, corr)
    return {"confidence": conf_sum / count, "accuracy": corr_sum / count, "count": count, "edges": edges}


def expected_calibration_error(
    confidence: Tensor | Sequence[float], correct: Tensor | Sequence[bool], n_bins: int = 5, low: float = 0.5
) -> Tensor:
    """ECE = Σ_bins (n_b / N) · |accuracy_b − confidence_b| over `reliability_bins` (Guo et al. 2017, eq. 3).

    Returns: () in [0, 1]; 0 for a perfectly calibrated labeller. Empty bins contribute nothing.
    """
    bins = reliability_bins(confidence, correct, n_bins, low)
    gap = (bins["accuracy"] - bins["confidence"]).abs().nan_to_num(0.0)  # (n_bins,), empty bins -> 0
    return (bins["count"] * gap).sum() / bins["count"].sum()


def self_consistency(p_a: Tensor) -> Tensor:
    """Self-consistency (docs/methods/rlaif.md §2.5): mean of the K debiased P(a ≻ b) from K sampled rationales.

    Args:
        p_a: (B, K) debiased probabilities, one per sampled rationale; NaN (invalid) samples are skipped.
    Returns: (B,); NaN where all K are invalid.
    """
    return _t(p_a).nanmean(-1)  # (B, K) -> (B,)


# --- d-RLAIF direct score (docs/methods/rlaif.md §2.7) --------------------------------------------------------------------------------

_SCORE_OFFSET = {"1-10": 5.5, "0-9": 4.5}
_SCORE_VALUES = {"1-10": tuple(range(1, 11)), "0-9": tuple(range(10))}


def split_ten(logp_one: Tensor | float, logp_zero_after_one: Tensor | float) -> tuple[Tensor, Tensor]:
    """When "10" is two tokens ("1", "0"): with q = P("0" | prompt + "1") from one extra forward pass,
    P(10) = P("1")·q and P(1) = P("1")·(1 − q) (docs/methods/rlaif.md §2.7 step 4).

    Args:
        logp_one: (B,) log P("1") after "SCORE:".
        logp_zero_after_one: (B,) log q.
    Returns: (logp_score_1, logp_score_10), each (B,).
    """
    logp_one, logq = _t(logp_one), _t(logp_zero_after_one)
    return logp_one + torch.log1p(-logq.exp()), logp_one + logq


def expected_score(score_logprobs: Tensor, scale: ScoreScale = "1-10") -> Tensor:
    """Expected score s = Σ_i i · P(i), with P renormalised over the score values (softmax over their log-probs).

    Args:
        score_logprobs: (B, 10) next-token log-probs of the scores in increasing order ("1".."10" for "1-10",
            "0".."9" for "0-9"); a missing score is −inf and gets probability 0.
        scale: "1-10" (s ∈ [1, 10]) or "0-9" (s ∈ [0, 9]).
    Returns: (B,) s; NaN where every score is −inf.
    """
    if scale not in _SCORE_VALUES:
        raise ValueError(f"scale must be one of {tuple(_SCORE_VALUES)}, got {scale!r}")
    logp = _t(score_logprobs)
    if logp.shape[-1] != 10:
        raise ValueError(f"score_logprobs must have 10 columns (one per score), got shape {tuple(logp.shape)}")
    probs = logp.softmax(-1)  # (B, 10); all −inf rows give NaN
    values = torch.tensor(_SCORE_VALUES[scale], dtype=probs.dtype, device=probs.device)  # (10,)
    return (probs * values).sum(-1)  # (B, 10) -> (B,)


def direct_reward(score: Tensor | float, scale: ScoreScale = "1-10") -> Tensor:
    """d-RLAIF reward in [−1, 1]: r = (s − 5.5)/4.5 on "1-10", (s − 4.5)/4.5 on "0-9".

    The paper says only "rescaled to [−1, 1]" (§2.4 of v2); this affine map is an rlxf decision (docs/methods/rlaif.md §2.7).
    """
    if scale not in _SCORE_OFFSET:
        raise ValueError(f"scale must be one of {tuple(_SCORE_OFFSET)}, got {scale!r}")
    return (_t(score) - _SCORE_OFFSET[scale]) / 4.5


# --- label tokens: tokenisation traps (docs/methods/rlaif.md §2.2, §6) ----------------------------------------------------------------


def label_variants(label: str) -> tuple[str, str]:
    """The two spellings of a label the labeller may emit: bare ("1") and space-prefixed (" 1")."""
    return (label, " " + label)


def label_token_ids(
    tokenizer, labels: Sequence[str] = ("1", "2"), allow_missing: bool = False
) -> dict[str, list[int]]:
    """Vocabulary ids of each label's single-token variants, bare first: {"1": [id("1"), id(" 1")], ...}.

    After an ending with no trailing space ("Preferred Summary=", "SCORE:") a labeller normally emits the bare
    digit ("1"), but some emit a space first, which byte-level BPE vocabularies hold as one token ("Ġ1"). rlxf
    sums both (ℓ_k = logsumexp over the variants, `label_logprobs`), so neither spelling is lost. A variant is kept
    only if it encodes to exactly one token; a variant that splits (e.g. " 1" → [" ", "1"]) is dropped, since
    its first token is not the label. Use `allow_missing=True` to get [] for labels with no single-token variant
    (e.g. "10" in most vocabularies: then use `split_ten`); otherwise that raises.

    Args:
        tokenizer: a Hugging Face tokenizer (anything with `encode(text, add_special_tokens=False)`).
        labels: the label strings, e.g. ("1", "2") or tuple(str(i) for i in range(1, 11)).
    """
    out: dict[str, list[int]] = {}
    for label in labels:
        ids = []
        for variant in label_variants(label):
            enc = tokenizer.encode(variant, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in ids:
                ids.append(enc[0])
        if not ids and not allow_missing:
            raise ValueError(
                f"label {label!r} is not a single token in this vocabulary (neither {label!r} nor ' {label}')"
            )
        out[label] = ids
    return out


def check_ending_tokenization(tokenizer, ending: str, labels: Sequence[str] = ("1", "2")) -> None:
    """Raise if appending a label to `ending` does not simply add the label's token (docs/methods/rlaif.md §2.2).

    Two traps are caught: the digit merging with the ending ("=1" as one token), and a trailing space in the
    ending (the tokenizer would then encode "= 1" as "=", " 1", so the model's next token after "= " is not
    what a label read at that position assumes).
    """
    base = tokenizer.encode(ending, add_special_tokens=False)
    for label in labels:
        full = tokenizer.encode(ending + label, add_special_tokens=False)
        bare = tokenizer.encode(label, add_special_tokens=False)
        if full != base + bare or len(bare) != 1:
            raise ValueError(
                f"ending {ending!r} + label {label!r} tokenises as {full}, not ending {base} + label {bare}; "
                "remove any trailing space from the ending and use a tokenizer that keeps the digit a separate token"
            )


def label_logprobs(next_logprobs: Tensor, token_ids: Mapping[str, Sequence[int]]) -> Tensor:
    """Label log-probs from a full next-token distribution (local models): ℓ_k = logsumexp over k's variant ids.

    Args:
        next_logprobs: (B, V) log-softmax of the logits at the position after the ending.
        token_ids: `label_token_ids` output, in label order; a label with no ids gets −inf.
    Returns: (B, L).
    """
    cols = []
    for ids in token_ids.values():
        if ids:
            cols.append(next_logprobs[:, list(ids)].logsumexp(-1))  # (B, n_variants) -> (B,)
        else:
            cols.append(torch.full_like(next_logprobs[:, 0], float("-inf")))
    return torch.stack(cols, -1)  # (B, L)


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


class TopkLabels(NamedTuple):
    """Label log-probs read from a top-k map (one prompt, one order)."""

    logprobs: tuple[float, ...]
    """One per label (variants summed); NaN for every label when the order is invalid."""
    imputed: bool
    """True when at least one label was missing and its log-prob was imputed."""
    valid: bool
    """False when every label was missing (or any, with mode="drop"): drop this order (docs/methods/rlaif.md §2.4)."""


def label_logprobs_from_topk(
    topk: Mapping[str, float],
    labels: Sequence[str] = ("1", "2"),
    mode: MissingMode = "upper_bound",
    min_missing_mass: float = 1e-12,
) -> TopkLabels:
    """Label log-probs from a `{token: logprob}` top-k map (completions APIs), imputing missing labels (docs/methods/rlaif.md §2.4).

    Each label's log-prob is the logsumexp of its variants present in the map ("k" and " k"). A label is missing
    when none of its variants is there. Modes (rlxf default "upper_bound"):
        upper_bound: ℓ_missing = min(ℓ_k, log(1 − Σ_returned e^ℓ)), ℓ_k the lowest returned log-prob. Both terms
            bound the true value from above, so the imputed label can only be *less* confident than the truth
            would make it look.
        kth: ℓ_missing = ℓ_k (as in mengdi-li/vanilla-RLAIF-pipeline); looser, so labels come out less confident.
        drop: any missing label makes the order invalid.
    Every label missing makes the order invalid in all modes.

    `min_missing_mass` floors 1 − Σ e^ℓ, which rounding can push to ≤ 0 when the returned mass is ~1.
    """
    if mode not in ("upper_bound", "kth", "drop"):
        raise ValueError(f"mode must be 'upper_bound', 'kth' or 'drop', got {mode!r}")
    found: list[float | None] = []
    for label in labels:
        present = [topk[v] for v in label_variants(label) if v in topk]
        found.append(_logsumexp(present) if present else None)
    n_missing = sum(v is None for v in found)
    if n_missing == len(labels) or (n_missing and mode == "drop"):
        return TopkLabels(tuple(math.nan for _ in labels), imputed=False, valid=False)
    if not n_missing:
        return TopkLabels(tuple(found), imputed=False, valid=True)  # type: ignore[arg-type]
    kth = min(topk.values())
    if mode == "kth":
        fill = kth
    else:
        missing_mass = max(1.0 - sum(math.exp(v) for v in topk.values()), min_missing_mass)
        fill = min(kth, math.log(missing_mass))
    return TopkLabels(tuple(fill if v is None else v for v in found), imputed=True, valid=True)
