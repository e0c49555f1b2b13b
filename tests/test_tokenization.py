"""Tests for rlxf.data.tokenize: rendering (standard and chat), encoding with BOS/EOS, truncation, padding."""

from __future__ import annotations

import copy
import gzip
import json
import logging
from pathlib import Path

import pytest
import torch

from rlxf.data import DataError, load_preferences
from rlxf.data.tokenize import (
    encode_preferences,
    encode_prompts,
    encode_rankings,
    encode_sft,
    pad,
    render_prompt,
    truncate_prompt,
)
from rlxf.models.tiny import train_tokenizer

HH = Path(__file__).parent / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"

CORPUS = [
    "Zorb is blue. Zorb lives in Paris. The cat sat on the mat.",
    "Name three colours: red, green, blue. What colour is Zorb?",
    "\n\nHuman: hello there, how are you?\n\nAssistant: I am fine, thanks.",
] * 20
USER = [{"role": "user", "content": "What colour is Zorb?"}]
ASSISTANT_A = [{"role": "assistant", "content": "Zorb is blue."}]
ASSISTANT_B = [{"role": "assistant", "content": "Zorb is red."}]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=320)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------------------------------------------
# Standard rows
# --------------------------------------------------------------------------------------------------------------


def test_sft_standard_bos_eos_and_mask(tok):
    (row,) = encode_sft([{"prompt": "What colour is Zorb?", "completion": " Zorb is blue.", "_origin": "f:1"}], tok)
    prompt, completion = ids(tok, "What colour is Zorb?"), ids(tok, " Zorb is blue.")
    assert row["input_ids"] == [tok.bos_token_id, *prompt, *completion, tok.eos_token_id]
    assert row["completion_mask"] == [0] * (1 + len(prompt)) + [1] * (len(completion) + 1)
    assert (row["_origin"], row["_prompt_tokens_cut"]) == ("f:1", 0)


def test_prompt_and_completion_encoded_separately(tok):
    # "Zorb is bl" + "ue." would merge across the boundary if encoded together; encoded apart it must not
    (row,) = encode_sft([{"prompt": "Zorb is bl", "completion": "ue."}], tok)
    expected = [tok.bos_token_id, *ids(tok, "Zorb is bl"), *ids(tok, "ue."), tok.eos_token_id]
    assert row["input_ids"] == expected
    assert ids(tok, "Zorb is blue.") != expected[1:-1]  # the joint encoding does differ: the test is meaningful


def test_bos_and_eos_are_not_doubled(tok):
    (row,) = encode_sft([{"prompt": "<|bos|>Zorb", "completion": " is blue.<|eos|>  \n"}], tok)
    assert row["input_ids"] == [tok.bos_token_id, *ids(tok, "Zorb"), *ids(tok, " is blue."), tok.eos_token_id]


def test_preferences_eos_on_each_response_and_passthrough(tok):
    rows = [
        {"prompt": "Q", "chosen": " blue", "rejected": " red", "margin": 1.5, "label_prob": 0.8, "openness": 0.2,
         "prompt_type": "closed", "other": "dropped", "_origin": "p.jsonl:4"},
    ]  # fmt: skip
    (enc,) = encode_preferences(rows, tok)
    assert enc == {
        "prompt_ids": [tok.bos_token_id, *ids(tok, "Q")],
        "chosen_ids": [*ids(tok, " blue"), tok.eos_token_id],
        "rejected_ids": [*ids(tok, " red"), tok.eos_token_id],
        "margin": 1.5,
        "label_prob": 0.8,
        "prompt_type": "closed",
        "openness": 0.2,
        "_origin": "p.jsonl:4",
        "_prompt_tokens_cut": 0,
    }


def test_rankings_keep_order_and_eos(tok):
    row = {"prompt": "Q", "responses": [" blue", " red", " green"], "scores": [3.0, 2.0, 1.0]}
    (enc,) = encode_rankings([row], tok)
    assert enc["responses_ids"] == [[*ids(tok, r), tok.eos_token_id] for r in row["responses"]]
    assert enc["scores"] == [3.0, 2.0, 1.0] and enc["prompt_ids"] == [tok.bos_token_id, *ids(tok, "Q")]


def test_prompts_keep_metadata(tok):
    row = {"prompt": "Name three colours:", "gold": ["red"], "_origin": "q.jsonl:1"}
    (enc,) = encode_prompts([row], tok)
    assert enc == {**row, "prompt_ids": [tok.bos_token_id, *ids(tok, "Name three colours:")], "_prompt_tokens_cut": 0}


