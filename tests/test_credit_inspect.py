"""rlxf.credit.inspect: credit of tokenized responses, `rlxf segments show` and `rlxf segments quality`."""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from rlxf.credit.assign import assign_credit, credit_counts, credit_metrics, token_texts
from rlxf.credit.inspect import (
    SegmentQualityConfig,
    ShowSegmentsConfig,
    match_negative_segments,
    overlaps,
    precision_recall,
    run_segment_quality,
    run_show_segments,
    segment_char_spans,
    visible,
)
from rlxf.credit.segments import CreditConfig, agreement_mask, segment
from rlxf.models.tiny import train_tokenizer

TEXT = " Zorbin's colour is red."


@pytest.fixture(scope="module")
def bpe():
    """A BPE tokenizer with merges: ' red' is one token."""
    return train_tokenizer([TEXT.strip(), "the cat is red", "Zorbin's pet is cat."] * 5, vocab_size=300)


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


# --------------------------------------------------------------------------------------------- matching (pure)


def test_overlaps_is_half_open():
    assert overlaps((0, 3), (2, 5)) and overlaps((2, 5), (0, 3)) and overlaps((1, 2), (0, 9))
    assert not overlaps((0, 3), (3, 5))  # touching ends share no character
    assert not overlaps((4, 4), (0, 9))  # an empty span overlaps nothing


def test_segment_char_spans_by_hand():
    # tokens " Zor" [0,4) "bin" [4,7) "'s" [7,9) " red" [9,13) "." [13,14) EOS [14,14)
    offsets = [(0, 4), (4, 7), (7, 9), (9, 13), (13, 14), (14, 14)]
    # segments [0,2) -> chars [0,7); [2,6) -> [7,14) (EOS adds nothing); [5,6) (EOS only) -> the empty span (14,14)
    assert segment_char_spans([(0, 2), (2, 6), (5, 6)], offsets) == [(0, 7), (7, 14), (14, 14)]


def test_match_negative_segments_by_hand():
    # text " A's pet is fox. A's food is figs." with wrong values "fox" [12,15) and "figs" [29,33)
    wrong = [(12, 15), (29, 33)]
    segments = [
        (0, 11, 0.4),  # positive: ignored
        (11, 16, -0.5),  # negative, overlaps "fox": a true positive
        (16, 28, -0.1),  # negative, overlaps nothing: a false positive
        (28, 34, 0.2),  # positive over "figs": that wrong span is missed
    ]
    counts = match_negative_segments(segments, wrong)
    assert counts == {"negative": 2, "true_positive": 1, "wrong": 2, "found": 1}
    assert precision_recall(counts) == (0.5, 0.5)
    # one negative segment over both wrong spans: precision 1 (1 of 1), recall 1 (2 of 2)
    counts = match_negative_segments([(0, 40, -1.0)], wrong)
    assert counts == {"negative": 1, "true_positive": 1, "wrong": 2, "found": 2}
    assert precision_recall(counts) == (1.0, 1.0)
    # no negative segment and no wrong span: both undefined, not 0 or 1
    assert precision_recall(match_negative_segments([(0, 5, 1.0)], [])) == (None, None)


def test_visible_escapes_control_characters():
    assert visible("a\nb\tc\x1b[31md\x7f") == "a⏎b⇥c\\x1b[31md\\x7f"


# --------------------------------------------------------------------------------------------- assign_credit


def test_assign_credit_matches_the_pure_functions(bpe):
    ids = [encode(bpe, TEXT), encode(bpe, " red."), encode(bpe, " is red")]
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(3, 12, generator=g)  # wider than the responses: the extra columns are cut
    labels = [1, -1, 1]
    credit = CreditConfig(granularity="segment", token_reward="given")
    rc = assign_credit(credit, labels, ids, bpe, token_rewards=rewards)
    mask = torch.arange(rc.mask.shape[1]) < torch.tensor([[len(i)] for i in ids])
    assert torch.equal(rc.mask, mask)
    r = torch.where(mask, rewards[:, : mask.shape[1]], 0.0)
    assert torch.equal(rc.keep, agreement_mask(r, mask, torch.tensor(labels), "segment"))
    assert [[(s.start, s.end) for s in row] for row in rc.segments] == [
        [(s.start, s.end) for s in row] for row in segment(r, mask, "segment")
    ]
    assert rc.tau == pytest.approx(0.1 * r[mask].std(correction=0).item())
    counts = credit_counts(rc, labels)
    metrics = credit_metrics(counts)
    kept_pos = int(rc.keep[0].sum() + rc.keep[2].sum())
    assert metrics["asr/kept_frac_pos"] == kept_pos / (len(ids[0]) + len(ids[2]))
    assert metrics["asr/kept_frac_neg"] == int(rc.keep[1].sum()) / len(ids[1])
    n_segments = sum(len(s) for s in rc.segments)
    assert metrics["asr/segments_per_seq"] == n_segments / 3
    assert metrics["asr/mean_segment_len"] == sum(map(len, ids)) / n_segments


def test_assign_credit_step_uses_decoded_token_texts(bpe):
    text = " is red. the cat is red"
    ids = encode(bpe, text)
    tokens = token_texts(ids, text, bpe)
    assert "".join(tokens) == text and tokens[-1] == ""  # EOS adds no text
    ends = [t for t, s in enumerate(tokens) if s.rstrip().endswith(".")]
    rc = assign_credit(CreditConfig(granularity="step", token_reward="given"), [1], [ids], bpe,
                       token_rewards=torch.ones(1, len(ids)), with_tokens=True)  # fmt: skip
    assert [(s.start, s.end) for s in rc.segments[0]] == [(0, ends[0] + 1), (ends[0] + 1, len(ids))]
    assert rc.tokens == [tokens] and rc.keep.all()


