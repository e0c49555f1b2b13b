"""The demo's figures: the moving average by hand, and both PNGs drawn from a run directory's files."""

from __future__ import annotations

import json

from rlxf.demo import DEMO_PANELS, plot_demo, smoothed


def test_smoothed_is_a_trailing_mean():
    assert smoothed([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert smoothed([2.0, 4.0], window=5) == [2.0, 3.0]  # the first points average what exists
    assert smoothed([]) == []


def test_plot_demo_draws_both_figures_from_the_run_files(tmp_path):
    for stage, metrics in {
        "sft": [("loss/nll", "eval/nll"), ("train/lr", None)],
        "rm": [("loss/bt", "eval/bt_loss"), ("rewards/accuracies", "eval/pairwise_accuracy")],
        "dpo": [("loss/dpo", "eval/loss_dpo"), ("rewards/accuracies", "eval/rewards_accuracies")],
    }.items():
        (tmp_path / stage).mkdir()
        lines = []
        for step in range(1, 41):
            row = {"step": step} | {train: 1.0 / step for train, _ in metrics}
            if step % 10 == 0:
                row |= {held_out: 0.5 for _, held_out in metrics if held_out}
            lines.append(json.dumps(row))
        (tmp_path / stage / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "eval").mkdir()
    for name, gold in (("sft", [0.0, 1.0, -1.0]), ("dpo", [1.0, 1.0, 0.5])):
        rows = [json.dumps({"response": "x", "gold": g}) for g in gold]
        (tmp_path / "eval" / f"responses_{name}.jsonl").write_text("\n".join(rows) + "\n")
    figures = plot_demo(tmp_path)
    for name in figures.values():
        assert (tmp_path / name).stat().st_size > 10_000  # a drawn figure, not an empty canvas
    # every panel names its axis, and every metric the panels name is one a trainer logs
    assert all(ylabel for _, _, ylabel, _, _ in DEMO_PANELS)
    assert {stage for stage, *_ in DEMO_PANELS} == {"sft", "rm", "dpo"}
