"""experiments/judges/rm_reading.py (where a scalar reward head is read), implicit_rm.py (the likelihood-ratio
reward model) and seq2seq_judge.py (the seq2seq reward model as a judge): their math by hand, and small runs on the
small FactWorld."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    return load_script(f"experiments/judges/{name}.py", f"judges_{name}")


rm_reading = _load("rm_reading")
implicit_rm = _load("implicit_rm")


def test_readings_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0], [5.0, 6.0, 7.0, 0.0, 0.0]])
    batch = {
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
        "response_mask": torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0, 0.0]]),
    }
    assert rm_reading.read(values, batch, "last").tolist() == [4.0, 7.0]
    assert rm_reading.read(values, batch, "sum").tolist() == [7.0, 13.0]
    assert rm_reading.read(values, batch, "mean").tolist() == [3.5, 6.5]


def test_collate_marks_the_response_tokens():
    rows = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6]}]
    batch = rm_reading.collate(rows, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [1, 2, 6, 0, 0]]
    assert batch["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]


def test_rm_reading_runs_on_a_small_world(factworld_dir, factworld_sft_dir, tmp_path):
    result = rm_reading.main(["--world", str(factworld_dir), "--sft", str(factworld_sft_dir), "--out",
                              str(tmp_path / "r.json"), "--epochs", "0.5", "--readings", "last", "sum"])  # fmt: skip
    assert set(result["readings"]) == {"last", "sum"}
    for r in result["readings"].values():
        assert 0.0 <= r["accuracy_human"] <= 1.0 and 0.0 <= r["accuracy_gold"] <= 1.0
        assert sum(t["pairs"] for t in r["by_type"].values()) == len(
            (factworld_dir / "preferences_test.jsonl").read_text().splitlines()
        )


def test_an_untrained_implicit_rm_ties_every_pair(factworld_dir, factworld_sft_dir):
    """π_θ = π_ref gives r = 0 for every response: every pair is a tie, scored ½."""
    pairs = implicit_rm.read_jsonl(factworld_dir / "preferences_test.jsonl")[:12]
    result = implicit_rm.pair_accuracy(factworld_sft_dir, str(factworld_sft_dir), pairs)
    assert result["accuracy_human"] == 0.5 and result["accuracy_gold"] == 0.5


def test_implicit_rm_runs_and_writes_the_headline(factworld_dir, factworld_sft_dir, tmp_path, monkeypatch):
    judges = tmp_path / "judges.json"
    monkeypatch.setattr(implicit_rm, "JUDGES_JSON", judges)
    argv = ["--world", str(factworld_dir), "--sft", str(factworld_sft_dir), "--out", str(tmp_path / "run"),
            "--settings", "1e-3:1", "--limit", "40", "--figure", str(tmp_path / "curve.png")]  # fmt: skip
    result = implicit_rm.main(argv)
    run = result["settings"]["lr 0.001, 1 epochs"]["runs"][0]
    for key in ("accuracy_human", "accuracy_gold", "precision", "recall"):
        assert 0.0 <= run[key] <= 1.0 and math.isfinite(run[key])
    written = json.loads(judges.read_text())
    assert written["rm_accuracy_human_heldout"] == pytest.approx(run["accuracy_human"], abs=1e-4)
    assert written["commands"]["increment_recall"].startswith("python experiments/judges/implicit_rm.py --world")
    assert (tmp_path / "run" / "results.json").exists() and (tmp_path / "curve.png").stat().st_size > 0
    assert result["settings"]["lr 0.001, 1 epochs"]["train_pairs"] == sum(
        1 for _ in (factworld_dir / "preferences_train.jsonl").open()
    )


seq2seq_judge = _load("seq2seq_judge")


def test_seq2seq_judge_runs_on_a_small_world(factworld_dir, factworld_sft_dir, tmp_path):
    argv = ["--world", str(factworld_dir), "--sft", str(factworld_sft_dir), "--out", str(tmp_path / "run"),
            "--settings", "1e-3:1", "--limit", "40"]  # fmt: skip
    result = seq2seq_judge.main(argv)
    run = result["settings"]["lr 0.001, 1 epochs"]["runs"][0]
    for variant in seq2seq_judge.VARIANTS:
        for key in ("accuracy_human", "accuracy_gold"):
            assert 0.0 <= run[variant][key] <= 1.0
        assert sum(t["pairs"] for t in run[variant]["by_type"].values()) == 40
    assert 0.0 <= run["precision"] <= 1.0 and 0.0 <= run["recall"] <= 1.0
    sanity = run["sanity"]
    assert sanity["flag_rate_gap"] == pytest.approx(sanity["flag_rate_rejected"] - sanity["flag_rate_chosen"])
    assert "variant soft" in seq2seq_judge.markdown(result)
    assert json.loads((tmp_path / "run" / "results.json").read_text())["settings"]


@pytest.mark.parametrize("kind", ["implicit_rm", "seq2seq_rm"])
def test_the_shared_base_builds_its_judge_once(kind, factworld_dir, factworld_sft_dir, tmp_path):
    import shutil
    import sys

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from experiments import common
    from rlxf.rewards.sources import build_reward_source

    shutil.copytree(factworld_dir, tmp_path / "world")
    base = {"world": tmp_path / "world", "sft": factworld_sft_dir}
    build = getattr(common, f"factworld_{kind}")
    judge = build(base)
    assert judge == tmp_path / kind / "final" and (judge / "config.json").exists()
    stamp = (judge / "model.safetensors").stat().st_mtime_ns
    assert build(base) == judge and (judge / "model.safetensors").stat().st_mtime_ns == stamp
    spec = f"dpo:{judge}:{factworld_sft_dir}" if kind == "implicit_rm" else f"seq2seq:{judge}"
    build_reward_source(spec, device="cpu")  # the spec token_rewards uses


def test_more_pairs_are_new_simulated_human_draws_on_training_prompts(factworld_dir, tmp_path):
    world_pairs = implicit_rm.read_jsonl(factworld_dir / "preferences_train.jsonl")
    assert implicit_rm.training_pairs(factworld_dir, 0, tmp_path) == factworld_dir / "preferences_train.jsonl"
    path = implicit_rm.training_pairs(factworld_dir, 2, tmp_path)
    rows = implicit_rm.read_jsonl(path)
    extra = rows[len(world_pairs) :]
    assert rows[: len(world_pairs)] == world_pairs and extra and extra != world_pairs[: len(extra)]
    train_prompts = {r["prompt"] for r in implicit_rm.read_jsonl(factworld_dir / "prompts_train.jsonl")}
    held_out = {r["prompt"] for r in implicit_rm.read_jsonl(factworld_dir / "preferences_test.jsonl")}
    assert {r["prompt"] for r in extra} <= train_prompts and not {r["prompt"] for r in extra} & held_out
    assert implicit_rm.training_pairs(factworld_dir, 2, tmp_path).read_text() == path.read_text()  # reused
