"""Direct RLAIF (d-RLAIF, Lee et al. 2023 §2.4 of v2; docs/methods/rlaif.md §2.7): the LLM scores every rollout from 1 to 10
and the expected score is the reward, with no reward model in between.

For each response:
  1. prompt = rater instructions + context + "SUMMARY: {y}" (or "RESPONSE:") + "SCORE:" (`prompts.build_direct_score_prompt`);
  2. read P(i) for every score i from the next-token log-probs (variants "i" and " i" summed), renormalised over
     the ten scores (`labels.expected_score`);
  3. s = Σ i·P(i); reward r = (s − 5.5) / 4.5 ∈ [−1, 1] (`labels.direct_reward`; an rlxf decision, the paper says
     only "rescaled to [−1, 1]").
"10" is usually two tokens ("1", "0"): one extra request on prompt + "1" gives q = P("0" | "1"), then
P(10) = P("1")·q and P(1) = P("1")·(1 − q) (`labels.split_ten`). A local model whose vocabulary has a single "10" token
reads it directly; a remote one (vocabulary unknown) adds any "10" token in its top-k list to the split estimate.
`scale="0-9"` avoids the split. A score missing from a top-k list gets probability 0; a response with no score token
at all gets reward 0 and is counted in `n_invalid`.

`DirectScoreSource` follows the reward contract of `rlxf.rewards.sources`: the reward sits on the last response token.

Shapes: B responses, T response tokens.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlxf.backends import Backend, Prompt, TopK, build_backend, parse_backend_spec, split_prompt
from rlxf.backends.cache import JudgementCache, cached_requests
from rlxf.errors import UserError
from rlxf.feedback.label_math import direct_reward, expected_score, label_variants, split_ten
from rlxf.feedback.prompts import build_direct_score_prompt, format_tldr_context
from rlxf.rewards.contract import RewardOutput, check_batch, scalar_rewards

logger = logging.getLogger(__name__)

SCORE_LABELS = {"1-10": tuple(str(i) for i in range(1, 11)), "0-9": tuple(str(i) for i in range(10))}
_TRAILING = re.compile(r"([.!?,;:…])\1+$")


def strip_trailing(text: str) -> str:
    """Trailing whitespace removed and a repeated final punctuation mark collapsed to one ("Good!!! " -> "Good!"):
    the reward hack the paper saw in RL summaries (docs/methods/rlaif.md §6), normalised before scoring."""
    return _TRAILING.sub(r"\1", text.rstrip())


def _variants_logprob(top: Mapping[str, float], label: str, bare_only: bool = False) -> float:
    """log Σ P(variant) over the label's spellings present in the map ("k", " k"); −inf when none is."""
    present = [top[v] for v in ((label,) if bare_only else label_variants(label)) if v in top]
    if not present:
        return -math.inf
    m = max(present)
    return m + math.log(sum(math.exp(v - m) for v in present))


def score_logprobs(
    tops: Sequence[TopK], tops_after_one: Sequence[TopK | None], scale: str, ten_is_token: bool | None
) -> Tensor:
    """(B, 10) log-probs of the scores in increasing order from top-k maps (docs/methods/rlaif.md §2.7 steps 2 and 4).

    Args:
        tops: B maps after "SCORE:".
        tops_after_one: B maps after "SCORE:1" (None where not asked: then P(10) comes from a "10" token only).
        scale: "1-10" or "0-9".
        ten_is_token: True when the vocabulary has a single "10" token (read directly, no split); False / None
            (unknown) split P("1") with q = P("0" | "1") and add any "10" token the map lists.
    """
    labels = SCORE_LABELS[scale]
    out = torch.tensor([[_variants_logprob(top, s) for s in labels] for top in tops], dtype=torch.float64)  # (B, 10)
    if scale == "1-10" and not ten_is_token:
        logq = torch.tensor(
            [-math.inf if t is None else _variants_logprob(t, "0", bare_only=True) for t in tops_after_one],
            dtype=torch.float64,
        )  # (B,) log P("0" | "1"); after "1" only the bare digit continues "10"
        split_one, split_tenth = split_ten(out[:, 0], logq)  # (B,), (B,)
        has_one = torch.isfinite(out[:, 0])
        out[:, 0] = torch.where(has_one, split_one, out[:, 0])
        out[:, 9] = torch.logaddexp(out[:, 9], torch.where(has_one, split_tenth, torch.full_like(logq, -math.inf)))
    return out


def _context(row: Mapping[str, Any]) -> str:
    """The text the rater reads: a TL;DR block when the row has subreddit/title/post, else the prompt (a message
    list as "Human: … / Assistant: …" turns)."""
    from rlxf.feedback.label import as_text

    if all(k in row for k in ("subreddit", "title", "post")):
        return format_tldr_context(row["subreddit"], row["title"], row["post"])
    return as_text(row["prompt"]).strip()


def _error_kind(result: Mapping[str, Any]) -> str:
    """'invalid_answer' for an answer the cache refused, anything else counts as a prompt too long."""
    return "invalid_answer" if result.get("error") == "invalid_answer" else "too_long"


