"""Real data, end to end (issue 17): the pieces the HH-RLHF recipe (configs/hh_rlhf/, README "Your own preference
data (HH-RLHF)") needs: a held-out split of a train file, a tokenizer corpus read from data files, SFT from a
preference file, SFT on every assistant turn, empty replies kept on request, over-long responses truncated and counted.

The HH-RLHF sample is tests/data/hh_rlhf/harmless-base/test.jsonl.gz (MIT; red-teaming dialogues, see its README)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest

from rlxf.config import ConfigError
from rlxf.data.formats import DataError, load_preferences, load_sft
from rlxf.data.tokenize import encode_preferences, encode_sft
from rlxf.errors import UserError
from rlxf.models.tiny import EOS, TinyModelConfig, corpus_lines, make_tiny_model
from rlxf.trainers.common import EVAL_SPLIT_FILE, check_eval_split, load_train_eval, split_for_eval

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT / "tests" / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
HH_MISMATCHED_LINES = {1255, 1689, 1951, 1953}  # chosen / rejected differ before the last turn (the sample's README)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def pairs(n: int) -> list[dict]:
    return [{"prompt": f"question {i}?", "chosen": f" good answer {i}.", "rejected": f" bad {i}."} for i in range(n)]


def line_of(row: dict) -> int:
    return int(row["_origin"].rsplit(":", 1)[1])


# ---- 1. held-out split ---------------------------------------------------------------------------------------------


def test_split_sizes_disjoint_ordered_and_deterministic(tmp_path):
    rows = load_preferences(write_jsonl(tmp_path / "p.jsonl", pairs(200)))
    train, held = split_for_eval(rows, 0.1, seed=0)
    assert (len(train), len(held)) == (180, 20)
    assert {r["_origin"] for r in train}.isdisjoint(r["_origin"] for r in held)
    assert {r["_origin"] for r in train} | {r["_origin"] for r in held} == {r["_origin"] for r in rows}
    assert [line_of(r) for r in held] == sorted(line_of(r) for r in held)  # file order kept
    assert [line_of(r) for r in train] == sorted(line_of(r) for r in train)
    again_train, again_held = split_for_eval(load_preferences(tmp_path / "p.jsonl"), 0.1, seed=0)
    assert again_held == held and again_train == train
    assert split_for_eval(rows, 0.1, seed=1)[1] != held  # the seed chooses
    assert len(split_for_eval(rows[:7], 0.01, seed=0)[1]) == 1  # at least one row when eval_split > 0
    assert split_for_eval(rows, 0.0, seed=0) == (rows, [])


def test_split_of_a_row_does_not_depend_on_the_other_rows(tmp_path):
    """Trainers that reject different rows of one file (SFT keeps HH's mismatched pairs, RM / DPO skip them) still
    hold out nearly the same rows: each row's place in the order depends on the seed and its origin only."""
    rows = load_preferences(write_jsonl(tmp_path / "p.jsonl", pairs(200)))
    held_all = {r["_origin"] for r in split_for_eval(rows, 0.1, 0)[1]}
    held_most = {r["_origin"] for r in split_for_eval(rows[4:], 0.1, 0)[1]}
    assert len(held_most - held_all) <= 4


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_split_out_of_range_is_an_error(bad):
    with pytest.raises(ConfigError, match=r"eval_split must be in \[0, 1\)"):
        check_eval_split(bad, "")


def test_split_with_eval_file_or_nothing_left_is_an_error(tmp_path):
    from rlxf.trainers.dpo import DPOConfig
    from rlxf.trainers.ranking_rm import RankingRewardModelConfig
    from rlxf.trainers.rm import RewardModelConfig
    from rlxf.trainers.sft import SFTConfig

    for cls in (SFTConfig, RewardModelConfig, RankingRewardModelConfig, DPOConfig):
        assert cls().eval_split == 0.0
        with pytest.raises(ConfigError, match="both choose the held-out rows"):
            cls(eval_file="e.jsonl", eval_split=0.1)
        with pytest.raises(ConfigError, match="eval_split must be in"):
            cls(eval_split=1.0)
    rows = load_preferences(write_jsonl(tmp_path / "p.jsonl", pairs(2)))
    with pytest.raises(ConfigError, match="leaves no training row"):
        split_for_eval(rows, 0.9, seed=0)


def test_load_train_eval_writes_the_held_out_rows(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(50))
    train, held = load_train_eval(load_preferences, str(path), "", 0.2, 3, tmp_path / "run", "error")
    assert (len(train), len(held)) == (40, 10)
    written = [json.loads(line) for line in (tmp_path / "run" / EVAL_SPLIT_FILE).read_text().splitlines()]
    assert [w["prompt"] for w in written] == [r["prompt"] for r in held]
    # an eval_file wins when no split is asked for; nothing is written then
    train2, held2 = load_train_eval(load_preferences, str(path), str(path), 0.0, 3, tmp_path / "run2", "error")
    assert len(train2) == len(held2) == 50 and not (tmp_path / "run2" / EVAL_SPLIT_FILE).exists()


def test_sft_trainer_splits_a_preference_file(tmp_path, tiny_model_dir):
    """SFT from a preference file (train on `chosen`) with --eval_split, end to end for one step."""
    from rlxf.engine import TrainConfig
    from rlxf.trainers.sft import SFTConfig, train_sft

    path = write_jsonl(tmp_path / "p.jsonl", pairs(40))
    train = TrainConfig(max_steps=1, batch_size=4, per_device_batch_size=4, progress=False)
    cfg = SFTConfig(
        model=str(tiny_model_dir),
        train_file=str(path),
        from_preferences=True,
        eval_split=0.25,
        out=str(tmp_path / "sft"),
        train=train,
    )
    result = train_sft(cfg)
    assert result["finished"]
    assert any("eval/nll" in h for h in result["history"])
    assert len((tmp_path / "sft" / EVAL_SPLIT_FILE).read_text().splitlines()) == 10


# ---- 2. tokenizer corpus from data files ----------------------------------------------------------------------------


def test_corpus_reads_jsonl_gz_parquet_messages_and_text(tmp_path):
    gz = write_jsonl(
        tmp_path / "p.jsonl.gz",
        [{"prompt": "alpha beta", "chosen": "gamma", "rejected": "delta\n\nepsilon", "margin": 1.5}],
    )
    assert corpus_lines(gz) == ["alpha beta", "gamma", "delta", "epsilon"]
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    messages = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello friend"}]
    pq.write_table(pa.Table.from_pylist([{"messages": messages, "id": 3}]), tmp_path / "s.parquet")
    assert corpus_lines(tmp_path / "s.parquet") == ["hi there", "hello friend"]  # content, no roles, no numbers
    (tmp_path / "corpus.txt").write_text("plain one\n\nplain two\n", encoding="utf-8")
    assert corpus_lines(tmp_path / "corpus.txt") == ["plain one", "plain two"]


def test_corpus_of_the_hh_sample_builds_a_tokenizer(tmp_path):
    lines = corpus_lines(HH)
    assert any(line.startswith("Human: ") for line in lines) and any(line.startswith("Assistant: ") for line in lines)
    few = write_jsonl(tmp_path / "few.jsonl.gz", [json.loads(x) for x in gzip.open(HH, "rt").readlines()[:50]])
    out = make_tiny_model(
        TinyModelConfig(
            corpus=f"{few},{tmp_path / 'few.jsonl.gz'}",
            out=str(tmp_path / "tiny"),
            vocab_size=300,
            hidden_size=16,
            intermediate_size=32,
        )
    )
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    text = "\n\nHuman: Hello, How are you?\n\nAssistant: Hello, I’m doing quite well."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_corpus_errors_name_the_file(tmp_path):
    fake_gz = tmp_path / "broken.jsonl.gz"
    fake_gz.write_text('{"prompt": "not gzip"}\n')
    with pytest.raises(UserError, match="broken.jsonl.gz"):
        corpus_lines(fake_gz)
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{not json\n')
    with pytest.raises(UserError, match=r"bad.jsonl, line 2.*invalid JSON"):
        corpus_lines(bad_json)
    binary = tmp_path / "data.bin"
    binary.write_bytes(gzip.compress(b'{"a": 1}\n'))  # gzip under a name tiny-model reads as text
    with pytest.raises(UserError, match=r"data.bin.*UTF-8.*\.jsonl\.gz"):
        corpus_lines(binary)
    with pytest.raises(UserError, match="missing.txt does not exist"):
        corpus_lines(tmp_path / "missing.txt")


# ---- 3. SFT from a preference file ----------------------------------------------------------------------------------


def test_sft_from_preferences_trains_on_chosen(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", pairs(3))
    with pytest.raises(DataError, match="from_preferences"):
        load_sft(path)
    rows = load_sft(path, from_preferences=True)
    assert [(r["prompt"], r["completion"]) for r in rows] == [
        (f"question {i}?", f" good answer {i}.") for i in range(3)
    ]
    assert all("rejected" not in r and "chosen" not in r for r in rows)


def test_sft_from_the_hh_sample_splits_the_implicit_prompt():
    rows = load_sft(HH, from_preferences=True, allow_empty_responses=True)
    assert len(rows) == 2000  # the 4 mismatched pairs are fine SFT rows: only `chosen` is read
    first = json.loads(gzip.open(HH, "rt").readline())["chosen"]
    assert rows[0]["prompt"] + rows[0]["completion"] == first
    assert rows[0]["prompt"].endswith("\n\nAssistant:") and "\n\nAssistant:" not in rows[0]["completion"]


# ---- 4. multi-turn SFT masks ----------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "red cat"},
    {"role": "assistant", "content": "blue dog"},
    {"role": "user", "content": "green fish"},
    {"role": "assistant", "content": "apple pear"},
]


def trained_texts(row: dict, tokenizer) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, current = [], []
    for token, m in zip(row["input_ids"], row["completion_mask"]):
        if m:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_sft_trains_on_every_assistant_turn(tmp_path, tiny_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (row,) = load_sft(path, assistant_turns="all")
    assert row["prompt"] == CONVERSATION[:2] and row["completion"] == CONVERSATION[2:]
    (enc,) = encode_sft([row], tiny_tokenizer)
    assert trained_texts(enc, tiny_tokenizer) == [f"blue dog{EOS}", f"apple pear{EOS}"]
    whole = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=False).rstrip()
    assert tiny_tokenizer.decode(enc["input_ids"][1:]) == whole  # BOS + the whole conversation, nothing lost
    (last,) = encode_sft(load_sft(path, assistant_turns="last"), tiny_tokenizer)
    assert trained_texts(last, tiny_tokenizer) == [f"apple pear{EOS}"]
    assert last["input_ids"] == enc["input_ids"]  # the same tokens, only the mask differs


def test_sft_config_default_is_every_turn_and_first_turn_must_have_a_prompt(tmp_path):
    from rlxf.trainers.sft import SFTConfig

    assert SFTConfig().assistant_turns == "all"
    starts_with_assistant = write_jsonl(tmp_path / "a.jsonl", [{"messages": CONVERSATION[2:]}])
    with pytest.raises(DataError, match="no prompt before the first assistant turn"):
        load_sft(starts_with_assistant, assistant_turns="all")
    assert load_sft(starts_with_assistant, assistant_turns="last")[0]["completion"] == CONVERSATION[4:]


# ---- 5. the HH sample: empty replies, mismatched pairs, truncation --------------------------------------------------


def test_hh_sample_default_is_strict_about_empty_replies():
    with pytest.raises(
        DataError, match=r"test.jsonl.gz, line \d+, field 'chosen': empty response.*allow_empty_responses"
    ):
        load_preferences(HH)


def test_hh_sample_loads_with_empty_replies_kept(tmp_path, tiny_tokenizer):
    rows = load_preferences(HH, on_bad_row="skip", rejected_path=tmp_path / "rej.jsonl", allow_empty_responses=True)
    assert len(rows) == 1996
    rejected = [json.loads(line) for line in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert {int(r["origin"].rsplit(":", 1)[1]) for r in rejected} == HH_MISMATCHED_LINES
    assert {r["reason"] for r in rejected} == {"prompt_mismatch"}
    empty = [r for r in rows if not r["chosen"].strip()]
    assert len(empty) == 4
    (enc,) = encode_preferences(empty[:1], tiny_tokenizer)
    # a refusal: the space HH writes after "Assistant:", then the end of the turn
    assert enc["chosen_ids"][-1] == tiny_tokenizer.eos_token_id
    assert not tiny_tokenizer.decode(enc["chosen_ids"][:-1]).strip()
    strict = load_preferences(HH, on_bad_row="skip", rejected_path=tmp_path / "rej2.jsonl")
    assert len(strict) == 1992


def test_over_long_responses_are_truncated_and_counted(tmp_path, tiny_tokenizer, caplog):
    long_pair = {"prompt": "red cat " * 20, "chosen": " blue dog" * 40, "rejected": " green fish" * 10}
    rows = load_preferences(write_jsonl(tmp_path / "p.jsonl", [long_pair, *pairs(2)]))
    with pytest.raises(DataError, match="over-long row"):
        encode_preferences(rows, tiny_tokenizer, max_length=48, max_prompt_length=16)
    with caplog.at_level(logging.WARNING, logger="rlxf.data.tokenize"):
        enc = encode_preferences(rows, tiny_tokenizer, max_length=48, max_prompt_length=16, truncate_responses=True)
    assert len(enc) == 3 and "truncated the responses" in caplog.text and " 1 of 3 " in caplog.text
    cut = enc[0]
    assert len(cut["prompt_ids"]) == 16 and len(cut["prompt_ids"]) + len(cut["chosen_ids"]) == 48
    assert cut["_response_tokens_cut"] > 0 and cut["chosen_ids"][-1] != tiny_tokenizer.eos_token_id
    assert [e["_response_tokens_cut"] for e in enc[1:]] == [0, 0]
    assert enc[1]["chosen_ids"][-1] == tiny_tokenizer.eos_token_id
    sft = encode_sft(
        load_sft(write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "completion": " b" * 80}])),
        tiny_tokenizer,
        max_length=32,
        max_prompt_length=8,
        truncate_responses=True,
    )
    assert len(sft[0]["input_ids"]) == 32 and len(sft[0]["completion_mask"]) == 32


