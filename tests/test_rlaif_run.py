"""experiments/rlaif/run.py --smoke and judge_study.py (a 2-step judge) end to end on the small FactWorld: the judge labels the pairs, likelihood-ratio
reward models are trained on the human and on the AI labels, DPO / PPO run on each, and d-RLAIF PPO runs on the SFT
policy's expected 1-10 score; no committed file is touched.
(The small world's 256-token vocabulary spells the chain-of-thought prompts past the test model's 512-token context;
the self-check rationale rows are tested in test_rlaif_experiment.py.)"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def judge_base(factworld_base_dir):
    """The small base, with pairs to label that are not the judge's training pairs: the world's last 40 (the judge
    data leaves out every pair it will label)."""
    world_pairs = (factworld_base_dir / "world" / "preferences_train.jsonl").read_text().splitlines()
    (factworld_base_dir / "pairs.jsonl").write_text("\n".join(world_pairs[-40:]) + "\n")
    return factworld_base_dir


def test_rlaif_smoke_with_likelihood_ratio_rms(judge_base, tmp_path):
    run = load_script("experiments/rlaif/run.py", "rlaif_run")
    readme = (ROOT / "experiments/rlaif/README.md").read_text()
    out = tmp_path / "out"
    results = run.main(["--base", str(judge_base), "--out", str(out), "--smoke", "--seeds", "0",
                        "--reward-model", "likelihood-ratio", "--d-rlaif"])  # fmt: skip

    assert (ROOT / "experiments/rlaif/README.md").read_text() == readme
    assert set(results["table"]) == {"SFT", "RLHF-DPO", "RLAIF-DPO", "RLHF-PPO", "RLAIF-PPO", "d-RLAIF-PPO"}
    labelled = [json.loads(x) for x in (out / "labels" / "ai_pairs.jsonl").open()]
    assert len(labelled) == 40 and all(0 <= r["p_a"] <= 1 for r in labelled)
    # one likelihood-ratio RM per arm, trained on that arm's pairs, each scored on the held-out human pairs
    for arm in ("rlhf", "rlaif"):
        assert (out / f"rm_{arm}_likelihood_ratio" / "final" / "config.json").exists()
    assert all(0 <= results["rm_accuracy"][arm] <= 1 for arm in ("RLHF", "RLAIF", "d-RLAIF"))
    assert (out / "d_rlaif_scores.sqlite").exists()  # the d-RLAIF scorer's answers are cached (resume)
    for name in ("RLHF-PPO", "RLAIF-PPO", "d-RLAIF-PPO"):
        assert all(math.isfinite(x) for x in results["ppo_history"][name][0]["rewards/gold"])
    shutil.rmtree(out)


def test_judge_study_trains_and_scores_a_judge(judge_base, tmp_path):
    import experiments.rlaif.judge_study as study

    results = tmp_path / "results.jsonl"
    argv = ["--base", str(judge_base), "--name", "smoke", "--max-steps", "2", "--val-pairs", "20",
            "--also-pairs", "--out-root", str(tmp_path / "study"), "--results", str(results)]  # fmt: skip
    study.main(argv)
    (record,) = [json.loads(x) for x in results.open()]
    assert record["name"] == "smoke" and record["max_steps"] == 2 and record["val_n"] == 20 and record["pairs_n"] == 40
    assert 0 <= record["val_alignment"] <= 1 and 0 <= record["pairs_alignment"] <= 1
    assert record["command"].startswith("python experiments/rlaif/judge_study.py --base")
    with pytest.raises(SystemExit, match="exists"):  # a run directory is never overwritten
        study.main(argv)
