"""The judge recipe of experiments/rlaif (issue 7 part 7): its SFT rows are the labeller's own prompts, in both
orders, answered with the simulated human's label, and never show a pair the judge will label."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import rlxf.feedback.label as label_module  # noqa: E402
from experiments.rlaif.judge import (  # noqa: E402
    assert_disjoint,
    build_judge_rows,
    check_context,
    judge_label_config,
    write_preamble,
)
from rlxf.feedback.backends import BackendStats, as_prompt  # noqa: E402


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def judge_rows(factworld_dir, tmp_path):
    cfg = judge_label_config(write_preamble(tmp_path / "preamble.txt"))
    rows, counts = build_judge_rows(cfg, factworld_dir / "preferences_train.jsonl")
    return cfg, rows, counts


def test_rows_in_both_orders_with_the_human_label(factworld_dir, judge_rows):
    _, rows, counts = judge_rows
    raw = read_jsonl(factworld_dir / "preferences_train.jsonl")
    assert counts == {"pairs": len(raw), "excluded": 0, "rows": 2 * len(raw)}
    by_pair: dict[int, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair_index"], []).append(r)
    assert sorted(by_pair) == list(range(len(raw)))
    for i, (first, second) in by_pair.items():
        chosen, rejected = raw[i]["chosen"].strip(), raw[i]["rejected"].strip()
        # the human chose `chosen`: "1" when it is shown in slot 1, "2" when it is shown in slot 2
        assert (first["completion"], first["response_1"], first["response_2"]) == ("1", chosen, rejected)
        assert (second["completion"], second["response_1"], second["response_2"]) == ("2", rejected, chosen)
        assert first["prompt"].endswith("Preferred Response=") and first["prompt"] != second["prompt"]
    # balanced slots: a constant answer fits exactly half of the rows
    assert sum(r["completion"] == "1" for r in rows) == len(rows) // 2


class RecordingBackend:
    """A stand-in labeller LLM that records what `run_label` asks it and answers with the judge rows' labels."""

    kind, model_id = "fake", "fake"

    def __init__(self, answers: dict[str, set[str]]):
        self.answers, self.asked, self.stats = answers, [], BackendStats()

    def prompt_key(self, prompt):
        return as_prompt(prompt).text

    def single_token(self, text):
        return None

    def iter_next_token_logprobs(self, prompts, k, labels=()):
        for i, p in enumerate(prompts):
            text = as_prompt(p).text
            self.asked.append(text)
            want = self.answers.get(text, set())
            p1 = 0.9 if want == {"1"} else 0.1 if want == {"2"} else 0.5
            yield i, {"1": math.log(p1), "2": math.log(1 - p1)}

    def close(self):
        pass


def test_prompts_are_what_the_labeller_builds(factworld_dir, judge_rows, tmp_path, monkeypatch):
    cfg, rows, _ = judge_rows
    answers: dict[str, set[str]] = {}
    for r in rows:
        answers.setdefault(r["prompt"], set()).add(r["completion"])
    fake = RecordingBackend(answers)
    monkeypatch.setattr(label_module, "build_backend", lambda *a, **kw: fake)
    cfg.input = str(factworld_dir / "preferences_train.jsonl")
    cfg.out = str(tmp_path / "labels.jsonl")
    cfg.progress = False
    label_module.run_label(cfg)
    # every prompt the labeller reads is a judge training prompt and vice versa (identical requests are sent once)
    assert set(fake.asked) == set(answers)
    # a judge that answers its training prompts exactly reproduces the human label of every unambiguous pair
    out = read_jsonl(tmp_path / "labels.jsonl")
    unambiguous = [
        o
        for o, r in zip(out, rows[::2])
        if len(answers[r["prompt"]]) == 1 and len(answers[rows[2 * r["pair_index"] + 1]["prompt"]]) == 1
    ]
    assert unambiguous and all(o["human_agrees"] for o in unambiguous)


def test_pairs_to_label_are_left_out(factworld_dir, judge_rows, tmp_path):
    cfg, rows, _ = judge_rows
    raw = read_jsonl(factworld_dir / "preferences_train.jsonl")
    shared = [raw[0], {**raw[3], "chosen": raw[3]["rejected"], "rejected": raw[3]["chosen"]}]  # either order counts
    fresh = {"prompt": raw[0]["prompt"], "chosen": " a new answer.", "rejected": " another new answer."}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [*shared, fresh])
    with pytest.raises(AssertionError, match="in the judge's training rows"):
        assert_disjoint(rows, pairs)
    kept, counts = build_judge_rows(cfg, factworld_dir / "preferences_train.jsonl", exclude_pairs=[pairs])
    key = lambda r: (r["prompt"].strip(), frozenset((r["chosen"].strip(), r["rejected"].strip())))  # noqa: E731
    n_shared = sum(key(r) in {key(s) for s in shared} for r in raw)  # ≥ 2: a pair may be drawn twice
    assert counts["excluded"] == n_shared >= 2 and len(kept) == 2 * (len(raw) - n_shared)
    assert_disjoint(kept, pairs)
    triples = {(r["context"], r["response_1"], r["response_2"]) for r in kept}
    for s in shared:
        c, a, b = s["prompt"].strip(), s["chosen"].strip(), s["rejected"].strip()
        assert (c, a, b) not in triples and (c, b, a) not in triples


def test_judge_trains_on_the_token_ids_the_labeller_reads(factworld_model_dir, judge_rows):
    from rlxf.tokenization import encode_sft
    from rlxf.trainers.common import load_tokenizer

    _, rows, _ = judge_rows
    tok = load_tokenizer(factworld_model_dir)
    encoded = encode_sft(rows[:8], tok)
    for r, e in zip(rows[:8], encoded):
        prompt_ids = tok.encode(r["prompt"], add_special_tokens=True)  # as LocalBackend encodes a completions prompt
        label_id = tok.encode(r["completion"], add_special_tokens=False)
        assert len(label_id) == 1  # the label is one token, read right after "Preferred Response="
        assert e["input_ids"] == prompt_ids + label_id + [tok.eos_token_id]
    positions = 512
    assert check_context(tok, positions, [r["prompt"] for r in rows])["max_prompt_tokens"] + 2 <= positions
    with pytest.raises(ValueError, match="does not fit"):
        check_context(tok, 16, [r["prompt"] for r in rows])
