"""Looking at what credit assignment keeps: `rlxf segments show` and `rlxf segments quality`.

- `run_show_segments`: each response with its segments, boundaries, segment rewards and kept / masked tokens, as
  ANSI-coloured text for the terminal and as a self-contained HTML page;
- `run_segment_quality`: on FactWorld, precision and recall of the NEGATIVE segments (segment reward < 0) against the
  gold wrong-fact spans, per granularity. The matching is pure (`segment_char_spans`, `match_negative_segments`,
  `precision_recall`).

Both go through `rlxf.credit.assign.assign_credit`, the path the trainers take, so what is shown is what is trained.

Shapes: B responses, T tokens (the padded response axis; column t is response token y_t).
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rlxf.config import check_ranges
from rlxf.credit.assign import ResponseCredit, assign_credit
from rlxf.credit.segments import (
    GRANULARITIES,
    CreditConfig,
)
from rlxf.errors import UserError
from rlxf.rewards.contract import RewardSource, token_char_offsets
from rlxf.rewards.sources import build_reward_source

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Reading responses to inspect
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Item:
    """One response to inspect: its prompt row (for the reward source), ids, label and where it came from."""

    prompt_row: dict[str, Any]
    response_ids: list[int]
    label: int
    kind: str
    """'chosen', 'rejected' or 'response'."""
    origin: str


def load_items(path: str, tokenizer: Any, limit: int, max_length: int, max_prompt_length: int) -> list[Item]:
    """Pairs (`prompt`, `chosen`, `rejected`: two items each, labels +1 / −1) or responses (`prompt`, `response`,
    optional `label` in {1, −1, 0}, default 1). A file whose first row has no `chosen` is read as responses.
    Tokenized exactly as the trainers do (`encode_preferences` / `encode_sft`: BOS, EOS, prompt cut from the left).
    The first `limit` rows (0: all)."""
    from rlxf.data.formats import DataError, load_preferences, load_prompts
    from rlxf.data.tokenize import encode_preferences, encode_sft

    lengths = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    try:
        pairs = load_preferences(path)
    except DataError as e:
        if not (e.field == "chosen" and e.reason == "missing_field"):
            raise
        pairs = None
    items: list[Item] = []
    if pairs is not None:
        pairs = pairs[:limit] if limit else pairs
        for raw, enc in zip(pairs, encode_preferences(pairs, tokenizer, **lengths)):
            prompt_row = {k: v for k, v in raw.items() if k not in ("chosen", "rejected")}
            prompt_row["prompt_ids"] = enc["prompt_ids"]
            items.append(Item(prompt_row, enc["chosen_ids"], 1, "chosen", raw["_origin"]))
            items.append(Item(prompt_row, enc["rejected_ids"], -1, "rejected", raw["_origin"]))
        return items
    rows = load_prompts(path)
    rows = rows[:limit] if limit else rows
    for row in rows:
        response, label = row.get("response"), row.get("label", 1)
        if not isinstance(response, str) or not response.strip():
            detail = "a response row needs a non-empty string 'response' (or give pairs: prompt, chosen, rejected)"
            raise DataError(detail, origin=row["_origin"], field="response", reason="missing_field", hint="")
        if isinstance(label, bool) or label not in (1, -1, 0):
            raise DataError(
                f"label must be 1, -1 or 0, got {label!r}", origin=row["_origin"], field="label", reason="bad_label",
                hint="",
            )  # fmt: skip
    sft_rows = [{"prompt": r["prompt"], "completion": r["response"], "_origin": r["_origin"]} for r in rows]
    for row, enc in zip(rows, encode_sft(sft_rows, tokenizer, **lengths)):
        n_prompt = enc["completion_mask"].index(1)
        prompt_row = {k: v for k, v in row.items() if k not in ("response", "label")}
        prompt_row["prompt_ids"] = enc["input_ids"][:n_prompt]
        items.append(
            Item(prompt_row, enc["input_ids"][n_prompt:], int(row.get("label", 1)), "response", row["_origin"])
        )
    return items


def credit_of_items(
    items: Sequence[Item], tokenizer: Any, credit: CreditConfig, source: RewardSource | None
) -> ResponseCredit:
    return assign_credit(
        credit,
        [it.label for it in items],
        [it.response_ids for it in items],
        tokenizer,
        source=source,
        prompt_rows=[it.prompt_row for it in items],
        with_tokens=True,
    )


# ---------------------------------------------------------------------------------------------------------------------
# `rlxf segments show`
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ShowSegmentsConfig:
    input: str = ""
    """JSONL / Parquet of pairs (prompt, chosen, rejected: chosen label +1, rejected −1) or of responses (prompt,
    response, optional label 1 / −1 / 0, default 1). Required."""
    model: str = ""
    """save_pretrained directory whose tokenizer splits the responses (the policy's, e.g. the SFT model). Required."""
    credit: CreditConfig = field(default_factory=lambda: CreditConfig(granularity="segment"))
    """The credit section to inspect (paste a trainer's `credit:`): `token_reward` spec (required unless granularity
    is 'sequence'), granularity, τ, window, min_len. All shown responses form one batch for τ."""
    limit: int = 10
    """Rows to show (a pair is one row, two responses); 0 shows all."""
    html: str = ""
    """Also write the rendering as a self-contained HTML page to this path (empty: no page)."""
    color: bool = True
    """ANSI colours in the terminal text (kept segments green, masked ones dim); false for plain text."""
    max_length: int = 256
    """Longest prompt + response in tokens, as in the trainers; longer prompts are cut from the left."""
    max_prompt_length: int = 192
    """Longest prompt in tokens."""

    def __post_init__(self) -> None:
        check_ranges(self, {"limit": ">=0", "max_length": ">=2", "max_prompt_length": ">=1"})


_GREEN, _RED, _DIM, _BOLD, _CYAN, _RESET = "\x1b[32m", "\x1b[31m", "\x1b[2m", "\x1b[1m", "\x1b[36m", "\x1b[0m"


def visible(text: str) -> str:
    """Text safe to print on one terminal line: newline -> '⏎', tab -> '⇥', other control characters (ESC
    included, so data cannot inject terminal codes) -> their \\x escape."""
    out = []
    for ch in text:
        if ch == "\n":
            out.append("⏎")
        elif ch == "\t":
            out.append("⇥")
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _label_text(label: int) -> str:
    return {1: "+1", -1: "−1", 0: "0"}[label]


def render_terminal(items: Sequence[Item], rc: ResponseCredit, credit: CreditConfig, color: bool = True) -> str:
    """One block per response: a header (kind, label, counts, origin), the prompt, then the segments in order, each
    followed by its reward and ✓ (kept: trained on) or ✗ (masked), separated by ┃ (segment boundaries: pivots for
    'segment'). Colours: kept text green, masked text dim; positive segment rewards green, negative red."""

    def paint(code: str, text: str) -> str:
        return f"{code}{text}{_RESET}" if color else text

    lines = [
        paint(
            _BOLD,
            f"rlxf-ASR segments · granularity {credit.granularity} · token rewards "
            f"{credit.token_reward or '(none)'} · τ = {rc.tau:.4g} · {len(items)} responses",
        ),  # fmt: skip
        "legend: ✓ kept (label × segment reward > 0, trained on) · ✗ masked · ┃ segment boundary · [R] segment reward",
    ]
    for b, item in enumerate(items):
        n = int(rc.mask[b].sum())
        kept = int(rc.keep[b].sum())
        segs = rc.segments[b]
        lines.append("")
        lines.append(
            paint(_BOLD, f"[{b}] {item.kind} ℓ={_label_text(item.label)}")
            + f" · {n} tokens · {len(segs)} segments · kept {kept}/{n} · {item.origin}"
        )
        prompt = item.prompt_row.get("prompt")
        lines.append(paint(_CYAN, "  prompt │ ") + visible(prompt if isinstance(prompt, str) else repr(prompt)))
        parts = []
        for seg in segs:
            text = visible("".join(rc.tokens[b][seg.start : seg.end]))
            is_kept = bool(rc.keep[b, seg.start])
            r = float(seg.reward)
            tag = f"[{r:+.3g} {'✓' if is_kept else '✗'}]"
            parts.append(
                paint(_GREEN if is_kept else _DIM, text) + paint(_GREEN if r > 0 else _RED if r < 0 else _DIM, tag)
            )
        lines.append(paint(_CYAN, "  resp.  │ ") + " ┃ ".join(parts))
    return "\n".join(lines)


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
.item { margin: 1.2em 0; padding: 0.6em 0.8em; border: 1px solid #ddd; border-radius: 6px; }
.head { font-weight: 600; } .meta { color: #666; font-size: 0.9em; }
.prompt { color: #0a5d8a; white-space: pre-wrap; font-family: monospace; margin: 0.3em 0; }
.resp { font-family: monospace; white-space: pre-wrap; line-height: 1.9; }
.seg { border-left: 3px solid #888; padding: 0 2px; margin-left: 2px; }
.kept { background: #d8f5d8; } .masked { color: #999; background: #f4f4f4; }
.r { font-size: 0.75em; vertical-align: super; padding: 0 2px; }
.pos { color: #17802b; } .neg { color: #c0262d; } .zero { color: #888; }
.tok:hover { outline: 1px dotted #555; }
"""


def render_html(items: Sequence[Item], rc: ResponseCredit, credit: CreditConfig) -> str:
    """A self-contained HTML page (inline CSS, no script): every text escaped; each token a span whose tooltip gives
    its reward r_t, each segment a bordered span (kept green, masked grey) followed by its reward R."""
    esc = lambda x: html.escape(str(x), quote=True)  # noqa: E731
    body = [
        f"<h1>rlxf-ASR segments</h1><p class='meta'>granularity <b>{esc(credit.granularity)}</b> · token rewards "
        f"<b>{esc(credit.token_reward or '(none)')}</b> · τ = {rc.tau:.4g} · window {credit.window} · min_len "
        f"{credit.min_len} · {len(items)} responses. Green: kept (label × segment reward &gt; 0, trained on); grey: "
        "masked. Hover a token for its reward.</p>"
    ]
    for b, item in enumerate(items):
        n, kept = int(rc.mask[b].sum()), int(rc.keep[b].sum())
        prompt = item.prompt_row.get("prompt")
        segs_html = []
        for seg in rc.segments[b]:
            r = float(seg.reward)
            cls = "kept" if bool(rc.keep[b, seg.start]) else "masked"
            toks = "".join(
                f"<span class='tok' title='r = {float(rc.token_rewards[b, t]):+.4g}'>"
                f"{esc(visible(rc.tokens[b][t]).replace('⏎', '⏎' + chr(10)))}</span>"
                for t in range(seg.start, seg.end)
            )
            sign = "pos" if r > 0 else "neg" if r < 0 else "zero"
            segs_html.append(f"<span class='seg {cls}' title='R = {r:+.4g}'>{toks}<span class='r {sign}'>{r:+.3g}"
                             "</span></span>")  # fmt: skip
        body.append(
            f"<div class='item'><div class='head'>[{b}] {esc(item.kind)} ℓ = {_label_text(item.label)}</div>"
            f"<div class='meta'>{n} tokens · {len(rc.segments[b])} segments · kept {kept}/{n} · {esc(item.origin)}"
            f"</div><div class='prompt'>{esc(prompt if isinstance(prompt, str) else prompt)}</div>"
            f"<div class='resp'>{''.join(segs_html)}</div></div>"
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>rlxf segments</title>"
        f"<style>{_HTML_STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _tokenizer_and_source(model: str, credit: CreditConfig) -> tuple[Any, RewardSource | None]:
    from rlxf.hf import load_tokenizer

    tokenizer = load_tokenizer(model)
    if credit.granularity != "sequence" and not credit.token_reward:
        raise UserError(
            "--credit.token_reward is required (e.g. 'rm:runs/rm/final:token', 'dpo:runs/dpo/final', "
            "'factworld:runs/factworld:token')"
        )
    return tokenizer, build_reward_source(credit.token_reward) if credit.token_reward else None


def run_show_segments(cfg: ShowSegmentsConfig) -> str:
    """Segments of the first `limit` rows of `cfg.input` under `cfg.credit`: returns the terminal rendering and, with
    `cfg.html`, writes the HTML page."""
    if not cfg.input:
        raise UserError("--input is required: a JSONL of pairs (prompt, chosen, rejected) or responses")
    tokenizer, source = _tokenizer_and_source(cfg.model, cfg.credit)
    items = load_items(cfg.input, tokenizer, cfg.limit, cfg.max_length, cfg.max_prompt_length)
    rc = credit_of_items(items, tokenizer, cfg.credit, source)
    text = render_terminal(items, rc, cfg.credit, color=cfg.color)
    if cfg.html:
        path = Path(cfg.html)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render_html(items, rc, cfg.credit), encoding="utf-8")
        text += f"\n\nHTML page: {path}"
    return text


# ---------------------------------------------------------------------------------------------------------------------
# `rlxf segments quality`: negative segments against FactWorld's wrong-fact spans
# ---------------------------------------------------------------------------------------------------------------------


def segment_char_spans(
    token_spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Token spans [a, b) of one response -> character spans [start, end) of its text, through the tokens'
    character offsets. Tokens with empty offsets (EOS, a split multi-byte character) are ignored; a segment of such
    tokens only gets an empty span (it covers no text, so it overlaps nothing)."""
    out = []
    for a, b in token_spans:
        covered = [(s, e) for s, e in offsets[a:b] if e > s]
        out.append((covered[0][0], covered[-1][1]) if covered else (offsets[a][0], offsets[a][0]))
    return out


def overlaps(x: tuple[int, int], y: tuple[int, int]) -> bool:
    """Half-open intervals [x0, x1) and [y0, y1) share at least one character (an empty one shares none)."""
    return x[0] < x[1] and y[0] < y[1] and x[0] < y[1] and y[0] < x[1]


def match_negative_segments(
    segments: Sequence[tuple[int, int, float]], wrong_spans: Sequence[tuple[int, int]]
) -> dict[str, int]:
    """Negative segments of one response against its gold wrong-fact spans (all character spans, end exclusive).

    A negative segment (reward < 0) is a true positive if it overlaps some wrong span; a wrong span is found if some
    negative segment overlaps it. Returns counts: negative, true_positive, wrong, found.
    """
    negative = [(a, b) for a, b, r in segments if r < 0]
    return {
        "negative": len(negative),
        "true_positive": sum(any(overlaps(n, w) for w in wrong_spans) for n in negative),
        "wrong": len(wrong_spans),
        "found": sum(any(overlaps(n, w) for n in negative) for w in wrong_spans),
    }


def precision_recall(counts: Mapping[str, int]) -> tuple[float | None, float | None]:
    """(true_positive / negative, found / wrong); None where the denominator is 0 (undefined, not 0 or 1)."""
    precision = counts["true_positive"] / counts["negative"] if counts["negative"] else None
    recall = counts["found"] / counts["wrong"] if counts["wrong"] else None
    return precision, recall


@dataclass
class SegmentQualityConfig:
    world: str = ""
    """FactWorld directory (its kb.json is the gold scorer). Required."""
    model: str = ""
    """save_pretrained directory whose tokenizer splits the responses (the policy's). Required."""
    input: str = ""
    """Pairs or responses to segment (as `segments show`); empty: WORLD/preferences_test.jsonl."""
    credit: CreditConfig = field(default_factory=lambda: CreditConfig(granularity="segment"))
    """Token reward spec (`credit.token_reward`, required) and segmentation options; `credit.granularity` is
    replaced by each of `granularities`."""
    granularities: list[str] = field(default_factory=lambda: ["token", "step", "segment"])
    """Granularities to measure (comma-separated on the command line)."""
    batch_size: int = 64
    """Responses per batch: τ is computed over each batch's token rewards (chosen and rejected together)."""
    limit: int = 0
    """Rows to read (a pair is one row, two responses); 0 reads all."""
    max_length: int = 256
    """Longest prompt + response in tokens, as in the trainers."""
    max_prompt_length: int = 192
    """Longest prompt in tokens."""

    def __post_init__(self) -> None:
        check_ranges(self, {"batch_size": ">=1", "limit": ">=0", "max_length": ">=2", "max_prompt_length": ">=1"})
        bad = [g for g in self.granularities if g not in GRANULARITIES]
        if bad or not self.granularities:
            raise UserError(f"granularities {self.granularities}: each must be one of {list(GRANULARITIES)}")
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")


def run_segment_quality(cfg: SegmentQualityConfig) -> dict[str, Any]:
    """Precision / recall of negative segments against the gold wrong-fact spans, per granularity.

    Gold: every judged piece of FactWorld's scorer whose verdict is wrong (a fact's wrong value, an invalid list item,
    a wrong retain word), as a character span of the decoded response. Responses with no wrong piece still count for
    precision (each of their negative segments is a false positive).
    """
    from rlxf.worlds.factworld import load_factworld

    if not cfg.world:
        raise UserError("--world is required: a FactWorld directory (rlxf world factworld --out DIR)")
    world = load_factworld(cfg.world)
    if not cfg.credit.token_reward:
        raise UserError("--credit.token_reward is required: the token rewards whose negative segments are measured")
    tokenizer, source = _tokenizer_and_source(cfg.model, cfg.credit)
    path = cfg.input or str(Path(cfg.world) / "preferences_test.jsonl")
    items = load_items(path, tokenizer, cfg.limit, cfg.max_length, cfg.max_prompt_length)

    # Token rewards, texts, offsets and gold once; segmentation per granularity.
    batches = [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    scored = []
    for batch in batches:
        ids = [it.response_ids for it in batch]
        texts = [tokenizer.decode(i, skip_special_tokens=True) for i in ids]
        rewards, _ = source([it.prompt_row for it in batch], ids, texts, tokenizer)
        offsets = [token_char_offsets(i, t, tokenizer) for i, t in zip(ids, texts)]
        wrong = [
            [(v.start, v.end) for v in world.score(it.prompt_row, t).verdicts if v.correct is False]
            for it, t in zip(batch, texts)
        ]
        scored.append((batch, ids, texts, rewards, offsets, wrong))

    result: dict[str, Any] = {
        "token_reward": cfg.credit.token_reward,
        "input": path,
        "responses": len(items),
        "wrong_spans": sum(len(w) for *_, wrong in scored for w in wrong),
        "by_granularity": {},
    }
    for granularity in cfg.granularities:
        credit = replace(cfg.credit, granularity=granularity)
        totals = {"negative": 0, "true_positive": 0, "wrong": 0, "found": 0}
        n_segments, taus = 0, []
        for batch, ids, texts, rewards, offsets, wrong in scored:
            rc = assign_credit(credit, [it.label for it in batch], ids, tokenizer, token_rewards=rewards, texts=texts)
            taus.append(rc.tau)
            for segs, offs, gold in zip(rc.segments, offsets, wrong):
                n_segments += len(segs)
                spans = segment_char_spans([(s.start, s.end) for s in segs], offs)
                counts = match_negative_segments([(a, b, float(s.reward)) for (a, b), s in zip(spans, segs)], gold)
                for k in totals:
                    totals[k] += counts[k]
        precision, recall = precision_recall(totals)
        result["by_granularity"][granularity] = {
            "precision": precision,
            "recall": recall,
            "negative_segments": totals["negative"],
            "true_positive_segments": totals["true_positive"],
            "wrong_spans_found": totals["found"],
            "segments": n_segments,
            "tau": sum(taus) / len(taus) if taus else 0.0,
        }
    logger.info("segment quality (%s): %s", cfg.credit.token_reward, result["by_granularity"])
    return result
