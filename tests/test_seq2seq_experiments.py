"""experiments/seq2seq_rm/length_bias.py and ood.py end to end on the small FactWorld: the re-labelled world keeps
the base's knowledge base, prompts and answer pairs, the labeller's length bias shows in its labels, every arm runs,
and the held-out entities are absent from every reward model's pairs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load(name: str):
    return load_script(f"experiments/seq2seq_rm/{name}.py", f"seq2seq_{name}")


def test_biased_world_relabels_the_same_pairs(factworld_dir, tmp_path):
    run = _load("length_bias")
    world = run.biased_world(factworld_dir, tmp_path / "biased", length_bias=3.0)
    base_pairs = run.read_jsonl(factworld_dir / "preferences_train.jsonl")
    pairs = run.read_jsonl(world / "preferences_train.jsonl")
    assert [p["prompt"] for p in pairs] == [p["prompt"] for p in base_pairs]
    assert [{p["chosen"], p["rejected"]} for p in pairs] == [{p["chosen"], p["rejected"]} for p in base_pairs]
    assert run._share_longer_chosen(pairs) > run._share_longer_chosen(base_pairs)
    (world / "prompts_test.jsonl").write_text("{}\n")  # no longer the base world's prompts
    with pytest.raises(RuntimeError, match="not the base world"):
        run.biased_world(factworld_dir, world, length_bias=3.0)


def test_share_longer_chosen_by_hand():
    run = _load("length_bias")
    pairs = [
        {"chosen": "a b c", "rejected": "a"},
        {"chosen": "a", "rejected": "a b"},
        {"chosen": "x", "rejected": "y"},
    ]
    assert run._share_longer_chosen(pairs) == 0.5  # the equal-length pair is left out


def test_length_bias_runs_every_arm(factworld_base_dir, tmp_path):
    run = _load("length_bias")
    readme = (ROOT / "experiments/seq2seq_rm/README.md").read_text()
    out = tmp_path / "out"
    results = run.main(["--base", str(factworld_base_dir), "--out", str(out), "--seeds", "0", "--steps", "2",
                        "--prompts-per-step", "4", "--eval-samples", "1", "--no-readme"])  # fmt: skip
    assert len(results["table"]) == 4
    for row in results["table"].values():
        assert row["length, first 5 rollouts"][0] > 0 and 0.0 <= row["gold win rate vs SFT"][0] <= 1.0
    assert (out / "length.png").exists() and json.loads((out / "results.json").read_text())["table"]
    assert (ROOT / "experiments/seq2seq_rm/README.md").read_text() == readme


def test_accuracy_by_split_by_hand():
    ood = _load("ood")
    pairs = [{"gold_chosen": 1.0, "gold_rejected": 0.0}, {"gold_chosen": 0.0, "gold_rejected": 1.0},
             {"gold_chosen": 0.5, "gold_rejected": 0.5}]  # fmt: skip
    result = ood.accuracy_by_split(pairs, [1.0, 1.0, 0.5], ["in distribution", "in distribution", "list"])
    assert result["in distribution"] == {"pairs": 2, "accuracy_human": 1.0, "accuracy_gold": 0.5}
    assert result["list"]["pairs"] == 1 and result["list"]["accuracy_human"] == 0.5
    assert math.isnan(result["list"]["accuracy_gold"])  # a gold tie has no gold order
    assert result["out of distribution"]["pairs"] == 0


def test_ood_holds_entities_out_of_every_rm(factworld_base_dir, tmp_path):
    ood = _load("ood")
    readme = (ROOT / "experiments/seq2seq_rm/README.md").read_text()
    results = ood.main(
        ["--base", str(factworld_base_dir), "--out", str(tmp_path / "out"), "--seeds", "0", "--no-readme"]
    )
    world = ood.load_factworld(factworld_base_dir / "world")
    held_out = ood.held_out_entities(world)
    assert sorted(held_out) == results["held_out_entities"] and len(held_out) == len(world.kb.entities) // 4
    kept = ood.read_jsonl(tmp_path / "out" / "preferences_train.jsonl")
    assert kept and all(ood.split_of(world, r, held_out) != "out of distribution" for r in kept)
    assert set(results["table"]) == {"gold scorer (the ceiling under label noise)", "scalar BT RM",
                                     "likelihood-ratio RM", "seq2seq RM"}  # fmt: skip
    assert results["table"]["seq2seq RM"]["out of distribution"]["pairs"] > 0
    assert (ROOT / "experiments/seq2seq_rm/README.md").read_text() == readme


def test_refusal_runs_every_arm_and_counts_abstentions(factworld_base_dir, factworld_dir, tmp_path):
    """The small base with its world rewritten with abstain_prob 0.3 (the same config otherwise): the experiment's
    stages run (SFT is the fixture's, so reused), and its refusal rates match the written responses."""
    import shutil

    from rlxf.worlds.factworld import ABSTENTION, FactWorldConfig, write_factworld

    run = _load("refusal")
    config = json.loads((factworld_dir / "kb.json").read_text())["config"]
    shutil.rmtree(factworld_base_dir / "world")
    write_factworld(FactWorldConfig(**{**config, "abstain_prob": 0.3}), factworld_base_dir / "world")
    out = tmp_path / "out"
    results = run.main(["--base", str(factworld_base_dir), "--out", str(out), "--abstain-prob", "0.3", "--seeds",
                        "0", "--steps", "2", "--prompts-per-step", "4", "--eval-samples", "1", "--no-readme"])  # fmt: skip

    assert set(results["table"]) == {"BT RM", "seq2seq RM", "gold (control)"}
    assert results["pairs_with_abstention"] > 0 and 0.0 <= results["abstention_chosen"] <= 1.0
    assert (out / "refusal.png").exists()
    # Hand count on the written responses of one policy: abstentions among its fact answers.
    rows = [json.loads(x) for x in (out / "eval" / "responses_BT-s0.jsonl").open()]
    facts = [r for r in rows if r["prompt"].startswith("Q: What ")]
    expected = sum(r["response"].strip() == ABSTENTION for r in facts) / len(facts)
    assert results["table"]["BT RM"]["refusal on all fact prompts"][0] == pytest.approx(expected)
    with pytest.raises(SystemExit, match="abstain_prob 0.3"):
        run.main(["--base", str(factworld_base_dir), "--out", str(out), "--abstain-prob", "0.1", "--no-readme"])


def test_refusal_rates_by_hand(tmp_path):
    run = _load("refusal")
    rows = [
        {"prompt": "Q: What is the colour of A?\nA:", "response": " I don't know."},
        {"prompt": "Q: What is the colour of A?\nA:", "response": " A's colour is red."},
        {"prompt": "Q: What is the pet of B?\nA:", "response": " I don't know."},
        {"prompt": "Q: Name 2 pets.\nA:", "response": " I don't know."},  # not a fact prompt: not counted
    ]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rates = run.refusal_rates(path, known={"Q: What is the colour of A?\nA:"})
    assert rates == {"refusal on known prompts": 0.5, "refusal on all fact prompts": 2 / 3}
