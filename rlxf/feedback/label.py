"""`rlxf label`: AI preference labels from an LLM labeller (RLAIF, Lee et al. 2023, arXiv:2309.00267; docs/methods/rlaif.md).

For each pair (context, a, b), in both presentation orders (docs/methods/rlaif.md §2.3):
  1. build the prompt: preamble + optional exemplars + the sample + the ending (`rlxf.feedback.prompts`);
  2. with chain of thought, decode a rationale greedily after the CoT lead, then append it and the ending (§2.2);
     with self-consistency, sample N rationales instead and score each (§2.5);
  3. read the next-token log-probs of the label tokens "1" / "2" (variants " 1" / " 2" summed; a label missing from
     a top-k list is imputed, `labels.label_logprobs_from_topk`, §2.4) and take their two-way softmax (§2.2);
then P(a ≻ b) = ½ [p_first(a, b) + 1 − p_first(b, a)] (`labels.debias`), inverted for harmless preambles, which ask
for the *more harmful* response (`labels.invert_for_harmless`).

Output rows are standard preference rows: `prompt`, `chosen` (the AI-preferred response), `rejected`, `label_prob` =
P(chosen ≻ rejected) = max(p_a, 1 − p_a), plus diagnostics `p_a`, `p_first_ab`, `p_first_ba`, `same_position`,
`valid`, `imputed`, `single_order`, `ai_prefers` ("a"/"b"), `human_agrees` (when the input was a human-labelled
chosen/rejected pair, a = chosen), `rationale_ab` / `rationale_ba` (with CoT), `labeler`, `prompt_id`. Pairs that are
invalid (no label token in either order), too long for the labeller, or whose answers were impossible log-probs
(`invalid_answer`: NaN / inf / positive, asked again and never cached, `rlxf.backends.cache`) go to
`<out>.dropped.jsonl` with a `reason`. A run that labels no pair at all stops with a BackendError (`rlxf: error:`,
exit 2) naming the counts and what to change, after writing the dropped rows, metrics and stats.

Nothing is lost: every backend answer is committed to an SQLite cache (`rlxf.backends.cache`) the moment it arrives,
so a run killed at any point and started again asks only for what is missing; the output file is written at the end
from those answers, atomically. Beside the output: `<out>.metrics.json` (alignment with human labels, position-bias
rate, calibration) and `<out>.label_stats.json` (calls, retries, tokens, cached vs sent requests, time).

Shapes: P pairs, S rationale samples per order (1 without self-consistency).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from rlxf.backends import Backend, BackendConfig, Prompt, build_backend, split_prompt
from rlxf.backends.cache import JudgementCache, cached_requests
from rlxf.config import check_ranges
from rlxf.data.formats import load_exemplar_rows, load_label_pairs, write_jsonl
from rlxf.errors import BackendError, UserError
from rlxf.feedback.label_math import (
    alignment,
    binomial_test_two_sided,
    check_ending_tokenization,
    debias,
    expected_calibration_error,
    invert_for_harmless,
    label_logprobs_from_topk,
    label_prob,
    position_bias,
    preference_from_logprobs,
    reliability_bins,
    same_position,
    self_consistency,
    single_order,
)
from rlxf.feedback.prompts import (
    EXAMPLE_HEADER,
    Exemplar,
    LabellingTemplate,
    build_cot_scoring_prompt,
    build_prompt,
    build_rationale_prompt,
    default_template,
    get_preamble,
    load_preamble,
)

logger = logging.getLogger(__name__)

LABELS = ("1", "2")


@dataclass
class LabelConfig:
    input: str = ""
    """Pairs to label (JSONL / Parquet / datasets dir): `prompt` + `response_a` / `response_b`, or a human-labelled
    `chosen` / `rejected` pair (the human label is kept only for the metrics). Required."""
    out: str = "runs/labels.jsonl"
    """Preference rows to write; `<out stem>.metrics.json`, `.label_stats.json`, `.dropped.jsonl` go beside it."""
    backend: BackendConfig = field(default_factory=BackendConfig)
    """The labeller LLM: a local model directory or an OpenAI-compatible server."""
    task: Literal["summarize", "helpful", "harmless"] = "summarize"
    """Sample layout and stored preambles: 'summarize' (Text/Summary) or dialogue 'helpful' / 'harmless'."""
    preamble: Literal["default", "base", "detailed"] = "default"
    """Stored preamble: 'default' = the paper's best prompt per task (summarize: detailed; helpful, harmless: base)."""
    preamble_file: str = ""
    """A UTF-8 text file with your own preamble (replaces `preamble`)."""
    preamble_invert: bool = False
    """With preamble_file only: true when your preamble asks for the *worse* response (e.g. more harmful), so labels
    are inverted. Stored preambles carry their own flag (harmless ones invert)."""
    exemplars_file: str = ""
    """Few-shot exemplars, JSONL rows {context, response_1, response_2, label (1|2), rationale (needed with CoT)}."""
    cot: bool | None = None
    """Two-step chain of thought (greedy rationale, then scoring); none = the task's default (on for summarize and
    helpful, off for harmless)."""
    rationale_max_tokens: int = 512
    """Longest rationale in tokens (the paper: 512)."""
    top_k: int = 20
    """Log-probs requested per scoring call (servers cap it: OpenAI 5, vLLM 20 by default); local models see all."""
    missing: Literal["upper_bound", "kth", "drop"] = "upper_bound"
    """A label missing from the top-k list: impute the upper bound min(ℓ_k, log(1 − Σ p)), the k-th log-prob, or drop
    that order (docs/methods/rlaif.md §2.4)."""
    combine: Literal["arithmetic", "geometric"] = "arithmetic"
    """How the two orders combine: mean of probabilities, or mean of log-odds (docs/methods/rlaif.md §3)."""
    self_consistency: int = 0
    """Number of sampled rationales per order (0 = off, greedy). Needs CoT; the paper found it lowers alignment."""
    sc_temperature: float = 0.3
    """Self-consistency sampling temperature."""
    sc_top_k: int = 40
    """Self-consistency top-K sampling."""
    seed: int = 0
    """Seed of the self-consistency samples."""
    max_prompt_tokens: int = 4096
    """Local labeller: prompts longer than this (or the model's context) are skipped and counted (docs/methods/rlaif.md §3)."""
    cache: str = ""
    """SQLite file of finished judgements; empty = `<out stem>.cache.sqlite`. Re-running continues from it."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed input row does: stop with an error, or be skipped and written to a side file."""
    progress: bool = True
    """Show a progress bar with ETA, calls and tokens."""
    bias_warn: float = 0.25
    """Warn when the position-bias rate (share of pairs preferring the same slot in both orders) exceeds this."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "rationale_max_tokens": ">=1",
                "top_k": ">=1",
                "self_consistency": ">=0",
                "sc_temperature": ">=0",
                "sc_top_k": ">=1",
                "seed": ">=0",
                "max_prompt_tokens": ">=1",
                "bias_warn": "[0,1]",
            },
        )


# --- input -----------------------------------------------------------------------------------------------------------


def as_text(value: str | list[dict[str, Any]], response: bool = False) -> str:
    """A text field as the labeller reads it: strings unchanged; a message list as "Human: …\\n\\nAssistant: …" turns
    (responses: their contents joined)."""
    if isinstance(value, str):
        return value
    if response:
        return "\n\n".join(m["content"] for m in value)
    roles = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{roles.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in value)


def load_exemplars(path: str) -> tuple[Exemplar, ...]:
    """Few-shot exemplars from JSONL: {context, response_1, response_2, label, rationale?} per line."""
    rows = load_exemplar_rows(path)
    return tuple(Exemplar(**{k: v for k, v in r.items() if not k.startswith("_")}) for r in rows)


def build_template(cfg: LabelConfig) -> LabellingTemplate:
    """The labelling template of a config: preamble (stored or from a file), exemplars, chain of thought."""
    default = default_template(cfg.task)
    if cfg.preamble_file:
        preamble = load_preamble(cfg.preamble_file, cfg.preamble_invert)
    elif cfg.preamble_invert:
        raise UserError(
            "preamble_invert applies to preamble_file only; stored preambles carry their own flag (harmless inverts)"
        )
    elif cfg.preamble == "default":
        preamble = default.preamble
    else:
        preamble = get_preamble(cfg.task, cfg.preamble)
    exemplars = load_exemplars(cfg.exemplars_file) if cfg.exemplars_file else ()
    cot = default.cot if cfg.cot is None else cfg.cot
    if cfg.self_consistency and not cot:
        raise UserError("self_consistency samples rationales, so it needs chain of thought: set --cot true")
    return LabellingTemplate(cfg.task, preamble, exemplars, cot)


def template_id(template: LabellingTemplate) -> str:
    """A readable id of the prompt, e.g. "summarize/cot/0shot/1a2b3c4d" (hash of preamble, exemplars, CoT)."""
    blob = json.dumps(
        [
            template.preamble.text,
            template.preamble.invert,
            [asdict(e) for e in template.exemplars],
            template.cot,
            template.task,
        ]
    )
    shots = f"{len(template.exemplars)}shot"
    return (
        f"{template.task}/{'cot' if template.cot else 'plain'}/{shots}/{hashlib.sha1(blob.encode()).hexdigest()[:8]}"
    )


# --- the labeller ----------------------------------------------------------------------------------------------------


def clean_rationale(text: str, template: LabellingTemplate) -> str:
    """The generated rationale up to where the labeller starts writing the label or a new example itself: the ending
    and the exemplar header are appended by rlxf, so a copy generated inside the rationale is cut off."""
    for marker in (template.ending, EXAMPLE_HEADER):
        if marker in text:
            text = text[: text.index(marker)]
    return text.rstrip()


@dataclass
class Judgement:
    """The labeller's verdict on one pair: `p_first_*` are its raw per-order probabilities, `p_a` the final one."""

    p_a: float
    """P(a ≻ b), debiased, averaged over rationale samples, inverted when the preamble asks for the worse response;
    NaN when invalid."""
    p_first_ab: float
    """P(the labeller picks slot 1) with a in slot 1 (mean over samples; NaN when that order is invalid)."""
    p_first_ba: float
    """The same with b in slot 1."""
    imputed: bool
    """A label log-prob was imputed in some order (top-k list without it)."""
    too_long: bool
    """A prompt did not fit the labeller's context; the pair is skipped."""
    invalid_answers: int = 0
    """Requests of this pair that got no valid answer (NaN / inf / positive log-probs, more than all the mass) after
    `rlxf.backends.cache.cached_requests` asked again; their orders count as invalid."""
    rationales_ab: list[str] = field(default_factory=list)
    rationales_ba: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.too_long and not math.isnan(self.p_a)


