"""Load and validate rlxf data files: SFT, preference pairs, rankings and RL prompts.

Formats (chosen by the path):
  - JSON Lines: `*.jsonl`, or gzip-compressed `*.jsonl.gz`; one JSON object per line, blank lines ignored.
  - Parquet: `*.parquet`.
  - A `datasets` directory written by `Dataset.save_to_disk` (for a `DatasetDict`, pass `<dir>/<split>`).

Every loader returns a list of plain dicts holding the normalised columns of its kind (see design.md, "Data
formats"), any extra columns unchanged, and `"_origin"`: `"<path>:<line>"` for JSON Lines (1-based line) or
`"<path>:row <i>"` for Parquet and `datasets` directories (0-based row index), so later stages (tokenization,
truncation) can still name the file and row of a problem.

Text values are strings ("standard") or lists of `{"role", "content"}` chat messages ("conversational"); all text
fields of a row use the same form.

Bad rows. With `on_bad_row="error"` (the default) the first bad row raises `DataError`, whose message names file,
line (or row), field and reason and says what to do. With `on_bad_row="skip"` bad rows are skipped, a count per
reason is logged (logger `rlxf.data`, WARNING) and each skipped row is appended as one JSON object
(`origin`, `reason`, `field`, `message`, and `raw_line` for JSON Lines or `row` otherwise) to the side file
`rejected_path`. Its default is `./<stem>.rejected.jsonl` in the *current working directory* (never next to the
input, which may be read-only), where `<stem>` is the input's file name without `.jsonl`, `.jsonl.gz` or `.parquet`.
The side file is opened in append mode and only created when a row is rejected; `rejected_path` is ignored in
"error" mode. A file left with no valid row is an error in both modes.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from rlxf.errors import UserError

logger = logging.getLogger(__name__)

OnBadRow = Literal["error", "skip"]
ON_BAD_ROW_CHOICES: tuple[str, ...] = ("error", "skip")
PROMPT_TYPES: tuple[str, ...] = ("open", "closed")

# Anthropic HH-RLHF writes a dialogue as "\n\nHuman: ...\n\nAssistant: ..." (Bai et al. 2022, arXiv:2204.05862).
HH_ASSISTANT_MARKER = "\n\nAssistant:"

SKIP_HINT = "Fix the row, or pass on_bad_row='skip' (CLI: --on-bad-row skip) to skip bad rows into a side file."

_ROW_ORIGIN = re.compile(r"^(?P<file>.*):row (?P<row>\d+)$")
_LINE_ORIGIN = re.compile(r"^(?P<file>.*):(?P<line>\d+)$")


def describe_origin(origin: str) -> str:
    """Human form of an `_origin`: "a.jsonl:5" -> "a.jsonl, line 5"; "a.parquet:row 3" -> "a.parquet, row 3 (0-based
    row index)"; anything else (a bare path) is returned unchanged."""
    if m := _ROW_ORIGIN.match(origin):
        return f"{m['file']}, row {m['row']} (0-based row index)"
    if m := _LINE_ORIGIN.match(origin):
        return f"{m['file']}, line {m['line']}"
    return origin


def origin_file(origin: str) -> str:
    """The file part of an `_origin` ("a.jsonl:5" -> "a.jsonl")."""
    m = _ROW_ORIGIN.match(origin) or _LINE_ORIGIN.match(origin)
    return m["file"] if m else origin


class DataError(UserError):
    """A data file or row rlxf cannot use. The message names file, line/row, field and reason, and what to do.

    Attributes: `origin` ("<path>:<line>", "<path>:row <i>", a bare path for file-level problems, or None),
    `field` (the column at fault, or None for the whole row), `reason` (a short key such as "missing_field",
    used to count skipped rows) and `detail` (the reason in words).
    """

    def __init__(
        self,
        detail: str,
        *,
        origin: str | None = None,
        field: str | None = None,
        reason: str = "invalid",
        hint: str = SKIP_HINT,
    ) -> None:
        self.detail, self.origin, self.field, self.reason = detail, origin, field, reason
        where = [describe_origin(origin)] if origin else []
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {detail}. {hint}" if prefix else f"{detail}. {hint}")


