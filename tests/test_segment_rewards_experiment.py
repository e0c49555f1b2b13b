"""experiments/segment_rewards/run.py end to end on the small FactWorld: sequence and segment DPO, the held-out
evaluation with the false-premise prompts (checked against the written responses), and no committed file touched
with --no-readme."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlxf.worlds.factworld import load_factworld
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load():
    return load_script("experiments/segment_rewards/run.py", "segment_rewards_run")


def test_segment_rewards_reports_false_premise_success(factworld_base_dir, tmp_path):
    run = _load()
    readme = (ROOT / "experiments/segment_rewards/README.md").read_text()
    figure = ROOT / "experiments/segment_rewards/figures/quality_gold.png"
    stamp = figure.stat().st_mtime_ns if figure.exists() else None
    out = tmp_path / "out"
    results = run.main(["--base", str(factworld_base_dir), "--out", str(out), "--seeds", "0", "--token-reward",
                        "gold", "--optimisers", "DPO", "--granularities", "sequence", "segment", "--dpo-epochs",
                        "0.5", "--eval-samples", "1", "--no-readme"])  # fmt: skip

    assert set(results["table"]) == {"DPO"} and set(results["table"]["DPO"]) == {"sequence", "segment"}
    assert (ROOT / "experiments/segment_rewards/README.md").read_text() == readme
    assert (figure.stat().st_mtime_ns if figure.exists() else None) == stamp
    assert (out / "gold" / "quality_gold.png").exists()

    # The false-premise success of each policy is the share of its written responses that resist the premise.
    world = load_factworld(factworld_base_dir / "world")
    eval_dir = out / "gold" / "eval_false_premise"
    for name in ("sft", "DPO-segment-seed0"):
        rows = [json.loads(x) for x in (eval_dir / f"responses_{name}.jsonl").open()]
        assert len(rows) == len(world.read("prompts_false_premise"))
        success = world.evaluate([r["prompt"] for r in rows], [r["response"] for r in rows])["false_premise_success"]
        expected = results["sft_false_premise"] if name == "sft" else results["per_run_false_premise"][name]
        assert expected["false_premise_success"] == pytest.approx(success)
    assert results["table"]["DPO"]["segment"]["false_premise"][0] == pytest.approx(
        results["per_run_false_premise"]["DPO-segment-seed0"]["false_premise_success"]
    )
    assert "false-premise success" in run.render(results, run.parse_args([]), "quality_gold.png")