class PairwiseLabeler:
    """Soft AI preference labels for (context, a, b) pairs from one backend and one template (docs/methods/rlaif.md §2.2–2.5).

    Calls per pair: 2 without CoT, 4 with CoT, 4·N with N-sample self-consistency. With a local backend, the
    template's ending is checked against the tokenizer first (`labels.check_ending_tokenization`): a digit that merges
    with "=" would make the label unreadable.
    """

    def __init__(
        self,
        backend: Backend,
        template: LabellingTemplate,
        *,
        cache: JudgementCache | None = None,
        k: int = 20,
        missing: str = "upper_bound",
        combine: str = "arithmetic",
        rationale_max_tokens: int = 512,
        self_consistency: int = 0,
        sc_temperature: float = 0.3,
        sc_top_k: int = 40,
        seed: int = 0,
        progress: bool = False,
    ):
        tokenizer = getattr(backend, "tokenizer", None)
        if tokenizer is not None:
            check_ending_tokenization(tokenizer, template.ending, LABELS)
        if self_consistency and not template.cot:
            raise UserError("self_consistency needs a chain-of-thought template (cot=True)")
        self.backend, self.template, self.cache = backend, template, cache
        self.k, self.missing, self.combine = k, missing, combine
        self.rationale_max_tokens = rationale_max_tokens
        self.samples = max(1, self_consistency) if template.cot else 1
        self.sampled = bool(self_consistency)
        self.sc_temperature, self.sc_top_k, self.seed = sc_temperature, sc_top_k, seed
        self.progress = progress
        self.requests_total = self.requests_sent = 0

    def _generate_params(self, s: int) -> dict[str, Any]:
        if not self.sampled:
            return {"max_new_tokens": self.rationale_max_tokens, "temperature": 0.0, "top_k": 0, "seed": 0}
        return {
            "max_new_tokens": self.rationale_max_tokens,
            "temperature": self.sc_temperature,
            "top_k": self.sc_top_k,
            "seed": self.seed * 1_000 + s,
        }

    def _orders(self, pairs: Sequence[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        """(context, slot 1, slot 2) for every pair in both orders: [p0 (a,b), p0 (b,a), p1 (a,b), ...]."""
        return [o for c, a, b in pairs for o in ((c, a, b), (c, b, a))]

    def label(self, pairs: Sequence[tuple[str, str, str]]) -> list[Judgement]:
        """Judge (context, a, b) text triples; one Judgement per pair, in order."""
        t = self.template
        orders = self._orders(pairs)  # (2P,)
        per_sample = 2 if t.cot else 1
        total = len(orders) * self.samples * per_sample
        bar = tqdm(total=total, desc="labelling", unit="req", disable=not self.progress, dynamic_ncols=True)

        def tick() -> None:
            stats = self.backend.stats
            bar.set_postfix(
                calls=stats.calls,
                retries=stats.retries,
                tok=stats.prompt_tokens + stats.completion_tokens,
                refresh=False,
            )
            bar.update(1)

        def run(kind: str, params: dict[str, Any], prompts: list[Prompt]) -> list[Any]:
            results, sent = cached_requests(self.backend, self.cache, kind, params, prompts, on_result=tick)
            bar.update(len(prompts) - sent)  # answered from the cache
            self.requests_total += len(prompts)
            self.requests_sent += sent
            return results

        too_long = [False] * len(orders)
        bad_answers = [0] * len(orders)  # requests per order with no valid answer (not cached)
        rationales: list[list[str]] = [[] for _ in orders]
        scoring: list[list[Prompt | None]] = []  # (S, 2P)
        if t.cot:
            step1 = [split_prompt(build_rationale_prompt(t, *o), t.cot_lead.rpartition("\n")[2]) for o in orders]
            for s in range(self.samples):
                prompts_s: list[Prompt | None] = []
                for j, (o, res) in enumerate(zip(orders, run("generate", self._generate_params(s), step1))):
                    if "error" in res:
                        if res["error"] == "too_long":
                            too_long[j] = True
                        else:
                            bad_answers[j] += 1
                        prompts_s.append(None)
                        continue
                    rationale = clean_rationale(res["text"], t)
                    rationales[j].append(rationale)
                    full = build_cot_scoring_prompt(t, *o, rationale)
                    prompts_s.append(Prompt(step1[j].user, full[len(step1[j].user) :]))
                scoring.append(prompts_s)
        else:
            scoring.append([split_prompt(build_prompt(t, *o), t.ending) for o in orders])

        logp = torch.full((self.samples, len(orders), 2), float("nan"), dtype=torch.float64)  # (S, 2P, 2)
        imputed = [False] * len(orders)
        params = {"k": self.k, "labels": list(LABELS)}
        for s, prompts_s in enumerate(scoring):
            idx = [j for j, p in enumerate(prompts_s) if p is not None]
            results = run("logprobs", params, [prompts_s[j] for j in idx])
            for j, res in zip(idx, results):
                if "error" in res:
                    if res["error"] == "too_long":
                        too_long[j] = True
                    else:
                        bad_answers[j] += 1
                    continue
                read = label_logprobs_from_topk(res["top"], LABELS, self.missing)
                logp[s, j] = torch.tensor(read.logprobs, dtype=torch.float64)
                imputed[j] |= read.imputed
        bar.close()

        # ALGO LOGIC: two-token softmax per order (§2.2), both orders averaged (§2.3), samples averaged (§2.5)
        p_first = preference_from_logprobs(logp[..., 0], logp[..., 1])  # (S, 2P); NaN = invalid order
        p_ab, p_ba = p_first[:, 0::2].T, p_first[:, 1::2].T  # (P, S) each
        p_raw = self_consistency(debias(p_ab, p_ba, self.combine))  # (P, S) -> (P,)
        p_a = invert_for_harmless(p_raw, self.template.invert)  # (P,)
        first_ab, first_ba = p_ab.nanmean(-1), p_ba.nanmean(-1)  # (P,)
        out = []
        for i in range(len(pairs)):
            long_i = too_long[2 * i] or too_long[2 * i + 1]
            out.append(
                Judgement(
                    p_a=math.nan if long_i else float(p_a[i]),
                    p_first_ab=float(first_ab[i]),
                    p_first_ba=float(first_ba[i]),
                    imputed=imputed[2 * i] or imputed[2 * i + 1],
                    too_long=long_i,
                    invalid_answers=bad_answers[2 * i] + bad_answers[2 * i + 1],
                    rationales_ab=rationales[2 * i],
                    rationales_ba=rationales[2 * i + 1],
                )
            )
        return out


# --- metrics ---------------------------------------------------------------------------------------------------------


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.item()
    return None if isinstance(x, float) and not math.isfinite(x) else x


def label_metrics(judgements: Sequence[Judgement], human_prefers_a: Sequence[bool | None]) -> dict[str, Any]:
    """Position bias, alignment with human labels and calibration of `label_prob` (docs/methods/rlaif.md §2.9) over valid pairs.

    Alignment and calibration use the pairs with a human label (None = unknown); calibration compares `label_prob`
    with agreement (ECE over 5 bins on [½, 1], `labels.expected_calibration_error`).
    """
    valid = [j for j in judgements if j.valid]
    p_ab = torch.tensor([j.p_first_ab for j in valid], dtype=torch.float64)
    p_ba = torch.tensor([j.p_first_ba for j in valid], dtype=torch.float64)
    bias = {k: _finite_or_none(v) for k, v in position_bias(p_ab, p_ba).items()}
    n_biased, n_slot1 = int(bias["n_biased"] or 0), int(bias["n_slot1"] or 0)
    bias["binomial_p"] = binomial_test_two_sided(n_slot1, n_biased) if n_biased else None
    metrics: dict[str, Any] = {
        "n_pairs": len(judgements),
        "n_valid": len(valid),
        "n_invalid": sum(not j.valid and not j.too_long for j in judgements),
        "n_too_long": sum(j.too_long for j in judgements),
        "n_invalid_answers": sum(j.invalid_answers for j in judgements),
        "n_imputed": sum(j.imputed for j in valid),
        "n_single_order": int(single_order(p_ab, p_ba).sum()),
        "position_bias": bias,
        "mean_label_prob": _finite_or_none(label_prob(torch.tensor([j.p_a for j in valid])).mean()) if valid else None,
        "alignment": None,
        "calibration": None,
    }
    known = [(j, h) for j, h in zip(judgements, human_prefers_a) if h is not None and j.valid]
    if known:
        p_a = torch.tensor([j.p_a for j, _ in known], dtype=torch.float64)
        human = torch.tensor([h for _, h in known])
        metrics["alignment"] = {k: _finite_or_none(v) for k, v in alignment(p_a, human).items()}
        agrees = torch.where(human, p_a > 0.5, p_a < 0.5)  # ties count as wrong, as in `alignment`
        conf = label_prob(p_a)
        bins = reliability_bins(conf, agrees)
        metrics["calibration"] = {
            "ece": _finite_or_none(expected_calibration_error(conf, agrees)),
            "bins": {k: [_finite_or_none(float(x)) for x in v] for k, v in bins.items()},
        }
    return metrics


# --- the stage -------------------------------------------------------------------------------------------------------


def _beside(out: Path, suffix: str) -> Path:
    name = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(name + suffix)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def _output_row(row: dict[str, Any], j: Judgement, labeler: str, prompt_id: str, cot: bool) -> dict[str, Any]:
    a, b = row["response_a"], row["response_b"]
    prefer_a = j.p_a >= 0.5  # an exact tie keeps a as chosen, with label_prob ½
    out: dict[str, Any] = {
        "prompt": row["prompt"],
        "chosen": a if prefer_a else b,
        "rejected": b if prefer_a else a,
        "label_prob": float(label_prob(j.p_a)),
        "p_a": j.p_a,
        "p_first_ab": _finite_or_none(j.p_first_ab),
        "p_first_ba": _finite_or_none(j.p_first_ba),
        "same_position": bool(same_position(j.p_first_ab, j.p_first_ba)),
        "valid": True,
        "imputed": j.imputed,
        "single_order": bool(single_order(j.p_first_ab, j.p_first_ba)),
        "ai_prefers": "a" if prefer_a else "b",
    }
    if row.get("_human_prefers_a") is not None:
        # ties (p_a = ½) count as disagreement, as in `labels.alignment`
        out["human_agrees"] = j.p_a > 0.5 if row["_human_prefers_a"] else j.p_a < 0.5
    if cot:
        one = len(j.rationales_ab) <= 1
        out["rationale_ab"] = (j.rationales_ab[0] if j.rationales_ab else None) if one else j.rationales_ab
        out["rationale_ba"] = (j.rationales_ba[0] if j.rationales_ba else None) if one else j.rationales_ba
    out |= {"labeler": labeler, "prompt_id": prompt_id}
    for key, value in row.items():
        if key.startswith("_pair_"):
            va, vb = value
            out[f"{key[6:]}_chosen"], out[f"{key[6:]}_rejected"] = (va, vb) if prefer_a else (vb, va)
        elif not key.startswith("_") and key not in out and key not in ("response_a", "response_b"):
            out[key] = value
    return out


def nothing_labelled_message(dropped: Sequence[dict[str, Any]], cfg: LabelConfig, labeler: str, path: Path) -> str:
    """Why a run labelled no pair (counts by reason) and what to change, as one line."""
    counts: dict[str, int] = {}
    for row in dropped:
        counts[row["reason"]] = counts.get(row["reason"], 0) + 1
    what = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    advice = []
    if counts.get("invalid"):
        advice.append(
            f"invalid = neither label token ({' / '.join(LABELS)}) was among the top {cfg.top_k} log-probs of either "
            "order: raise --top_k (and the server's cap: vLLM --max-logprobs, rlxf serve --max_logprobs), use "
            f"--missing upper_bound (now {cfg.missing}), or check that the prompt ends where the labeller writes the "
            "label"
        )
    if counts.get("too_long"):
        advice.append(
            f"too_long = the prompt did not fit the labeller's context: raise --max_prompt_tokens (now "
            f"{cfg.max_prompt_tokens}) up to the model's context, lower --rationale_max_tokens, or shorten the inputs"
        )
    if counts.get("invalid_answer"):
        advice.append(
            "invalid_answer = the backend returned impossible log-probs (NaN / inf / positive / more than all the "
            "mass) every time it was asked: fix the server (nothing of it was cached) and re-run"
        )
    return f"labelled 0 of {len(dropped)} pairs with {labeler}: {what} (see {path}). " + "; ".join(advice)


def run_label(cfg: LabelConfig) -> dict[str, Any]:
    """Label every pair of `cfg.input`; write the preference rows, metrics and stats; return a summary dict."""
    if not cfg.input:
        raise UserError("label needs --input FILE: pairs with prompt + response_a/response_b (or chosen/rejected)")
    if cfg.top_k < 1 or cfg.self_consistency < 0 or cfg.rationale_max_tokens < 1:
        raise UserError(
            f"need top_k >= 1, self_consistency >= 0, rationale_max_tokens >= 1; got {cfg.top_k}, "
            f"{cfg.self_consistency}, {cfg.rationale_max_tokens}"
        )
    start = time.time()
    out = Path(cfg.out)
    template = build_template(cfg)
    rows = load_label_pairs(cfg.input, cfg.on_bad_row, _beside(out, ".rejected.jsonl"))
    backend = build_backend(cfg.backend, max_context=cfg.max_prompt_tokens)
    cache_path = Path(cfg.cache) if cfg.cache else _beside(out, ".cache.sqlite")
    cache = JudgementCache(cache_path)
    prompt_id = template_id(template)
    labeler = f"{backend.kind}:{backend.model_id}"
    logger.info(
        "labelling %d pairs from %s with %s, prompt %s (invert=%s); cache %s (%d judgements)",
        len(rows),
        cfg.input,
        labeler,
        prompt_id,
        template.invert,
        cache_path,
        len(cache),
    )
    try:
        labeler_obj = PairwiseLabeler(
            backend,
            template,
            cache=cache,
            k=cfg.top_k,
            missing=cfg.missing,
            combine=cfg.combine,
            rationale_max_tokens=cfg.rationale_max_tokens,
            self_consistency=cfg.self_consistency,
            sc_temperature=cfg.sc_temperature,
            sc_top_k=cfg.sc_top_k,
            seed=cfg.seed,
            progress=cfg.progress,
        )
        triples = [
            (
                as_text(r["prompt"]).strip(),
                as_text(r["response_a"], True).strip(),
                as_text(r["response_b"], True).strip(),
            )
            for r in rows
        ]
        judgements = labeler_obj.label(triples)
    finally:
        backend.close()
        cache.close()

    kept, dropped = [], []
    for row, j in zip(rows, judgements):
        if j.valid:
            kept.append(_output_row(row, j, labeler, prompt_id, template.cot))
        else:
            reason = "too_long" if j.too_long else "invalid_answer" if j.invalid_answers else "invalid"
            dropped.append(
                {
                    "prompt": row["prompt"],
                    "response_a": row["response_a"],
                    "response_b": row["response_b"],
                    "reason": reason,
                    "valid": False,
                    "invalid_answers": j.invalid_answers,
                    "p_first_ab": _finite_or_none(j.p_first_ab),
                    "p_first_ba": _finite_or_none(j.p_first_ba),
                    "origin": row["_origin"],
                }
            )
    write_jsonl(out, kept)
    dropped_path = _beside(out, ".dropped.jsonl")
    if dropped:
        write_jsonl(dropped_path, dropped)
        logger.warning(
            "%d pairs dropped (too long for the labeller, no label token or no valid answer); see %s",
            len(dropped),
            dropped_path,
        )

    metrics = label_metrics(judgements, [r.get("_human_prefers_a") for r in rows])
    metrics |= {
        "labeler": labeler,
        "prompt_id": prompt_id,
        "preamble_source": template.preamble.source,
        "invert": template.invert,
        "task": template.task,
    }
    rate = metrics["position_bias"]["rate"]
    if rate is not None and rate > cfg.bias_warn:
        logger.warning(
            "position bias: %.0f%% of pairs prefer the same slot in both orders (warning above %.0f%%)",
            100 * rate,
            100 * cfg.bias_warn,
        )
    stats = {
        "backend": backend.kind,
        "model": backend.model_id,
        **backend.stats.snapshot(),
        "requests_total": labeler_obj.requests_total,
        "requests_sent": labeler_obj.requests_sent,
        "requests_cached": labeler_obj.requests_total - labeler_obj.requests_sent,
        "invalid_answers": metrics["n_invalid_answers"],
        "pairs": len(rows),
        "seconds": round(time.time() - start, 3),
    }
    metrics_path, stats_path = _beside(out, ".metrics.json"), _beside(out, ".label_stats.json")
    _write_json(metrics_path, metrics)
    _write_json(stats_path, stats)
    logger.info(
        "labelled %d pairs (%d dropped) in %.1fs: %d calls (%d retries), %d prompt + %d completion tokens, %d of %d "
        "requests from the cache",
        len(kept),
        len(dropped),
        stats["seconds"],
        stats["calls"],
        stats["retries"],
        stats["prompt_tokens"],
        stats["completion_tokens"],
        stats["requests_cached"],
        stats["requests_total"],
    )
    if rows and not kept:
        raise BackendError(nothing_labelled_message(dropped, cfg, labeler, dropped_path))
    alignment_acc = (metrics["alignment"] or {}).get("accuracy")
    return {
        "out": str(out),
        "metrics": str(metrics_path),
        "stats": str(stats_path),
        "dropped": str(dropped_path) if dropped else None,
        "n_pairs": len(rows),
        "n_labelled": len(kept),
        "n_dropped": len(dropped),
        "alignment": alignment_acc,
        "position_bias_rate": rate,
        "ece": (metrics["calibration"] or {}).get("ece"),
        "calls": stats["calls"],
        "retries": stats["retries"],
        "prompt_tokens": stats["prompt_tokens"],
        "completion_tokens": stats["completion_tokens"],
        "requests_cached": stats["requests_cached"],
        "invalid_answers": stats["invalid_answers"],
    }
