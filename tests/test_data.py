"""Tests for rlxf.data: loading, normalising and validating SFT / preference / ranking / prompt files."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlxf.data.formats import (
    DataError,
    default_rejected_path,
    describe_origin,
    load_preferences,
    load_prompts,
    load_rankings,
    load_sft,
    split_implicit_prompt,
)

HH = Path(__file__).parent / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"

USER = [{"role": "user", "content": "What colour is Zorb?"}]
ASSISTANT_A = [{"role": "assistant", "content": "Zorb is blue."}]
ASSISTANT_B = [{"role": "assistant", "content": "Zorb is red."}]

GOOD = {
    "preferences": {"prompt": "Q: colour of Zorb?", "chosen": " blue", "rejected": " red"},
    "sft": {"prompt": "Q: colour of Zorb?", "completion": " blue"},
    "rankings": {"prompt": "Q: colour of Zorb?", "responses": [" blue", " red", " green"]},
    "prompts": {"prompt": "Q: colour of Zorb?", "gold": "blue"},
}
LOADERS = {"preferences": load_preferences, "sft": load_sft, "rankings": load_rankings, "prompts": load_prompts}


def write_jsonl(path: Path, lines: list) -> Path:
    """Each item is a dict (dumped as JSON), a str (written as is) or bytes (written raw)."""
    data = b""
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        data += (line.encode("utf-8") if isinstance(line, str) else line) + b"\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def read_side_file(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pref(**kw) -> str:
    return json.dumps({**GOOD["preferences"], **kw})


# (kind, raw line 2 of the file, field named in the error, reason key)
BAD_ROWS = [
    ("preferences", '{"prompt": "p", "chosen": ', None, "invalid_json"),
    ("preferences", "[1, 2, 3]", None, "not_an_object"),
    ("preferences", b'{"prompt": "p", "chosen": "\xff", "rejected": "b"}', None, "invalid_utf8"),
    ("preferences", '{"prompt": "p", "chosen": "a"}', "rejected", "missing_field"),
    ("preferences", '{"prompt": "p", "chosen": "a", "rejected": null}', "rejected", "missing_field"),
    ("preferences", '{"prompt": "p", "chosen": 3, "rejected": "b"}', "chosen", "wrong_type"),
    ("preferences", '{"prompt": 7, "chosen": "a", "rejected": "b"}', "prompt", "wrong_type"),
    ("preferences", pref(chosen=" \n\t "), "chosen", "empty_response"),
    ("preferences", pref(rejected=""), "rejected", "empty_response"),
    ("preferences", pref(chosen=" same", rejected=" same"), "rejected", "identical_responses"),
    ("preferences", pref(label_prob=1.5), "label_prob", "out_of_range"),
    ("preferences", pref(label_prob=-0.01), "label_prob", "out_of_range"),
    ("preferences", pref()[:-1] + ', "label_prob": NaN}', "label_prob", "non_finite"),
    ("preferences", pref()[:-1] + ', "margin": Infinity}', "margin", "non_finite"),
    ("preferences", pref()[:-1] + ', "openness": NaN}', "openness", "non_finite"),
    ("preferences", pref(margin="big"), "margin", "wrong_type"),
    ("preferences", pref(margin=True), "margin", "wrong_type"),
    ("preferences", pref(prompt_type="maybe"), "prompt_type", "bad_prompt_type"),
    ("preferences", pref(openness=1.2), "openness", "out_of_range"),
    ("preferences", pref(openness=-0.5), "openness", "out_of_range"),
    (
        "preferences",
        pref(prompt=USER, chosen=[{"role": "assistant"}], rejected=ASSISTANT_B),
        "chosen",
        "malformed_messages",
    ),
    ("preferences", pref(prompt=[], chosen=ASSISTANT_A, rejected=ASSISTANT_B), "prompt", "malformed_messages"),
    ("preferences", pref(prompt=["hi"], chosen=ASSISTANT_A, rejected=ASSISTANT_B), "prompt", "malformed_messages"),
    (
        "preferences",
        pref(prompt=USER, chosen=[{"role": 1, "content": "x"}], rejected=ASSISTANT_B),
        "chosen",
        "malformed_messages",
    ),
    ("preferences", pref(prompt=USER, chosen=ASSISTANT_A, rejected=" red"), "rejected", "mixed_formats"),
    (
        "preferences",
        pref(prompt=USER, chosen=[{"role": "assistant", "content": "  "}], rejected=ASSISTANT_B),
        "chosen",
        "empty_response",
    ),
    # implicit-prompt pairs (no "prompt" field)
    (
        "preferences",
        '{"chosen": "\\n\\nHuman: a\\n\\nAssistant: b", "rejected": "\\n\\nHuman: X\\n\\nAssistant: c"}',
        "rejected",
        "prompt_mismatch",
    ),
    ("preferences", '{"chosen": "just text", "rejected": "other text"}', "prompt", "missing_field"),
    (
        "preferences",
        '{"chosen": "\\n\\nHuman: a\\n\\nAssistant:", "rejected": "\\n\\nHuman: a\\n\\nAssistant: c"}',
        "chosen",
        "empty_response",
    ),
    ("rankings", '{"prompt": "p", "responses": [" a"]}', "responses", "too_few_responses"),
    ("rankings", '{"prompt": "p", "responses": " a"}', "responses", "wrong_type"),
    ("rankings", '{"prompt": "p", "responses": [" a", " "]}', "responses[1]", "empty_response"),
    ("rankings", '{"prompt": "p", "responses": [" a", " b"], "scores": [1.0]}', "scores", "length_mismatch"),
    ("rankings", '{"prompt": "p", "responses": [" a", " b"], "scores": [1.0, NaN]}', "scores[1]", "non_finite"),
    ("rankings", '{"prompt": "p", "responses": [" a", " b"], "scores": [1.0, "x"]}', "scores[1]", "wrong_type"),
    ("rankings", '{"prompt": "p", "responses": [" a", " b"], "scores": 3}', "scores", "wrong_type"),
    ("rankings", '{"prompt": "p", "responses": [" a", " b"], "prompt_type": "x"}', "prompt_type", "bad_prompt_type"),
    ("rankings", '{"prompt": "p", "responses": [" a", " b"], "openness": 2}', "openness", "out_of_range"),
    ("sft", '{"prompt": "p"}', "completion", "missing_field"),
    ("sft", '{"prompt": "p", "completion": "   "}', "completion", "empty_response"),
    ("sft", '{"prompt": ["p"], "completion": " a"}', "prompt", "malformed_messages"),
    ("sft", json.dumps({"messages": USER}), "messages", "malformed_messages"),
    ("sft", json.dumps({"messages": USER + [{"role": "assistant", "content": ""}]}), "messages", "empty_response"),
    ("sft", '{"messages": "hello"}', "messages", "wrong_type"),
    ("prompts", '{"gold": "blue"}', "prompt", "missing_field"),
    ("prompts", '{"prompt": "p", "openness": -1}', "openness", "out_of_range"),
]
BAD_IDS = [f"{kind}-{reason}-{field}-{i}" for i, (kind, _, field, reason) in enumerate(BAD_ROWS)]


@pytest.mark.parametrize(("kind", "line", "field", "reason"), BAD_ROWS, ids=BAD_IDS)
def test_bad_row_error_names_file_line_field(tmp_path, kind, line, field, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[kind], line, GOOD[kind]])
    with pytest.raises(DataError) as info:
        LOADERS[kind](path)
    message = str(info.value)
    assert f"{path}, line 2" in message
    if field is not None:
        assert f"field {field!r}" in message
    assert "--on-bad-row skip" in message  # tells the user what to do
    assert (info.value.reason, info.value.field, info.value.origin) == (reason, field, f"{path}:2")


@pytest.mark.parametrize(("kind", "line", "field", "reason"), BAD_ROWS, ids=BAD_IDS)
def test_bad_row_skip_counts_and_writes_side_file(tmp_path, caplog, kind, line, field, reason):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD[kind], line, GOOD[kind]])
    side = tmp_path / "out" / "rejected.jsonl"
    with caplog.at_level(logging.WARNING, logger="rlxf.data"):
        rows = LOADERS[kind](path, on_bad_row="skip", rejected_path=side)
    assert [r["_origin"] for r in rows] == [f"{path}:1", f"{path}:3"]
    assert f"skipped 1 of 3 rows ({reason}: 1)" in caplog.text
    (record,) = read_side_file(side)
    raw = line.decode("utf-8", errors="replace") if isinstance(line, bytes) else line
    assert record == {
        "origin": f"{path}:2",
        "reason": reason,
        "field": field,
        "message": record["message"],
        "raw_line": raw,
    }
    assert record["message"]


def test_skip_counts_several_reasons_and_appends(tmp_path, caplog):
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [GOOD["preferences"], "{", pref(chosen=""), pref(rejected=""), "", pref(label_prob=2)],
    )
    side = tmp_path / "rej.jsonl"
    with caplog.at_level(logging.WARNING, logger="rlxf.data"):
        rows = load_preferences(path, on_bad_row="skip", rejected_path=side)
        load_preferences(path, on_bad_row="skip", rejected_path=side)
    assert len(rows) == 1
    assert "skipped 4 of 5 rows (empty_response: 2, invalid_json: 1, out_of_range: 1)" in caplog.text
    records = read_side_file(side)
    # the blank line 5 is not a row, but it still counts for the line numbers; a second load appends
    assert [r["origin"].rsplit(":", 1)[1] for r in records] == ["2", "3", "4", "6"] * 2


def test_on_bad_row_is_validated(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["preferences"]])
    with pytest.raises(ValueError, match=r"on_bad_row must be one of \('error', 'skip'\), got 'ignore'"):
        load_preferences(path, on_bad_row="ignore")


def test_default_side_file_goes_to_cwd_not_input_dir(tmp_path, monkeypatch, caplog):
    """From Python, the side file lands in the current directory; the warning says where and how to choose."""
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    path = write_jsonl(inputs / "train.jsonl.gz", [GOOD["sft"], '{"prompt": "p"}'])
    monkeypatch.chdir(work)
    assert default_rejected_path(path) == work / "train.rejected.jsonl"
    with caplog.at_level("WARNING"):
        rows = load_sft(path, on_bad_row="skip")
    assert len(rows) == 1
    assert str(work / "train.rejected.jsonl") in caplog.text and "rejected_path=" in caplog.text
    assert [p.name for p in inputs.iterdir()] == ["train.jsonl.gz"]
    assert read_side_file(work / "train.rejected.jsonl")[0]["origin"] == f"{path}:2"


def test_error_mode_writes_no_side_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD["sft"], '{"prompt": "p"}'])
    with pytest.raises(DataError):
        load_sft(path, rejected_path=tmp_path / "rej.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_sft(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("prompt,completion\n")
    with pytest.raises(DataError, match="unsupported file type.*jsonl.gz"):
        load_sft(tmp_path / "d.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="the file is empty"):
        load_sft(tmp_path / "empty.jsonl")
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="cannot read the file"):
        load_sft(tmp_path / "broken.jsonl.gz")
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="not a `datasets` save_to_disk directory"):
        load_sft(tmp_path / "dir")


def test_all_rows_rejected_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"prompt": "p"}', '{"prompt": "q"}'])
    with pytest.raises(DataError, match=r"no valid SFT rows.*All 2 rows were rejected \(\{'missing_field': 2\}\)"):
        load_sft(path, on_bad_row="skip", rejected_path=tmp_path / "rej.jsonl")
    assert len(read_side_file(tmp_path / "rej.jsonl")) == 2


def test_describe_origin():
    assert describe_origin("a/b.jsonl:5") == "a/b.jsonl, line 5"
    assert describe_origin("a/b.parquet:row 0") == "a/b.parquet, row 0 (0-based row index)"
    assert describe_origin("a/b.parquet") == "a/b.parquet"


# --------------------------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------------------------


def test_preferences_optional_fields_and_extras(tmp_path):
    lines = [
        {**GOOD["preferences"], "margin": 2, "label_prob": 0.75, "prompt_type": "closed", "openness": 0, "src": "x"},
        {**GOOD["preferences"], "margin": None, "label_prob": None},  # nulls mean absent (Parquet-style)
    ]
    rows = load_preferences(write_jsonl(tmp_path / "d.jsonl", lines))
    assert rows[0] == {
        **GOOD["preferences"],
        "margin": 2.0,
        "label_prob": 0.75,
        "prompt_type": "closed",
        "openness": 0.0,
        "src": "x",
        "_origin": f"{tmp_path / 'd.jsonl'}:1",
    }
    assert rows[1] == {**GOOD["preferences"], "_origin": f"{tmp_path / 'd.jsonl'}:2"}


def test_rankings_sorted_by_score_descending_ties_stable(tmp_path):
    line = {"prompt": "p", "responses": [" a", " b", " c", " d"], "scores": [0.5, 2, 0.5, -1], "openness": 0.3}
    (row,) = load_rankings(write_jsonl(tmp_path / "r.jsonl", [line]))
    assert row["responses"] == [" b", " a", " c", " d"]  # b (2) > a (0.5) = c (0.5, after a) > d (-1)
    assert row["scores"] == [2.0, 0.5, 0.5, -1.0]
    assert row["openness"] == 0.3
    (plain,) = load_rankings(write_jsonl(tmp_path / "p.jsonl", [GOOD["rankings"]]))
    assert plain["responses"] == GOOD["rankings"]["responses"] and "scores" not in plain


def test_sft_messages_become_prompt_and_completion(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, *USER, *ASSISTANT_A, *USER, *ASSISTANT_B]
    (row,) = load_sft(write_jsonl(tmp_path / "s.jsonl", [{"messages": messages, "id": 3}]))
    assert row == {"prompt": messages[:-1], "completion": messages[-1:], "id": 3, "_origin": f"{tmp_path}/s.jsonl:1"}


def test_conversational_preferences_explicit_and_implicit(tmp_path):
    explicit = {"prompt": USER, "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}
    implicit = {"chosen": USER + ASSISTANT_A, "rejected": USER + ASSISTANT_B}
    rows = load_preferences(write_jsonl(tmp_path / "c.jsonl", [explicit, implicit]))
    for row in rows:
        assert (row["prompt"], row["chosen"], row["rejected"]) == (USER, ASSISTANT_A, ASSISTANT_B)


def test_prompts_keep_metadata_as_is(tmp_path):
    line = {"prompt": USER, "gold": {"colour": "blue"}, "prompt_type": "open", "openness": 1}
    (row,) = load_prompts(write_jsonl(tmp_path / "p.jsonl", [line]))
    assert row == {**line, "_origin": f"{tmp_path}/p.jsonl:1"}


def test_implicit_prompt_split_by_hand():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: Blue."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant: I won't."
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name a colour.\n\nAssistant:"
    assert split_implicit_prompt(chosen, rejected) == (prompt, " Blue.", " I won't.")


# --------------------------------------------------------------------------------------------------------------
# Formats: JSONL, JSONL.gz, Parquet, datasets directory
# --------------------------------------------------------------------------------------------------------------

ROUND_TRIP = [
    {"prompt": "Q1", "chosen": " a", "rejected": " b", "margin": 1.0},
    {"prompt": "Q2", "chosen": " c", "rejected": " d"},
]
ROUND_TRIP_CHAT = [
    {"prompt": USER, "chosen": ASSISTANT_A, "rejected": ASSISTANT_B, "label_prob": 0.9},
    {"prompt": USER + ASSISTANT_A + USER, "chosen": ASSISTANT_B, "rejected": ASSISTANT_A, "label_prob": 0.2},
]


def write_format(tmp_path: Path, fmt: str, rows: list[dict]) -> Path:
    if fmt in ("jsonl", "jsonl.gz"):
        return write_jsonl(tmp_path / f"d.{fmt}", rows)
    if fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    import datasets

    path = tmp_path / "d_dataset"
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "datasets"])
@pytest.mark.parametrize("rows", [ROUND_TRIP, ROUND_TRIP_CHAT], ids=["standard", "chat"])
def test_round_trip_formats(tmp_path, fmt, rows):
    path = write_format(tmp_path, fmt, rows)
    loaded = load_preferences(path)
    assert [{k: v for k, v in r.items() if k != "_origin"} for r in loaded] == rows
    expected_origins = [f"{path}:{i + 1}" if fmt.startswith("jsonl") else f"{path}:row {i}" for i in range(len(rows))]
    assert [r["_origin"] for r in loaded] == expected_origins


@pytest.mark.parametrize("fmt", ["parquet", "datasets"])
def test_columnar_bad_row_names_row_index(tmp_path, fmt):
    path = write_format(tmp_path, fmt, [*ROUND_TRIP, {"prompt": "Q3", "chosen": " e", "rejected": "  "}])
    with pytest.raises(DataError) as info:
        load_preferences(path)
    assert f"{path}, row 2 (0-based row index), field 'rejected': empty response" in str(info.value)
    side = tmp_path / "rej.jsonl"
    assert len(load_preferences(path, on_bad_row="skip", rejected_path=side)) == 2
    (record,) = read_side_file(side)
    assert record["origin"] == f"{path}:row 2" and record["reason"] == "empty_response"
    assert record["row"] == {"prompt": "Q3", "chosen": " e", "rejected": "  ", "margin": None}


def test_datasets_dict_dir_asks_for_a_split(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROUND_TRIP)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\].*dd/train"):
        load_preferences(tmp_path / "dd")
    assert len(load_preferences(tmp_path / "dd" / "train")) == 2


# --------------------------------------------------------------------------------------------------------------
# The real HH-RLHF sample (tests/data/hh_rlhf, with its licence), read unchanged
# --------------------------------------------------------------------------------------------------------------


def test_hh_rlhf_sample_errors_on_first_edge_case():
    with pytest.raises(DataError) as info:
        load_preferences(HH)
    assert f"{HH}, line 87, field 'chosen': empty response" in str(info.value)


def test_hh_rlhf_sample_loads_with_skips(tmp_path, caplog):
    side = tmp_path / "rej.jsonl"
    with caplog.at_level(logging.WARNING, logger="rlxf.data"):
        rows = load_preferences(HH, on_bad_row="skip", rejected_path=side)
    assert len(rows) == 1992
    assert "skipped 8 of 2000 rows (empty_response: 4, prompt_mismatch: 4)" in caplog.text
    rejected = {int(r["origin"].rsplit(":", 1)[1]): r["reason"] for r in read_side_file(side)}
    # lines from the sample's README: 4 dialogues differing before the last turn, 4 empty chosen (e.g. line 926)
    assert {line for line, reason in rejected.items() if reason == "prompt_mismatch"} == {1255, 1689, 1951, 1953}
    assert {line for line, reason in rejected.items() if reason == "empty_response"} == {87, 517, 926, 1104}
    # every kept row splits the raw dialogue exactly: prompt + response gives back the original strings
    raw = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    for row in rows:
        original = raw[int(row["_origin"].rsplit(":", 1)[1]) - 1]
        assert row["prompt"] + row["chosen"] == original["chosen"]
        assert row["prompt"] + row["rejected"] == original["rejected"]
        assert row["prompt"].endswith("\n\nAssistant:")
    (example,) = [r for r in rows if r["_origin"] == f"{HH}:649"]
    assert example["prompt"] == "\n\nHuman: Hello, How are you?\n\nAssistant:"
    assert (example["chosen"], example["rejected"]) == (
        " Hello, I’m doing quite well.",
        " Hello, I am doing well. What is your name?",
    )
