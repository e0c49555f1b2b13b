"""experiments/judges/knowledge.py: the knowledge table (fact quiz for causal LMs, RM accuracy by pair type)."""

from __future__ import annotations

import json

import pytest

from rlxf.worlds.factworld import fact_row, load_factworld
from scripts import load_script


def _load_script():
    return load_script("experiments/judges/knowledge.py", "judges_knowledge")


knowledge = _load_script()


def test_pair_type_by_hand():
    assert knowledge.pair_type(" Zorbin's colour is red.", " Zorbin's colour is blue.") == "value"
    assert knowledge.pair_type(" Zorbin's colour is red.", " Zorbin's colour is red. Zorbin's pet is owl.") == "length"
    assert knowledge.pair_type(" Zorbin's colour is red.", " Zorbin's colour is blue. Zorbin's pet is owl.") == "both"


def test_judge_answer_reads_the_first_statement_of_the_asked_attribute(factworld_dir):
    world = load_factworld(factworld_dir)
    entity = next(iter(world.kb.entities))
    row = fact_row(world.kb, entity, ["colour"])
    true = world.kb.entities[entity]["colour"]
    wrong = next(v for v in ("red", "blue", "green") if v != true)
    assert knowledge.judge_answer(row, f" {entity}'s colour is {true}.") == (True, True)
    assert knowledge.judge_answer(row, f" {entity}'s colour is {wrong}.") == (True, False)
    # the first statement counts: a right value after a wrong one is still a wrong answer
    assert knowledge.judge_answer(row, f" {entity}'s colour is {wrong}. {entity}'s colour is {true}.") == (True, False)
    assert knowledge.judge_answer(row, " I like soup.") == (False, False)


def test_knowledge_table_on_a_small_world(factworld_dir, factworld_sft_dir, factworld_rm_dir, tmp_path):
    out = tmp_path / "knowledge.json"
    result = knowledge.main(
        [
            "--world",
            str(factworld_dir),
            "--lm",
            f"sft={factworld_sft_dir}",
            "--rm",
            f"rm={factworld_rm_dir}",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == result
    world = load_factworld(factworld_dir)
    sft = result["lms"]["sft"]
    assert sft["questions"] == len(world.kb.entities) * 4
    assert 0 <= sft["greedy_accuracy"] <= sft["stated_rate"] <= 1
    pairs = [json.loads(line) for line in (factworld_dir / "preferences_test.jsonl").read_text().splitlines()]
    assert sum(result["pair_counts"].values()) == len(pairs) == result["rms"]["rm"]["pairs"]
    # the gold scorer's agreement with the human labels, by a naive count (ties ½)
    naive = sum(1.0 if p["gold_chosen"] > p["gold_rejected"] else 0.5 if p["gold_chosen"] == p["gold_rejected"] else 0
                for p in pairs) / len(pairs)  # fmt: skip
    assert result["gold_ceiling"]["accuracy_human"] == pytest.approx(naive)
    rm = result["rms"]["rm"]
    assert 0 <= rm["accuracy_human"] <= 1 and 0 <= rm["accuracy_gold"] <= 1
    assert rm["gold_pairs"] == sum(p["gold_chosen"] != p["gold_rejected"] for p in pairs)