# ---- 6. the recipe's configs ----------------------------------------------------------------------------------------

RECIPE = sorted((ROOT / "configs" / "hh_rlhf").glob("*.yaml"))


def test_the_recipe_has_its_configs():
    names = ["dpo_hh.yaml", "dpo_lora_hh.yaml", "rm_hh.yaml", "sft_hh.yaml", "tiny_model.yaml"]
    assert [p.name for p in RECIPE] == names


@pytest.mark.parametrize("path", RECIPE, ids=lambda p: p.name)
def test_recipe_config_parses(path):
    from rlxf.cli import build_parser
    from rlxf.config import config_from_args

    command = {"dpo": "dpo", "rm": "rm", "sft": "sft", "tiny": "tiny-model"}[path.name.split("_")[0]]
    argv = [command, "--config", str(path)]
    parser, selected = build_parser(argv)
    cfg = config_from_args(selected.config_cls, parser.parse_args(argv))
    if command != "tiny-model":
        assert cfg.eval_split == 0.1 and cfg.train_file.endswith("test.jsonl.gz") and cfg.allow_empty_responses
    assert (ROOT / (cfg.train_file if command != "tiny-model" else cfg.corpus)).exists()


def test_the_readme_recipe_commands_parse(monkeypatch):
    """Each `rlxf ...` line of the README's HH-RLHF section builds its command's config (flags and --config files)."""
    monkeypatch.chdir(ROOT)  # the commands are run from the repository root
    import shlex

    from rlxf.cli import build_parser
    from rlxf.config import config_from_args

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Your own preference data (HH-RLHF)", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("rlxf ")]
    assert [c[0] for c in commands] == ["tiny-model", "sft", "rm", "dpo", "eval"]
    for argv in commands:
        parser, selected = build_parser(argv)
        config_from_args(selected.config_cls, parser.parse_args(argv))
