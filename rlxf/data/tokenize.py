"""Render, encode and truncate loaded rows (from `rlxf.data`) into token ids, and pad them into batches.

Shapes: B batch (sequences), T tokens (the longest sequence of the batch).

Rendering. Standard rows are used as they are: prompt text + completion text. Conversational rows go through the
tokenizer's chat template: the prompt is `apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)`
and the completion is the rendering of the whole conversation (prompt + completion messages) minus the prompt
rendering, which must be a prefix of it (a `DataError` otherwise).

Encoding. Prompt and completion are encoded separately (`add_special_tokens=False`), so no token merges across the
boundary; BOS (when the tokenizer has one) is put in front of the prompt unless the rendered prompt already starts
with it, and every completion / response ends with EOS: a rendering that already ends with the EOS token, possibly
followed by whitespace (the newline a chat template writes between turns), is cut right after it; any other gets
EOS appended.

Truncation (`max_length`, `max_prompt_length`). The response side is never cut. The prompt is cut first, keeping its
END (the tokens nearest the response) and its leading BOS; `max_prompt_length` caps the prompt and `max_length`
caps prompt + the longest response of the row. A row whose response does not fit even then is over-long: a
`DataError` naming the row's `_origin` with `on_bad_row="error"`, skipped into the side file with "skip" (see
`rlxf.data` for the side file; its default is `./<stem>.rejected.jsonl` after the row's input file). Each encoded row
carries `_origin` and `_prompt_tokens_cut` (how many prompt tokens were dropped, 0 for most rows); the number of
rows whose prompt was cut is logged (INFO, logger `rlxf.data.tokenize`).

`truncate_responses=True` (off by default) follows TRL instead: the prompt is cut to `max_prompt_length` (keeping its
end) and no further, and the responses are cut to the `max_length - len(prompt)` tokens left (keeping their start; a
cut response has no EOS). No row is dropped for length then (unless max_length leaves no response token at all); each
encoded row carries `_response_tokens_cut` and the number of rows cut is logged (WARNING). The default stays "never
cut a response" because a cut response teaches a policy or a reward model a reply that does not end.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from jinja2.exceptions import TemplateError
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rlxf.data.formats import BadRowHandler, DataError, check_on_bad_row, origin_file
from rlxf.errors import UserError

logger = logging.getLogger(__name__)

Text = str | list[dict[str, Any]]

TOO_LONG_HINT = (
    "Raise max_length, shorten the response, or pass on_bad_row='skip' (CLI: --on-bad-row skip) to skip over-long "
    "rows into a side file."
)
TEMPLATE_HINT = (
    "The chat template must render the prompt (with add_generation_prompt=True) as a prefix of the whole "
    "conversation; fix the template or the messages, or pass on_bad_row='skip' (CLI: --on-bad-row skip)."
)


class _RenderError(Exception):
    def __init__(self, reason: str, field: str, detail: str, hint: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail, self.hint = reason, field, detail, hint


def _chat_template(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    if tokenizer.chat_template is None:
        raise UserError(
            "conversational rows (message lists) need a tokenizer with a chat template; set tokenizer.chat_template "
            "or convert the rows to standard (string) prompt/completion text"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def render_prompt(prompt: Text, tokenizer: PreTrainedTokenizerBase) -> str:
    """The prompt as text: a string unchanged, a message list through the chat template with the generation prompt."""
    if isinstance(prompt, str):
        return prompt
    try:
        return _chat_template(tokenizer, prompt, add_generation_prompt=True)
    except TemplateError as e:
        raise _RenderError("template_error", "prompt", f"the chat template failed: {e}", TEMPLATE_HINT) from e


def render_completion(
    prompt: Text, completion: Text, tokenizer: PreTrainedTokenizerBase, prompt_text: str, field: str = "completion"
) -> str:
    """The completion as text. Strings are unchanged; for messages it is render(prompt + completion) minus
    `prompt_text` (= `render_prompt(prompt)`), which must be its prefix."""
    if isinstance(completion, str):
        return completion
    try:
        full = _chat_template(tokenizer, [*prompt, *completion])
    except TemplateError as e:
        raise _RenderError("template_error", field, f"the chat template failed: {e}", TEMPLATE_HINT) from e
    if not full.startswith(prompt_text):
        raise _RenderError(
            "template_mismatch",
            field,
            f"the chat template's prompt rendering {prompt_text[-60:]!r} (end shown) is not a prefix of the whole "
            f"conversation's rendering {full[: len(prompt_text)][-60:]!r}",
            TEMPLATE_HINT,
        )
    return full[len(prompt_text) :]


def render_completion_segments(
    prompt: Text, completion: Text, tokenizer: PreTrainedTokenizerBase, prompt_text: str, field: str = "completion"
) -> list[tuple[str, bool]]:
    """The completion as (text, trained) segments whose texts concatenate to `render_completion`'s text.

    A string, or a single message, is one trained segment. A list of several messages (a multi-turn SFT completion)
    is rendered turn by turn through the chat template: each assistant message's text (its content and the template's
    end of turn) is trained, everything else (user / system / tool turns and the assistant header that
    `add_generation_prompt` writes) is not. Each partial rendering must be a prefix of the next (a template mismatch
    otherwise)."""
    if isinstance(completion, str) or len(completion) <= 1:
        return [(render_completion(prompt, completion, tokenizer, prompt_text, field), True)]
    conversation = [*prompt, *completion]
    segments: list[tuple[str, bool]] = []
    done = prompt_text

    def advance(text: str, trained: bool) -> None:
        nonlocal done
        if not text.startswith(done):
            raise _RenderError(
                "template_mismatch",
                field,
                f"the chat template's rendering of the first turns {done[-60:]!r} (end shown) is not a prefix of the "
                f"rendering with the next turn {text[: len(done)][-60:]!r}",
                TEMPLATE_HINT,
            )
        if len(text) > len(done):
            segments.append((text[len(done) :], trained))
        done = text

    try:
        for k in range(len(prompt), len(conversation)):
            if conversation[k]["role"] == "assistant":
                advance(_chat_template(tokenizer, conversation[:k], add_generation_prompt=True), False)
                advance(_chat_template(tokenizer, conversation[: k + 1]), True)
            else:
                advance(_chat_template(tokenizer, conversation[: k + 1]), False)
    except TemplateError as e:
        raise _RenderError("template_error", field, f"the chat template failed: {e}", TEMPLATE_HINT) from e
    return segments


def _split_segments_at_eos(segments: list[tuple[str, bool]], eos_token: str) -> list[tuple[str, bool]]:
    """Whitespace after a trained segment's final EOS (a template's turn separator) is not trained; after the LAST
    segment it is dropped, so the sequence ends with EOS."""
    out: list[tuple[str, bool]] = []
    for j, (text, trained) in enumerate(segments):
        stripped = text.rstrip()
        if trained and stripped.endswith(eos_token) and stripped != text:
            out.append((stripped, True))
            if j < len(segments) - 1:
                out.append((text[len(stripped) :], False))
        else:
            out.append((text, trained))
    return out


def truncate_prompt(
    prompt_ids: list[int],
    response_len: int,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    keep_first: int = 0,
) -> list[int] | None:
    """Cut `prompt_ids` from the left (keeping its end and its first `keep_first` tokens, e.g. BOS) so that
    len(prompt) <= max_prompt_length and len(prompt) + response_len <= max_length. Returns the (maybe) shorter
    prompt, or None when the response does not fit even with the prompt cut to its first `keep_first` tokens."""
    budget = len(prompt_ids)
    if max_prompt_length is not None:
        budget = min(budget, max_prompt_length)
    if max_length is not None:
        budget = min(budget, max_length - response_len)
    keep_first = min(keep_first, len(prompt_ids))
    if budget < keep_first:
        return None
    if budget == len(prompt_ids):
        return prompt_ids
    tail = budget - keep_first
    return prompt_ids[:keep_first] + prompt_ids[len(prompt_ids) - tail :]


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name} must be a positive integer or None, got {value!r}")


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added by the tokenizer (one batched call)."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _encode_rows(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    responses_of: Callable[[dict[str, Any]], list[tuple[str, Text]]],
    build: Callable[[dict[str, Any], list[int], list[list[int]]], dict[str, Any]],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    on_bad_row: str,
    rejected_path: str | os.PathLike | None,
    what: str,
    truncate_responses: bool = False,
) -> list[dict[str, Any]]:
    """Render, encode, truncate and `build` each row; `responses_of(row)` lists the (field, value) of its responses.

    `build(row, prompt_ids, responses_ids, responses_masks)` gets, per response, its ids and a 0/1 mask of the
    trained tokens (all 1 but for the non-assistant turns of a multi-turn SFT completion)."""
    check_on_bad_row(on_bad_row)
    _check_lengths(max_length, max_prompt_length)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None and what != "prompt":
        raise UserError("the tokenizer has no EOS token; set tokenizer.eos_token so that responses can end")
    origins = [row.get("_origin", f"<rows>:row {i}") for i, row in enumerate(rows)]
    handler = BadRowHandler(origin_file(origins[0]) if rows else "rows", on_bad_row, rejected_path)

    # 1. render every row to text (a bad template rendering is a bad row)
    rendered: list[tuple[int, str, list[tuple[str, list[tuple[str, bool]]]]]] = []
    for i, row in enumerate(rows):
        try:
            prompt_text = render_prompt(row["prompt"], tokenizer)
            responses = [
                (field, render_completion_segments(row["prompt"], value, tokenizer, prompt_text, field))
                for field, value in responses_of(row)
            ]
        except _RenderError as e:
            err = DataError(e.detail, origin=origins[i], field=e.field, reason=e.reason, hint=e.hint)
            handler.reject(err, row=row)
            continue
        rendered.append((i, prompt_text, [(f, _split_segments_at_eos(s, tokenizer.eos_token)) for f, s in responses]))

    # 2. encode prompts and response segments separately, in two batched calls
    prompt_ids_all = _encode_texts(tokenizer, [p for _, p, _ in rendered])
    flat_ids = iter(_encode_texts(tokenizer, [t for _, _, rs in rendered for _, segs in rs for t, _ in segs]))

    # 3. add BOS / EOS, truncate the prompt from the left, build the output row
    out: list[dict[str, Any]] = []
    num_cut = num_responses_cut = 0
    for (i, _, responses), prompt_ids in zip(rendered, prompt_ids_all):
        if bos is not None and (not prompt_ids or prompt_ids[0] != bos):
            prompt_ids = [bos, *prompt_ids]
        responses_ids, responses_masks = [], []
        for _, segments in responses:
            ids: list[int] = []
            mask: list[int] = []
            for _, trained in segments:
                seg_ids = next(flat_ids)
                ids += seg_ids
                mask += [int(trained)] * len(seg_ids)
            if not (ids and ids[-1] == eos):
                ids, mask = [*ids, eos], [*mask, 1]
            responses_ids.append(ids)
            responses_masks.append(mask)
        longest = max(range(len(responses_ids)), key=lambda j: len(responses_ids[j]), default=None)
        response_len = 0 if longest is None else len(responses_ids[longest])
        keep_first = 1 if bos is not None and prompt_ids[:1] == [bos] else 0
        response_cut = 0
        if truncate_responses and max_length is not None:
            # TRL's rule: the prompt keeps up to max_prompt_length tokens (its end), the responses get the rest
            # (their start; a cut response has no EOS).
            cut = truncate_prompt(prompt_ids, 0, max_prompt_length=max_prompt_length, keep_first=keep_first)
            room = max_length - len(cut)
            if response_len > room >= 1:
                response_cut = response_len - room
                responses_ids = [r[:room] for r in responses_ids]
                responses_masks = [m[:room] for m in responses_masks]
            elif response_len > room:
                cut = None
        else:
            cut = truncate_prompt(
                prompt_ids,
                response_len,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                keep_first=keep_first,
            )
        if cut is None:
            err = DataError(
                f"over-long row: the response is {response_len} tokens, and max_length={max_length} leaves no room "
                f"for it even with the prompt cut to {keep_first} token(s); responses are never truncated",
                origin=origins[i],
                field=responses[longest][0],
                reason="too_long",
                hint=TOO_LONG_HINT,
            )
            handler.reject(err, row=rows[i])
            continue
        encoded = build(rows[i], cut, responses_ids, responses_masks)
        encoded["_origin"] = origins[i]
        encoded["_prompt_tokens_cut"] = len(prompt_ids) - len(cut)
        if truncate_responses:
            encoded["_response_tokens_cut"] = response_cut
        num_cut += encoded["_prompt_tokens_cut"] > 0
        num_responses_cut += response_cut > 0
        out.append(encoded)

    handler.log_summary(len(rows), what=f"{what} rows at tokenization")
    if num_cut:
        logger.info(
            "truncated the prompt (kept its end) of %d of %d %s rows to fit max_length=%s, max_prompt_length=%s",
            num_cut,
            len(out),
            what,
            max_length,
            max_prompt_length,
        )
    if num_responses_cut:
        logger.warning(
            "truncated the responses (kept their start, no EOS) of %d of %d %s rows to fit max_length=%s after the "
            "prompt (truncate_responses=True); raise max_length to keep them whole",
            num_responses_cut,
            len(out),
            what,
            max_length,
        )
    return out


def _passthrough(row: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: row[k] for k in keys if k in row}


def encode_sft(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_bad_row: str = "error",
    rejected_path: str | os.PathLike | None = None,
    truncate_responses: bool = False,
) -> list[dict[str, Any]]:
    """SFT rows (from `load_sft`) -> {"input_ids": prompt + completion ids, "completion_mask": 0 on the prompt,
    1 on the completion (EOS included), "_origin", "_prompt_tokens_cut"}.

    A multi-turn completion (several messages, from `load_sft(..., assistant_turns="all")`) has 1 on the tokens of
    each assistant message (its content and the template's end of turn, EOS included) and 0 on the other turns and on
    the assistant headers (`render_completion_segments`). `truncate_responses`: see the module docstring."""

    def build(row: dict[str, Any], prompt_ids: list[int], responses_ids: list[list[int]], masks) -> dict[str, Any]:
        (completion_ids,), (completion_mask,) = responses_ids, masks
        return {
            "input_ids": prompt_ids + completion_ids,
            "completion_mask": [0] * len(prompt_ids) + completion_mask,
        }

    return _encode_rows(
        rows,
        tokenizer,
        lambda row: [("completion", row["completion"])],
        build,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        on_bad_row=on_bad_row,
        rejected_path=rejected_path,
        what="SFT",
        truncate_responses=truncate_responses,
    )


def encode_preferences(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_bad_row: str = "error",
    rejected_path: str | os.PathLike | None = None,
    truncate_responses: bool = False,
) -> list[dict[str, Any]]:
    """Preference rows (from `load_preferences`) -> {"prompt_ids", "chosen_ids", "rejected_ids"} + `margin`,
    `label_prob`, `prompt_type`, `openness` where present, "_origin", "_prompt_tokens_cut". `max_length` bounds
    prompt + the longer of the two responses."""

    def build(row: dict[str, Any], prompt_ids: list[int], responses_ids: list[list[int]], masks) -> dict[str, Any]:
        chosen_ids, rejected_ids = responses_ids
        return {
            "prompt_ids": prompt_ids,
            "chosen_ids": chosen_ids,
            "rejected_ids": rejected_ids,
            **_passthrough(row, ("margin", "label_prob", "prompt_type", "openness")),
        }

    return _encode_rows(
        rows,
        tokenizer,
        lambda row: [("chosen", row["chosen"]), ("rejected", row["rejected"])],
        build,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        on_bad_row=on_bad_row,
        rejected_path=rejected_path,
        what="preference",
        truncate_responses=truncate_responses,
    )


def encode_rankings(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    on_bad_row: str = "error",
    rejected_path: str | os.PathLike | None = None,
    truncate_responses: bool = False,
) -> list[dict[str, Any]]:
    """Ranking rows (from `load_rankings`) -> {"prompt_ids", "responses_ids": one list per response, best first}
    + `scores`, `prompt_type`, `openness` where present, "_origin", "_prompt_tokens_cut". `max_length` bounds
    prompt + the longest response."""

    def build(row: dict[str, Any], prompt_ids: list[int], responses_ids: list[list[int]], masks) -> dict[str, Any]:
        return {
            "prompt_ids": prompt_ids,
            "responses_ids": responses_ids,
            **_passthrough(row, ("scores", "prompt_type", "openness")),
        }

    return _encode_rows(
        rows,
        tokenizer,
        lambda row: [(f"responses[{j}]", r) for j, r in enumerate(row["responses"])],
        build,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        on_bad_row=on_bad_row,
        rejected_path=rejected_path,
        what="ranking",
        truncate_responses=truncate_responses,
    )


def encode_prompts(
    rows: Sequence[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_prompt_length: int | None = None,
    on_bad_row: str = "error",
    rejected_path: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """RL prompt rows (from `load_prompts`) -> the row unchanged (prompt text and metadata) + "prompt_ids" (the
    rendered prompt, chat rows with the generation prompt) and "_prompt_tokens_cut"; a prompt longer than
    `max_prompt_length` keeps its end."""

    def build(row: dict[str, Any], prompt_ids: list[int], responses_ids: list[list[int]], masks) -> dict[str, Any]:
        return {**row, "prompt_ids": prompt_ids}

    return _encode_rows(
        rows,
        tokenizer,
        lambda row: [],
        build,
        max_length=None,
        max_prompt_length=max_prompt_length,
        on_bad_row=on_bad_row,
        rejected_path=rejected_path,
        what="prompt",
    )


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: Literal["right", "left"] = "right") -> tuple[Tensor, Tensor]:
    """B id lists -> (ids (B, T) int64 padded with `pad_id`, attention_mask (B, T) int64, 1 on real tokens), with
    T the longest length. side="left" puts the padding first (for generation), "right" last (for training)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    longest = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)  # (B, T)
    for b, seq in enumerate(seqs):
        if not seq:
            continue
        cols = slice(0, len(seq)) if side == "right" else slice(longest - len(seq), longest)
        ids[b, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[b, cols] = 1
    return ids, mask
