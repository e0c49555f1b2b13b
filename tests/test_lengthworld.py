"""LengthWorld: the reward-collapse gold world (design.md "LengthWorld", methods/reward_collapse.md §5)."""

import json

import pytest

from rlxf.worlds.lengthworld import (
    CLOSED_LENGTHS,
    OPEN_LENGTHS,
    SUFFIX,
    LengthWorldConfig,
    generate_lengthworld,
    lengthworld_vocabulary,
    write_lengthworld,
)


def _cfg(**kw):
    return LengthWorldConfig(**{"train_prompts": 64, "test_prompts": 16, **kw})


def test_rows_follow_the_recipe():
    cfg = _cfg()
    vocab = set(lengthworld_vocabulary(cfg.vocab_size))
    splits = generate_lengthworld(cfg)
    assert [len(splits["train"]), len(splits["test"])] == [64, 16]
    for rows in splits.values():
        types = [r["prompt_type"] for r in rows]
        assert types.count("open") == types.count("closed") == len(rows) // 2  # 50/50
        for row in rows:
            assert set(row) == {"prompt", "responses", "prompt_type"}
            assert row["prompt"].endswith(SUFFIX[row["prompt_type"]])
            lengths = [len(r.split()) for r in row["responses"]]
            expected = OPEN_LENGTHS if row["prompt_type"] == "open" else CLOSED_LENGTHS
            assert lengths == sorted(expected, reverse=True)  # best (longest) -> worst
            longest = row["responses"][0]
            assert all(longest.startswith(r) for r in row["responses"])  # every completion is a word prefix
            assert set(longest.split()) <= vocab
    assert OPEN_LENGTHS == (10, 20, 30, 40, 50, 60, 70, 80)
    assert CLOSED_LENGTHS == (16, 22, 28, 34, 56, 62, 68, 74)


def test_seeded_and_splits_independent():
    a, b = generate_lengthworld(_cfg()), generate_lengthworld(_cfg())
    assert a == b
    c = generate_lengthworld(_cfg(seed=1))
    assert c["train"] != a["train"]
    # the test split does not move when the training split grows
    assert generate_lengthworld(_cfg(train_prompts=128))["test"] == a["test"]
    train_answers = {r["responses"][0] for r in a["train"]}
    assert not train_answers & {r["responses"][0] for r in a["test"]}


def test_vocabulary_is_small_fixed_and_distinct():
    vocab = lengthworld_vocabulary(300)
    assert len(set(vocab)) == 300 and vocab == lengthworld_vocabulary(300)
    assert all(w.isalpha() and len(w) == 4 for w in vocab)
    with pytest.raises(ValueError, match="vocab_size"):
        lengthworld_vocabulary(10**6)
    with pytest.raises(ValueError, match="answer_words"):
        generate_lengthworld(_cfg(answer_words=50))


def test_odd_count_still_has_both_types():
    rows = generate_lengthworld(_cfg(train_prompts=7, test_prompts=3))["test"]
    assert {r["prompt_type"] for r in rows} == {"open", "closed"}


def test_write_lengthworld(tmp_path):
    out = write_lengthworld(_cfg(out=str(tmp_path / "lw"), train_prompts=20, test_prompts=4))
    train = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    assert len(train) == 20 and len(test) == 4
    assert train == generate_lengthworld(_cfg(train_prompts=20, test_prompts=4))["train"]
    corpus = (out / "corpus.txt").read_text().splitlines()
    assert len(corpus) == 40 and corpus[0] == train[0]["prompt"] and corpus[1] == train[0]["responses"][0]
    meta = json.loads((out / "world.json").read_text())
    assert meta["counts"] == {"train": 20, "test": 4} and meta["open_lengths"] == list(OPEN_LENGTHS)