class DirectScoreSource:
    """d-RLAIF reward source: an LLM's expected 1–10 score of each response, mapped to [−1, 1], on its last token.

    Build it from a backend, or from a spec string with `from_spec` (what `rlaif:SPEC` reward terms use).
    `last_scores` holds the expected scores of the latest call (NaN = no score token or too long: reward 0), for
    logging.
    """

    def __init__(
        self,
        backend: Backend,
        task: str = "summarize",
        scale: str = "1-10",
        top_k: int = 20,
        strip: bool = True,
        cache: JudgementCache | str | Path | None = None,
        wording: str | None = None,
    ):
        if scale not in SCORE_LABELS:
            raise UserError(f"scale must be one of {tuple(SCORE_LABELS)}, got {scale!r}")
        try:
            build_direct_score_prompt("", "", task, scale, wording)  # validates task and wording
        except ValueError as e:
            raise UserError(str(e)) from None
        self.backend, self.task, self.scale, self.top_k, self.strip = backend, task, scale, top_k, strip
        self.wording = wording
        self.cache = JudgementCache(cache) if isinstance(cache, (str, Path)) else cache
        self.ten_is_token = backend.single_token("10") if scale == "1-10" else None
        self.n_invalid = 0  # responses with no score (no score token, or too long), reward 0; over the lifetime
        self.n_too_long = 0  # of those, prompts too long for the labeller
        self.last_scores: Tensor | None = None

    @classmethod
    def from_spec(cls, spec: str) -> DirectScoreSource:
        """'TARGET[?key=value&...]': TARGET a local model directory or an OpenAI-compatible server URL; keys are
        BackendConfig fields (model, api, batch_size, device, timeout, max_concurrency, ...) and task, scale,
        top_k, strip, cache, wording ("paper": the paper's summarisation prompt, the default for summarize; "rlxf":
        rlxf's wording, for texts that are not Reddit posts). E.g. 'runs/judge?task=helpful' or 'http://127.0.0.1:8000/v1?model=judge&api=chat'."""
        cfg, opts = parse_backend_spec(spec, extra_keys=("task", "scale", "top_k", "strip", "cache", "wording"))
        top_k = opts.get("top_k", "20")
        if not top_k.isdigit() or int(top_k) < 1:
            raise UserError(f"top_k must be a positive integer in {spec!r}, got {top_k!r}")
        strip = opts.get("strip", "true").lower()
        if strip not in ("true", "false", "1", "0"):
            raise UserError(f"strip must be true or false in {spec!r}, got {strip!r}")
        return cls(
            build_backend(cfg),
            task=opts.get("task", "summarize"),
            scale=opts.get("scale", "1-10"),
            top_k=int(top_k),
            strip=strip in ("true", "1"),
            cache=opts.get("cache") or None,
            wording=opts.get("wording") or None,
        )

    def prompts(self, contexts: Sequence[str], responses: Sequence[str]) -> list[Prompt]:
        """The scoring prompts; in chat mode "SCORE:" is the assistant prefill."""
        out = []
        for context, response in zip(contexts, responses):
            text = build_direct_score_prompt(
                context, strip_trailing(response) if self.strip else response, self.task, self.scale, self.wording
            )
            out.append(split_prompt(text, "SCORE:"))
        return out

    def score(self, contexts: Sequence[str], responses: Sequence[str]) -> Tensor:
        """(B,) expected scores s (NaN where no score token was seen or the prompt was too long)."""
        prompts = self.prompts(contexts, responses)
        labels = list(SCORE_LABELS[self.scale])
        params = {"k": self.top_k, "labels": labels}
        results, _ = cached_requests(self.backend, self.cache, "logprobs", params, prompts)
        # An error result is a prompt too long for the labeller, or an answer that stayed invalid after re-asking
        # (non-finite or impossible log-probs, `rlxf.backends.cache`): either way no score, reward 0.
        for kind, what in (
            ("too_long", "too long for the labeller"),
            ("invalid_answer", "answered invalid log-probs"),
        ):
            failed = [b for b, r in enumerate(results) if "error" in r and _error_kind(r) == kind]
            if not failed:
                continue
            if kind == "too_long":
                self.n_too_long += len(failed)
            logger.warning(
                "d-RLAIF: %d of %d prompts %s (%s); they get no score",
                len(failed),
                len(prompts),
                what,
                results[failed[0]].get("message", ""),
            )
        tops = [r.get("top", {}) for r in results]  # {} = no score token: s is NaN, the reward 0
        after_one: list[TopK | None] = [None] * len(prompts)
        if self.scale == "1-10" and not self.ten_is_token:
            need = [b for b, top in enumerate(tops) if math.isfinite(_variants_logprob(top, "1"))]
            extra = [Prompt(prompts[b].user, prompts[b].prefill + "1") for b in need]
            more, _ = cached_requests(self.backend, self.cache, "logprobs", {"k": self.top_k, "labels": ["0"]}, extra)
            for b, r in zip(need, more):
                after_one[b] = r.get("top")
        logp = score_logprobs(tops, after_one, self.scale, self.ten_is_token)  # (B, 10)
        return expected_score(logp, self.scale)  # (B,)

    def __call__(self, prompt_rows, response_ids, texts, tokenizer) -> RewardOutput:
        check_batch(prompt_rows, response_ids, texts)
        scores = self.score([_context(r) for r in prompt_rows], list(texts))  # (B,)
        self.last_scores = scores
        invalid = torch.isnan(scores)
        if invalid.any():
            self.n_invalid += int(invalid.sum())
            logger.warning(
                "d-RLAIF: %d of %d responses got no score; their reward is 0", int(invalid.sum()), len(texts)
            )
        rewards = direct_reward(scores, self.scale).nan_to_num(0.0)  # (B,)
        return scalar_rewards(rewards, response_ids)
