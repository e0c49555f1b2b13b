"""experiments/token_rewards/run.py end to end on the small FactWorld: every reward's PPO run, the held-out
evaluation, the head-to-head win rates (checked against the written responses by hand), and no committed file
touched with --no-readme."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _load():
    return load_script("experiments/token_rewards/run.py", "token_rewards_run")


def test_token_rewards_runs_every_reward_and_compares_head_to_head(factworld_base_dir, tmp_path):
    run = _load()
    figure = ROOT / "experiments/token_rewards/figures/gold_vs_rollouts.png"
    readme = (ROOT / "experiments/token_rewards/README.md").read_text()
    stamp = figure.stat().st_mtime_ns if figure.exists() else None
    out = tmp_path / "out"
    results = run.main(["--base", str(factworld_base_dir), "--out", str(out), "--seeds", "0", "--steps", "2",
                        "--prompts-per-step", "4", "--eval-samples", "1", "--no-readme"])  # fmt: skip

    assert set(results["table"]) == set(run.REWARDS)
    for row in results["table"].values():
        assert 0.0 <= row["held-out win rate vs SFT"][0] <= 1.0
    assert (factworld_base_dir / "seq2seq_rm" / "final" / "config.json").exists()
    assert (out / "gold_vs_rollouts.png").exists() and (out / "results.json").exists()
    assert (ROOT / "experiments/token_rewards/README.md").read_text() == readme
    assert (figure.stat().st_mtime_ns if figure.exists() else None) == stamp

    for a, b in run.HEAD_TO_HEAD:
        ga = [json.loads(x)["gold"] for x in (out / "eval" / f"responses_{run.file_name(f'{a}|0')}.jsonl").open()]
        gb = [json.loads(x)["gold"] for x in (out / "eval" / f"responses_{run.file_name(f'{b}|0')}.jsonl").open()]
        wins = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ga, gb)) / len(ga)
        assert results["head_to_head"][f"{a} vs {b}"] == pytest.approx((wins, 0.0))


def test_head_to_head_by_hand(tmp_path):
    run = _load()
    for name, golds in (("a|0", [1.0, 0.0, 0.5]), ("b|0", [0.0, 0.0, 1.0])):
        lines = [json.dumps({"prompt": "p", "response": "r", "gold": g}) for g in golds]
        (tmp_path / f"responses_{run.file_name(name)}.jsonl").write_text("\n".join(lines) + "\n")
    assert run.head_to_head(tmp_path, "a", "b", [0]) == pytest.approx((0.5, 0.0))  # win, tie, loss