class _BadRow(Exception):
    """Raised by the row validators; the loader turns it into a DataError carrying the row's origin."""

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.field, self.detail = reason, field, detail


def check_on_bad_row(on_bad_row: str) -> None:
    """Raise ValueError unless `on_bad_row` is "error" or "skip"."""
    if on_bad_row not in ON_BAD_ROW_CHOICES:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW_CHOICES}, got {on_bad_row!r}")


def default_rejected_path(source: str | os.PathLike) -> Path:
    """`./<stem>.rejected.jsonl` in the current directory, for the input `source` (a file or datasets directory)."""
    name = Path(source).name
    for suffix in (".jsonl.gz", ".jsonl", ".parquet"):
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
            break
    return Path.cwd() / f"{name or 'data'}.rejected.jsonl"


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by their repr, recursively, so a rejected row can be written."""
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


class BadRowHandler:
    """Applies the `on_bad_row` policy: raise the DataError, or count it and append the row to the side file.

    Shared by the loaders here and the encoders in `rlxf.data.tokenize`. `source` names the input (for the default
    side-file name and the summary line).
    """

    def __init__(self, source: str | os.PathLike, on_bad_row: str, rejected_path: str | os.PathLike | None) -> None:
        check_on_bad_row(on_bad_row)
        self.source = str(source)
        self.on_bad_row = on_bad_row
        self.rejected_path = Path(rejected_path) if rejected_path is not None else default_rejected_path(source)
        self.counts: Counter[str] = Counter()

    def reject(self, error: DataError, *, raw_line: str | None = None, row: Any = None) -> None:
        """Raise `error` in "error" mode; in "skip" mode count it and append one JSON record to the side file."""
        if self.on_bad_row == "error":
            raise error
        self.counts[error.reason] += 1
        record: dict[str, Any] = {
            "origin": error.origin,
            "reason": error.reason,
            "field": error.field,
            "message": error.detail,
        }
        if raw_line is not None:
            record["raw_line"] = raw_line
        else:
            record["row"] = _json_safe(row)
        self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.rejected_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    @property
    def num_rejected(self) -> int:
        return sum(self.counts.values())

    def log_summary(self, total: int, what: str = "rows") -> None:
        """Log (WARNING) how many of `total` rows were skipped, by reason, and where they were written."""
        if self.num_rejected:
            by_reason = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.counts.items()))
            logger.warning(
                "%s: skipped %d of %d %s (%s); appended them to %s (pass rejected_path= to choose the file)",
                self.source,
                self.num_rejected,
                total,
                what,
                by_reason,
                self.rejected_path,
            )


# ---------------------------------------------------------------------------------------------------------------
# Reading raw rows: (origin, raw dict or None, raw line or None, DataError or None)
# ---------------------------------------------------------------------------------------------------------------

_Raw = tuple[str, "dict[str, Any] | None", "str | None", "DataError | None"]


def _iter_jsonl(path: Path) -> Iterator[_Raw]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as f:
        try:
            yield from _parse_jsonl_lines(path, f)
        except (OSError, EOFError) as e:  # e.g. a truncated or non-gzip .gz file
            raise DataError(
                f"cannot read the file ({e})",
                origin=str(path),
                reason="bad_file",
                hint="Check that it is a complete (gzip) JSON Lines file.",
            ) from e


def _parse_jsonl_lines(path: Path, f: Any) -> Iterator[_Raw]:
    """One item per non-blank line of an open binary file; 1-based line numbers."""
    for lineno, data in enumerate(f, 1):
        origin = f"{path}:{lineno}"
        if lineno == 1 and data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark
            data = data[3:]
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as e:
            err = DataError(f"line is not valid UTF-8 ({e})", origin=origin, reason="invalid_utf8")
            yield origin, None, data.decode("utf-8", errors="replace").rstrip("\r\n"), err
            continue
        if not line.strip():
            continue
        line = line.rstrip("\r\n")
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield origin, None, line, DataError(f"invalid JSON ({e})", origin=origin, reason="invalid_json")
            continue
        if not isinstance(obj, dict):
            err = DataError(
                f"expected a JSON object per line, got {type(obj).__name__}", origin=origin, reason="not_an_object"
            )
            yield origin, None, line, err
            continue
        yield origin, obj, line, None


def _iter_arrow_batches(batches: Iterator[Any], path: Path) -> Iterator[_Raw]:
    index = 0
    for batch in batches:
        for obj in batch.to_pylist():
            yield f"{path}:row {index}", obj, None, None
            index += 1


def _iter_parquet(path: Path) -> Iterator[_Raw]:
    import pyarrow.parquet as pq

    yield from _iter_arrow_batches(pq.ParquetFile(path).iter_batches(batch_size=1024), path)


def _iter_datasets_dir(path: Path) -> Iterator[_Raw]:
    import datasets

    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise DataError(
            f"this is a DatasetDict with splits {splits}, not a single dataset",
            origin=str(path),
            reason="bad_file",
            hint=f"Pass one split's directory, e.g. {path / (splits[0] if splits else 'train')}.",
        )
    ds = datasets.load_from_disk(str(path))
    yield from _iter_arrow_batches(ds.with_format("arrow").iter(batch_size=1024), path)


def _iter_raw(path: Path) -> Iterator[_Raw]:
    if not path.exists():
        raise DataError("no such file or directory", origin=str(path), reason="bad_file", hint="Check the path.")
    name = path.name
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return _iter_datasets_dir(path)
        hint = "Pass a directory written by datasets' save_to_disk, or a .jsonl / .jsonl.gz / .parquet file."
        raise DataError(
            "directory is not a `datasets` save_to_disk directory (no state.json)",
            origin=str(path),
            reason="bad_file",
            hint=hint,
        )
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return _iter_jsonl(path)
    if name.endswith(".parquet"):
        return _iter_parquet(path)
    raise DataError(
        "unsupported file type",
        origin=str(path),
        reason="bad_file",
        hint="rlxf reads .jsonl, .jsonl.gz, .parquet and datasets save_to_disk directories; convert the file.",
    )


# ---------------------------------------------------------------------------------------------------------------
# Field validators. Each raises _BadRow(reason, field, detail).
# ---------------------------------------------------------------------------------------------------------------


def _required(row: dict[str, Any], field: str) -> Any:
    if field not in row:
        raise _BadRow("missing_field", field, "missing required field")
    if row[field] is None:
        raise _BadRow("missing_field", field, "required field is null")
    return row[field]


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _messages(value: list[Any], field: str) -> list[dict[str, Any]]:
    """Check a list of chat messages: non-empty, each a dict with a non-empty string `role` and a string `content`."""
    if not value:
        raise _BadRow("malformed_messages", field, "empty list of messages")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise _BadRow(
                "malformed_messages", field, f"message {i} is a {_type_name(msg)}, expected a {{role, content}} object"
            )
        for key in ("role", "content"):
            if key not in msg or msg[key] is None:
                raise _BadRow("malformed_messages", field, f"message {i} has no {key!r}")
            if not isinstance(msg[key], str):
                raise _BadRow(
                    "malformed_messages", field, f"message {i} {key!r} is a {_type_name(msg[key])}, expected a string"
                )
        if not msg["role"].strip():
            raise _BadRow("malformed_messages", field, f"message {i} has an empty 'role'")
    return value


EMPTY_HINT = (
    "an empty reply can be a real signal (in HH-RLHF harmless-base it is a refusal): pass "
    "allow_empty_responses=True (CLI: --allow_empty_responses true) to keep it"
)


def _text(value: Any, field: str, *, response: bool, allow_empty: bool = False) -> str | list[dict[str, Any]]:
    """A string or a message list; a response must hold some non-whitespace text unless `allow_empty`."""
    if isinstance(value, str):
        if response and not allow_empty and not value.strip():
            raise _BadRow("empty_response", field, f"empty response (only whitespace); {EMPTY_HINT}")
        return value
    if isinstance(value, list):
        msgs = _messages(value, field)
        if response and not allow_empty and not "".join(m["content"] for m in msgs).strip():
            raise _BadRow("empty_response", field, f"empty response (its messages hold only whitespace); {EMPTY_HINT}")
        return msgs
    raise _BadRow(
        "wrong_type", field, f"expected a string or a list of {{role, content}} messages, got {_type_name(value)}"
    )


def _same_form(values: dict[str, Any]) -> None:
    """All text fields of a row must be strings, or all message lists."""
    first_field, first = next(iter(values.items()))
    for field, value in values.items():
        if isinstance(value, str) != isinstance(first, str):
            form = "a string" if isinstance(first, str) else "a message list"
            raise _BadRow(
                "mixed_formats",
                field,
                f"{first_field!r} is {form}, so this field must be one too (standard and "
                "conversational values cannot be mixed in one row)",
            )


def _finite(value: Any, field: str, lo: float | None = None, hi: float | None = None) -> float:
    """A finite number (bools are not numbers), within [lo, hi] when given, as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _BadRow("wrong_type", field, f"expected a number, got {_type_name(value)} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise _BadRow("non_finite", field, f"non-finite number {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _BadRow("out_of_range", field, f"{value!r} is outside [{lo}, {hi}]")
    return value


def _number(row: dict[str, Any], field: str, lo: float | None = None, hi: float | None = None) -> float | None:
    """An optional finite number: None when absent or null, else `_finite`."""
    value = row.get(field)
    return None if value is None else _finite(value, field, lo, hi)


def _prompt_meta(row: dict[str, Any], out: dict[str, Any]) -> None:
    """Validate the optional `prompt_type` (open/closed) and `openness` in [0, 1] into `out`."""
    prompt_type = row.get("prompt_type")
    if prompt_type is not None:
        if prompt_type not in PROMPT_TYPES:
            raise _BadRow("bad_prompt_type", "prompt_type", f"must be one of {PROMPT_TYPES}, got {prompt_type!r}")
        out["prompt_type"] = prompt_type
    openness = _number(row, "openness", 0.0, 1.0)
    if openness is not None:
        out["openness"] = openness


def _extras(row: dict[str, Any], out: dict[str, Any], skip: tuple[str, ...]) -> dict[str, Any]:
    """Copy the columns not handled by the validator (metadata) unchanged, after the normalised ones."""
    for key, value in row.items():
        if key not in out and key not in skip:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------------------
# Row normalisers, one per kind.
# ---------------------------------------------------------------------------------------------------------------


def _prompt_end(chosen: str) -> int:
    """Where the implicit prompt of an HH-RLHF `chosen` dialogue ends: just after its last "\n\nAssistant:"."""
    cut = chosen.rfind(HH_ASSISTANT_MARKER)
    if cut < 0:
        raise _BadRow(
            "missing_field",
            "prompt",
            f"missing 'prompt', and 'chosen' holds no {HH_ASSISTANT_MARKER!r} turn to split an implicit prompt "
            "from (HH-RLHF format)",
        )
    return cut + len(HH_ASSISTANT_MARKER)


def split_implicit_prompt(chosen: Any, rejected: Any) -> tuple[Any, Any, Any]:
    """Split an implicit-prompt pair (whole dialogues in `chosen` / `rejected`) into (prompt, chosen, rejected).

    Strings (Anthropic HH-RLHF, Bai et al. 2022): the prompt is `chosen` up to and including its last
    "\\n\\nAssistant:"; `rejected` must start with the same prompt (its own last marker at the same place), and each
    response is the rest of its string, unchanged (it usually starts with a space). Message lists: the prompt is
    every message but the last, which must be equal in both; each response is its final message, from the assistant.
    Raises _BadRow (no marker, dialogues that differ before the last turn, mixed forms).
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        cut = _prompt_end(chosen)
        cut_r = rejected.rfind(HH_ASSISTANT_MARKER) + len(HH_ASSISTANT_MARKER)
        if cut_r != cut or rejected[:cut] != chosen[:cut]:
            raise _BadRow(
                "prompt_mismatch",
                "rejected",
                f"no 'prompt' field, and 'chosen' and 'rejected' differ before their last {HH_ASSISTANT_MARKER!r} "
                "turn, so they share no prompt (implicit-prompt pair)",
            )
        return chosen[:cut], chosen[cut:], rejected[cut:]
    if isinstance(chosen, list) and isinstance(rejected, list):
        for field, msgs in (("chosen", chosen), ("rejected", rejected)):
            if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
                raise _BadRow(
                    "malformed_messages",
                    field,
                    "no 'prompt' field, so this must be a whole conversation (at least 2 messages) ending in an "
                    "assistant message (implicit-prompt pair)",
                )
        if chosen[:-1] != rejected[:-1]:
            raise _BadRow(
                "prompt_mismatch",
                "rejected",
                "no 'prompt' field, and 'chosen' and 'rejected' differ before their last message, so they share no "
                "prompt (implicit-prompt pair)",
            )
        return chosen[:-1], chosen[-1:], rejected[-1:]
    raise _BadRow("mixed_formats", "rejected", "'chosen' and 'rejected' must both be strings or both message lists")


def normalize_preference(row: dict[str, Any], allow_empty_responses: bool = False) -> dict[str, Any]:
    """Validate one preference row -> {prompt, chosen, rejected, [margin, label_prob, prompt_type, openness], ...}.

    `allow_empty_responses` keeps a response that is empty or only whitespace (it is encoded as EOS alone)."""
    chosen = _text(_required(row, "chosen"), "chosen", response=False)
    rejected = _text(_required(row, "rejected"), "rejected", response=False)
    if row.get("prompt") is None:
        prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    else:
        prompt = _text(row["prompt"], "prompt", response=False)
    _same_form({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    _text(chosen, "chosen", response=True, allow_empty=allow_empty_responses)
    _text(rejected, "rejected", response=True, allow_empty=allow_empty_responses)
    if chosen == rejected:
        raise _BadRow("identical_responses", "rejected", "'chosen' and 'rejected' are identical")
    out: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    margin = _number(row, "margin")
    if margin is not None:
        out["margin"] = margin
    label_prob = _number(row, "label_prob", 0.0, 1.0)
    if label_prob is not None:
        out["label_prob"] = label_prob
    _prompt_meta(row, out)
    return _extras(row, out, skip=("margin", "label_prob", "prompt_type", "openness"))


ASSISTANT_TURNS: tuple[str, ...] = ("all", "last")


def normalize_sft(
    row: dict[str, Any], assistant_turns: str = "last", allow_empty_responses: bool = False
) -> dict[str, Any]:
    """Validate one SFT row -> {prompt, completion, ...}.

    A `messages` row (used when `completion` is absent) must end with an assistant message. With
    `assistant_turns="last"` it becomes prompt = all messages but the last, completion = [last message]: earlier
    assistant turns are context, not trained on. With "all" it becomes prompt = the messages before the first
    assistant message (at least one), completion = the rest: the encoder (`encode_sft`) then trains on every assistant
    message of the completion and on none of the others (user, system, tool turns are masked out).
    """
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {assistant_turns!r}")
    if row.get("completion") is None and row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise _BadRow("wrong_type", "messages", f"expected a list of messages, got {_type_name(messages)}")
        _messages(messages, "messages")
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            raise _BadRow(
                "malformed_messages", "messages", "needs at least 2 messages, the last one from the assistant"
            )
        cut = len(messages) - 1
        if assistant_turns == "all":
            cut = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
            if cut == 0:
                raise _BadRow(
                    "malformed_messages",
                    "messages",
                    "the first message is from the assistant, so there is no prompt before the first assistant turn "
                    "(assistant_turns='all'); start with a user or system message, or use assistant_turns='last'",
                )
        prompt, completion = messages[:cut], messages[cut:]
        for i, m in enumerate(completion):
            if m["role"] == "assistant":
                _text([m], "messages", response=True, allow_empty=allow_empty_responses)
        return _extras(row, {"prompt": prompt, "completion": completion}, skip=("messages",))
    if row.get("completion") is None and row.get("chosen") is not None:
        raise _BadRow(
            "missing_field",
            "completion",
            "missing required field (the row has 'chosen': for a preference file set from_preferences=True, "
            "CLI: --from_preferences true, to train on prompt + chosen)",
        )
    prompt = _text(_required(row, "prompt"), "prompt", response=False)
    completion = _text(_required(row, "completion"), "completion", response=True, allow_empty=allow_empty_responses)
    _same_form({"prompt": prompt, "completion": completion})
    return _extras(row, {"prompt": prompt, "completion": completion}, skip=())


def normalize_sft_from_preference(row: dict[str, Any], allow_empty_responses: bool = False) -> dict[str, Any]:
    """One preference row -> the SFT row {prompt, completion = chosen, ...}; `rejected` is not read (dropped).

    With `prompt` the row is used as it is. Without it (implicit prompt, HH-RLHF) only `chosen` is split: a string at
    its last "\n\nAssistant:" (prompt up to and including it), a message list before its last message (from the
    assistant). So a pair whose dialogues differ before the last turn, useless as a pair, still gives an SFT row.
    """
    chosen = _text(_required(row, "chosen"), "chosen", response=False)
    if row.get("prompt") is not None:
        prompt = _text(row["prompt"], "prompt", response=False)
    elif isinstance(chosen, str):
        cut = _prompt_end(chosen)
        prompt, chosen = chosen[:cut], chosen[cut:]
    else:
        if len(chosen) < 2 or chosen[-1]["role"] != "assistant":
            raise _BadRow(
                "malformed_messages",
                "chosen",
                "no 'prompt' field, so this must be a whole conversation (at least 2 messages) ending in an "
                "assistant message (implicit-prompt pair)",
            )
        prompt, chosen = chosen[:-1], chosen[-1:]
    _same_form({"prompt": prompt, "chosen": chosen})
    _text(chosen, "chosen", response=True, allow_empty=allow_empty_responses)
    out: dict[str, Any] = {"prompt": prompt, "completion": chosen}
    return _extras(row, out, skip=("chosen", "rejected"))


def normalize_ranking(row: dict[str, Any]) -> dict[str, Any]:
    """Validate one ranking row -> {prompt, responses (best -> worst), [scores (descending), prompt_type, openness]}.

    With `scores` the responses are sorted by score, highest first (a stable sort: ties keep their order).
    """
    prompt = _text(_required(row, "prompt"), "prompt", response=False)
    responses = _required(row, "responses")
    if not isinstance(responses, list):
        raise _BadRow("wrong_type", "responses", f"expected a list of responses, got {_type_name(responses)}")
    if len(responses) < 2:
        raise _BadRow("too_few_responses", "responses", f"a ranking needs at least 2 responses, got {len(responses)}")
    responses = [_text(r, f"responses[{i}]", response=True) for i, r in enumerate(responses)]
    _same_form({"prompt": prompt, **{f"responses[{i}]": r for i, r in enumerate(responses)}})
    out: dict[str, Any] = {"prompt": prompt, "responses": responses}
    scores = row.get("scores")
    if scores is not None:
        if not isinstance(scores, list):
            raise _BadRow("wrong_type", "scores", f"expected a list of numbers, got {_type_name(scores)}")
        if len(scores) != len(responses):
            detail = f"{len(scores)} scores for {len(responses)} responses; give one score per response"
            raise _BadRow("length_mismatch", "scores", detail)
        values = [_finite(s, f"scores[{i}]") for i, s in enumerate(scores)]
        order = sorted(range(len(values)), key=lambda i: -values[i])  # stable: ties keep input order
        out["responses"] = [responses[i] for i in order]
        out["scores"] = [values[i] for i in order]
    _prompt_meta(row, out)
    return _extras(row, out, skip=("prompt_type", "openness"))


def normalize_prompt(row: dict[str, Any]) -> dict[str, Any]:
    """Validate one RL prompt row -> {prompt, ...metadata unchanged}; `prompt_type` / `openness` are checked."""
    prompt = _text(_required(row, "prompt"), "prompt", response=False)
    out: dict[str, Any] = {"prompt": prompt}
    _prompt_meta(row, {})  # validate only; metadata is kept as is
    return _extras(row, out, skip=())


# ---------------------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------------------


def _load(
    path: str | os.PathLike,
    normalize: Callable[[dict[str, Any]], dict[str, Any]],
    kind: str,
    on_bad_row: str,
    rejected_path: str | os.PathLike | None,
) -> list[dict[str, Any]]:
    check_on_bad_row(on_bad_row)
    path = Path(path)
    handler = BadRowHandler(path, on_bad_row, rejected_path)
    rows: list[dict[str, Any]] = []
    total = 0
    for origin, raw, raw_line, error in _iter_raw(path):
        total += 1
        if error is None:
            try:
                row = normalize(raw)
            except _BadRow as bad:
                error = DataError(bad.detail, origin=origin, field=bad.field, reason=bad.reason)
            else:
                row["_origin"] = origin
                rows.append(row)
                continue
        handler.reject(error, raw_line=raw_line, row=raw)
    handler.log_summary(total)
    if not rows:
        detail = f"no valid {kind} rows" if total else f"no {kind} rows (the file is empty)"
        hint = (
            f"All {total} rows were rejected ({dict(handler.counts)}); see {handler.rejected_path}."
            if total
            else "Check the path."
        )
        raise DataError(detail, origin=str(path), reason="no_rows", hint=hint)
    logger.info("%s: loaded %d %s rows", path, len(rows), kind)
    return rows


def load_preferences(
    path: str | os.PathLike,
    on_bad_row: OnBadRow = "error",
    rejected_path: str | os.PathLike | None = None,
    *,
    allow_empty_responses: bool = False,
) -> list[dict[str, Any]]:
    """Load preference pairs: `prompt`, `chosen`, `rejected` + optional `margin`, `label_prob` (in [0, 1]),
    `prompt_type` ("open"/"closed"), `openness` (in [0, 1]); extra columns are kept.

    Rows without `prompt` are implicit-prompt pairs (Anthropic HH-RLHF format) and are split by
    `split_implicit_prompt`. Rejected: missing/null or wrongly typed fields, malformed messages, empty responses
    (after strip), chosen == rejected, non-finite numbers, out-of-range label_prob/openness, bad prompt_type,
    implicit dialogues that differ before the last assistant turn. With `on_bad_row="skip"` skipped rows go to
    `rejected_path`, by default `./<stem>.rejected.jsonl` in the CURRENT directory (the WARNING log names it; the
    trainers pass their run directory). See the module docstring.

    `allow_empty_responses=True` keeps empty (or whitespace-only) responses instead of rejecting them
    ("empty_response"): in HH-RLHF harmless-base an empty final reply is a refusal, a real signal. The default stays
    strict because elsewhere an empty response is usually a failed generation or a broken export.
    """
    normalize = functools.partial(normalize_preference, allow_empty_responses=allow_empty_responses)
    return _load(path, normalize, "preference", on_bad_row, rejected_path)


def load_sft(
    path: str | os.PathLike,
    on_bad_row: OnBadRow = "error",
    rejected_path: str | os.PathLike | None = None,
    *,
    assistant_turns: str = "last",
    from_preferences: bool = False,
    allow_empty_responses: bool = False,
) -> list[dict[str, Any]]:
    """Load SFT rows: `prompt` + `completion`, or `messages`; extra columns are kept. With `on_bad_row="skip"`
    skipped rows go to `rejected_path`, by default `./<stem>.rejected.jsonl` in the CURRENT directory (the WARNING log
    names it; the trainers pass their run directory). See the module docstring.

    `messages` rows: `assistant_turns="last"` (this function's default, kept for existing callers) gives prompt = all
    but the last message, completion = [last, assistant, message]; "all" (the SFT trainer's default) gives prompt =
    the messages before the first assistant turn and completion = the rest, every assistant turn trained
    (`normalize_sft`). `from_preferences=True` reads a preference file instead (`prompt`/`chosen`/`rejected`, or
    HH-RLHF implicit-prompt rows) and trains on prompt + `chosen` (`normalize_sft_from_preference`).
    `allow_empty_responses=True` keeps empty completions (see `load_preferences`)."""
    if from_preferences:
        normalize = functools.partial(normalize_sft_from_preference, allow_empty_responses=allow_empty_responses)
    else:
        normalize = functools.partial(
            normalize_sft, assistant_turns=assistant_turns, allow_empty_responses=allow_empty_responses
        )
    return _load(path, normalize, "SFT", on_bad_row, rejected_path)


def load_rankings(
    path: str | os.PathLike, on_bad_row: OnBadRow = "error", rejected_path: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Load rankings: `prompt`, `responses` (best -> worst, at least 2) or `responses` + `scores` (one finite number
    per response; the row comes back sorted by score, highest first, `scores` kept), optional `prompt_type`,
    `openness`; extra columns are kept. With `on_bad_row="skip"` skipped rows go to
    `rejected_path`, by default `./<stem>.rejected.jsonl` in the CURRENT directory (the WARNING log names it; the
    trainers pass their run directory). See the module docstring."""
    return _load(path, normalize_ranking, "ranking", on_bad_row, rejected_path)


def load_prompts(
    path: str | os.PathLike, on_bad_row: OnBadRow = "error", rejected_path: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Load RL prompts: `prompt` + any metadata (kept as is; `prompt_type` / `openness`, when present, must be
    valid). With `on_bad_row="skip"` skipped rows go to
    `rejected_path`, by default `./<stem>.rejected.jsonl` in the CURRENT directory (the WARNING log names it; the
    trainers pass their run directory). See the module docstring."""
    return _load(path, normalize_prompt, "prompt", on_bad_row, rejected_path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write rows (without their private `_` keys) atomically: a crash leaves the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Pairs to label (`rlxf label`) and few-shot exemplars
# ---------------------------------------------------------------------------------------------------------------


def normalize_label_pair(row: dict[str, Any]) -> dict[str, Any]:
    """One input row -> {prompt, response_a, response_b, [_human_prefers_a], extras}.

    A human-labelled `chosen` / `rejected` row (implicit-prompt HH-RLHF rows included) becomes a = chosen, b = rejected,
    `_human_prefers_a` = True; extra columns `X_chosen` / `X_rejected` are kept as `_pair_X` = (value_a, value_b) so
    the output can give them to the AI's chosen / rejected.
    """
    if row.get("response_a") is not None or row.get("response_b") is not None:
        prompt = _text(_required(row, "prompt"), "prompt", response=False)
        a = _text(_required(row, "response_a"), "response_a", response=True)
        b = _text(_required(row, "response_b"), "response_b", response=True)
        _same_form({"prompt": prompt, "response_a": a, "response_b": b})
        if a == b:
            raise _BadRow("identical_responses", "response_b", "'response_a' and 'response_b' are identical")
        return _extras(row, {"prompt": prompt, "response_a": a, "response_b": b}, skip=())
    if row.get("chosen") is None and row.get("rejected") is None:
        raise _BadRow(
            "missing_field",
            "response_a",
            "missing required field: give 'prompt' with 'response_a' and 'response_b', or a human-labelled 'chosen' "
            "and 'rejected'",
        )
    pref = normalize_preference(row)
    out: dict[str, Any] = {
        "prompt": pref["prompt"],
        "response_a": pref["chosen"],
        "response_b": pref["rejected"],
        "_human_prefers_a": True,
    }
    for key, value in pref.items():
        if key in ("prompt", "chosen", "rejected", "label_prob", "margin"):
            continue
        if key.endswith("_chosen") and key[: -len("_chosen")] + "_rejected" in pref:
            name = key[: -len("_chosen")]
            out[f"_pair_{name}"] = (value, pref[name + "_rejected"])
        elif not (key.endswith("_rejected") and key[: -len("_rejected")] + "_chosen" in pref):
            out[key] = value
    return out


def load_label_pairs(
    path: str | os.PathLike, on_bad_row: OnBadRow = "error", rejected_path: str | os.PathLike | None = None
) -> list[dict[str, Any]]:
    """Read pairs to label; bad rows raise DataError naming file, line and field (or are skipped to a side file)."""
    return _load(path, normalize_label_pair, "pair", on_bad_row, rejected_path)


def normalize_exemplar(row: dict[str, Any]) -> dict[str, Any]:
    """A few-shot exemplar of the RLAIF labelling prompt: {context, response_1, response_2, label 1|2, rationale?}."""
    out = {}
    for key in ("context", "response_1", "response_2"):
        value = _required(row, key)
        if not isinstance(value, str):
            raise _BadRow("wrong_type", key, f"expected a string, got {type(value).__name__}")
        out[key] = value
    label = _required(row, "label")
    if label not in (1, 2, "1", "2") or isinstance(label, bool):
        raise _BadRow("wrong_type", "label", f"must be 1 or 2, got {label!r}")
    out["label"] = int(label)
    rationale = row.get("rationale")
    if rationale is not None and not isinstance(rationale, str):
        raise _BadRow("wrong_type", "rationale", f"expected a string, got {type(rationale).__name__}")
    out["rationale"] = rationale
    return out


def load_exemplar_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Few-shot exemplars (`rlxf label --exemplars`); a bad row is an error naming file, line and field."""
    return _load(path, normalize_exemplar, "exemplar", "error", None)