# --------------------------------------------------------------------------------------------------------------
# Chat rows
# --------------------------------------------------------------------------------------------------------------


def test_sft_chat_renders_template_and_masks_only_the_reply(tok):
    (row,) = encode_sft([{"prompt": USER, "completion": ASSISTANT_A}], tok)
    prompt_text = tok.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert prompt_text == "<|user|>\nWhat colour is Zorb?<|eos|>\n<|assistant|>\n"  # the tiny template
    # full rendering = prompt_text + "Zorb is blue.<|eos|>\n"; the newline after EOS is dropped, no EOS is added
    expected_completion = ids(tok, "Zorb is blue.<|eos|>")
    assert expected_completion[-1] == tok.eos_token_id
    assert row["input_ids"] == [tok.bos_token_id, *ids(tok, prompt_text), *expected_completion]
    assert row["completion_mask"] == [0] * (1 + len(ids(tok, prompt_text))) + [1] * len(expected_completion)


def test_preferences_chat(tok):
    (enc,) = encode_preferences([{"prompt": USER, "chosen": ASSISTANT_A, "rejected": ASSISTANT_B}], tok)
    assert enc["prompt_ids"] == [tok.bos_token_id, *ids(tok, render_prompt(USER, tok))]
    assert enc["chosen_ids"] == ids(tok, "Zorb is blue.<|eos|>")
    assert enc["rejected_ids"] == ids(tok, "Zorb is red.<|eos|>")


def test_prompts_chat_end_with_generation_prompt(tok):
    (enc,) = encode_prompts([{"prompt": USER}], tok)
    assert enc["prompt_ids"][-2:] == ids(tok, "<|assistant|>\n")


def test_template_prefix_mismatch_is_a_bad_row(tok, tmp_path):
    odd = copy.deepcopy(tok)
    # the generation prompt says "<|assistant|>\n" but a rendered assistant turn starts "<|assistant|> "
    odd.chat_template = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + '<|eos|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    rows = [{"prompt": USER, "completion": ASSISTANT_A, "_origin": "c.jsonl:3"}]
    with pytest.raises(DataError, match=r"c.jsonl, line 3, field 'completion': the chat template's prompt rendering"):
        encode_sft(rows, odd)
    side = tmp_path / "rej.jsonl"
    assert encode_sft(rows * 2 + [{"prompt": "Q", "completion": " a"}], odd, on_bad_row="skip", rejected_path=side)
    assert [json.loads(line)["reason"] for line in side.read_text().splitlines()] == ["template_mismatch"] * 2


def test_chat_rows_need_a_template(tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(ValueError, match="need a tokenizer with a chat template"):
        encode_sft([{"prompt": USER, "completion": ASSISTANT_A}], plain)


# --------------------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------------------


def test_truncate_prompt_by_hand():
    p = [1, 10, 11, 12, 13]  # BOS + 4 prompt tokens
    # max_length 5, response 2 -> prompt budget 3 = BOS + the last 2 tokens
    assert truncate_prompt(p, 2, max_length=5, keep_first=1) == [1, 12, 13]
    # max_prompt_length 2 (tighter than max_length 10 - 2 = 8) -> BOS + last token
    assert truncate_prompt(p, 2, max_length=10, max_prompt_length=2, keep_first=1) == [1, 13]
    # budget exactly BOS -> BOS only; one less -> the response does not fit
    assert truncate_prompt(p, 4, max_length=5, keep_first=1) == [1]
    assert truncate_prompt(p, 5, max_length=5, keep_first=1) is None
    # no BOS to keep: the cut may leave an empty prompt
    assert truncate_prompt(p, 5, max_length=5) == []
    assert truncate_prompt(p, 3, max_length=8) == p  # 5 + 3 = 8 fits: unchanged


def test_truncation_keeps_response_and_cuts_prompt_from_left(tok, caplog):
    prompt, response = "Zorb is blue. Zorb lives in Paris. The cat sat on the mat.", " Zorb is red."
    p_ids, r_ids = ids(tok, prompt), ids(tok, response)
    max_length = 1 + 3 + len(r_ids) + 1  # BOS + 3 prompt tokens + response + EOS
    rows = [{"prompt": prompt, "chosen": response, "rejected": " Paris.", "_origin": "t:1"},
            {"prompt": "Q", "chosen": " a", "rejected": " b", "_origin": "t:2"}]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="rlxf.data.tokenize"):
        first, second = encode_preferences(rows, tok, max_length=max_length)
    assert first["prompt_ids"] == [tok.bos_token_id, *p_ids[-3:]]
    assert first["chosen_ids"] == [*r_ids, tok.eos_token_id]
    assert first["_prompt_tokens_cut"] == len(p_ids) - 3 and second["_prompt_tokens_cut"] == 0
    assert "truncated the prompt (kept its end) of 1 of 2 preference rows" in caplog.text
    # max_prompt_length alone, on SFT rows
    (sft,) = encode_sft([{"prompt": prompt, "completion": response}], tok, max_prompt_length=4)
    assert sft["input_ids"] == [tok.bos_token_id, *p_ids[-3:], *r_ids, tok.eos_token_id]
    (prompt_row,) = encode_prompts([{"prompt": prompt}], tok, max_prompt_length=4)
    assert prompt_row["prompt_ids"] == [tok.bos_token_id, *p_ids[-3:]]