def test_assign_credit_sequence_needs_no_rewards_and_others_do(bpe):
    ids = [encode(bpe, " red")]
    rc = assign_credit(CreditConfig(), [-1], ids, bpe)
    assert rc.keep.all() and len(rc.segments[0]) == 1
    with pytest.raises(ValueError, match="needs token rewards"):
        assign_credit(CreditConfig(granularity="token"), [1], ids, bpe)


# --------------------------------------------------------------------------------------------- segments show


def test_show_segments_on_factworld_pairs(factworld_model_dir, factworld_dir, tmp_path):
    credit = CreditConfig(granularity="segment", token_reward=f"factworld:{factworld_dir}:token")
    page = tmp_path / "view" / "segments.html"
    cfg = ShowSegmentsConfig(input=str(factworld_dir / "preferences_train.jsonl"), model=str(factworld_model_dir),
                             credit=credit, limit=3, html=str(page))  # fmt: skip
    text = run_show_segments(cfg)
    assert text.count(" chosen ℓ=+1") == 3 and text.count(" rejected ℓ=−1") == 3
    assert "\x1b[32m" in text and "✓" in text and "┃" in text  # kept segments in green, boundaries
    assert str(page) in text
    html_text = page.read_text(encoding="utf-8")
    assert html_text.startswith("<!DOCTYPE html>") and html_text.count("class='item'") == 6
    plain = run_show_segments(ShowSegmentsConfig(**{**vars(cfg), "color": False, "html": ""}))
    assert "\x1b" not in plain and "segments.html" not in plain


def evil_rewards(prompts, texts):
    return [[(0, len(t), -1.0)] for t in texts]


def test_show_segments_responses_escape_html_and_terminal_codes(factworld_model_dir, tmp_path):
    rows = [
        {"prompt": "Q: <b>hi</b>\nA:", "response": " <script>alert(1)</script> & done", "label": -1},
        {"prompt": "Q: plain\nA:", "response": " a\x1b[2Jb"},  # an escape code in the data; label defaults to 1
    ]
    data = tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    credit = CreditConfig(granularity="segment", token_reward=f"callable:{__name__}:evil_rewards")
    page = tmp_path / "p.html"
    text = run_show_segments(ShowSegmentsConfig(input=str(data), model=str(factworld_model_dir), credit=credit,
                                                html=str(page), color=False))  # fmt: skip
    assert "[0] response ℓ=−1" in text and "[1] response ℓ=+1" in text
    assert "\x1b" not in text and "\\x1b" in text  # the ESC shown as text, never sent to the terminal
    html_text = page.read_text(encoding="utf-8")
    assert "<script" not in html_text and "<b>hi" not in html_text and "&lt;b&gt;hi" in html_text
    # the page's text, tags removed and entities decoded, is the data itself
    shown = html.unescape(re.sub(r"<[^>]+>", "", html_text))
    assert " <script>alert(1)</script> & done" in shown and "\x1b" not in shown and " a\\x1b[2Jb" in shown


@pytest.mark.parametrize(
    ("row", "match"),
    [({"prompt": "Q\nA:", "answer": "x"}, "field 'response'"), ({"prompt": "Q\nA:", "response": "x", "label": 2},
                                                                 "label must be 1, -1 or 0")],
)  # fmt: skip
def test_show_segments_bad_rows_name_the_line(factworld_model_dir, tmp_path, row, match):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "Q\nA:", "response": " ok"}) + "\n" + json.dumps(row) + "\n")
    cfg = ShowSegmentsConfig(input=str(data), model=str(factworld_model_dir), credit=CreditConfig())
    with pytest.raises(ValueError, match=rf"bad.jsonl, line 2.*{match}"):
        run_show_segments(cfg)


# --------------------------------------------------------------------------------------------- segments quality


def test_segment_quality_of_the_gold_token_rewards(factworld_model_dir, factworld_dir):
    cfg = SegmentQualityConfig(world=str(factworld_dir), model=str(factworld_model_dir), limit=20,
                               credit=CreditConfig(token_reward=f"factworld:{factworld_dir}:token"))  # fmt: skip
    result = run_segment_quality(cfg)
    assert result["responses"] == 40 and result["wrong_spans"] > 0
    assert set(result["by_granularity"]) == {"token", "step", "segment"}
    token = result["by_granularity"]["token"]
    # the gold puts −1 on the last token of every wrong value: every wrong span is found at token granularity
    assert token["recall"] == 1.0 and token["wrong_spans_found"] == result["wrong_spans"]
    # negative segments also mark unrequested facts (−0.5), which are not wrong: precision in (0, 1]
    for stats in result["by_granularity"].values():
        assert stats["precision"] is None or 0 < stats["precision"] <= 1
        assert stats["negative_segments"] >= stats["true_positive_segments"]
    with pytest.raises(ValueError, match="each must be one of"):
        SegmentQualityConfig(granularities=["tokens"])


# --------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlxf.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_segments_show(factworld_model_dir, factworld_dir, tmp_path):
    reward = f"factworld:{factworld_dir}:token"
    proc = run_cli("segments", "show", "--input", str(factworld_dir / "preferences_test.jsonl"), "--model",
                   str(factworld_model_dir), "--credit.token_reward", reward, "--limit", "2", "--color", "false",
                   "--html", str(tmp_path / "s.html"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ℓ=") == 4 and (tmp_path / "s.html").is_file()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q\\nA:", "reply": "x"}\n')
    proc = run_cli("segments", "show", "--input", str(bad), "--model", str(factworld_model_dir),
                   "--credit.token_reward", reward)  # fmt: skip
    assert proc.returncode == 2 and "bad.jsonl, line 1" in proc.stderr and "'response'" in proc.stderr