def test_over_long_row_error_and_skip(tok, tmp_path, caplog):
    long_response = " Zorb is blue." * 10
    rows = [
        {"prompt": "Q", "completion": " a", "_origin": "data/sft.jsonl:6"},
        {"prompt": "Q", "completion": long_response, "_origin": "data/sft.jsonl:7"},
    ]
    max_length = len(ids(tok, long_response))  # + EOS + BOS does not fit
    with pytest.raises(DataError, match=r"data/sft.jsonl, line 7, field 'completion': over-long row") as info:
        encode_sft(rows, tok, max_length=max_length)
    assert info.value.reason == "too_long" and "Raise max_length" in str(info.value)
    side = tmp_path / "rej.jsonl"
    with caplog.at_level(logging.WARNING, logger="rlxf.data"):
        kept = encode_sft(rows, tok, max_length=max_length, on_bad_row="skip", rejected_path=side)
    assert [r["_origin"] for r in kept] == ["data/sft.jsonl:6"]
    assert "skipped 1 of 2 SFT rows at tokenization (too_long: 1)" in caplog.text
    (record,) = [json.loads(line) for line in side.read_text().splitlines()]
    assert (record["origin"], record["reason"], record["field"]) == ("data/sft.jsonl:7", "too_long", "completion")
    assert record["row"] == rows[1]
    # rankings name the longest response
    ranking = {"prompt": "Q", "responses": [" a", long_response], "_origin": "r.jsonl:2"}
    with pytest.raises(DataError, match=r"r.jsonl, line 2, field 'responses\[1\]': over-long"):
        encode_rankings([ranking], tok, max_length=max_length)


def test_length_arguments_are_validated(tok):
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        encode_sft([{"prompt": "Q", "completion": " a"}], tok, max_length=0)
    with pytest.raises(ValueError, match="on_bad_row must be one of"):
        encode_sft([{"prompt": "Q", "completion": " a"}], tok, on_bad_row="drop")


# --------------------------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------------------------


def test_pad_right_and_left_by_hand():
    ids_r, mask_r = pad([[5, 6, 7], [8], []], pad_id=0, side="right")
    torch.testing.assert_close(ids_r, torch.tensor([[5, 6, 7], [8, 0, 0], [0, 0, 0]]))
    torch.testing.assert_close(mask_r, torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]]))
    ids_l, mask_l = pad([[5, 6, 7], [8]], pad_id=9, side="left")
    torch.testing.assert_close(ids_l, torch.tensor([[5, 6, 7], [9, 9, 8]]))
    torch.testing.assert_close(mask_l, torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert ids_l.dtype == mask_l.dtype == torch.long
    assert pad([], pad_id=0)[0].shape == (0, 0)
    with pytest.raises(ValueError, match="side must be 'right' or 'left'"):
        pad([[1]], 0, side="middle")


# --------------------------------------------------------------------------------------------------------------
# The real HH-RLHF sample end to end
# --------------------------------------------------------------------------------------------------------------


def test_hh_rlhf_encodes_back_to_the_original_text(tok, tmp_path):
    rows = load_preferences(HH, on_bad_row="skip", rejected_path=tmp_path / "rej.jsonl")[:200]
    encoded = encode_preferences(rows, tok)
    raw = [json.loads(line) for line in gzip.open(HH, "rt", encoding="utf-8")]
    for enc in encoded:
        original = raw[int(enc["_origin"].rsplit(":", 1)[1]) - 1]
        assert enc["prompt_ids"][0] == tok.bos_token_id and enc["chosen_ids"][-1] == tok.eos_token_id
        text = tok.decode(enc["prompt_ids"][1:]) + tok.decode(enc["chosen_ids"][:-1])
        assert text == original["chosen"]  # byte-level BPE: nothing lost between file and tokens
