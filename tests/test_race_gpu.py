"""The GPU race (`benchmarks/race_gpu.py`) in its tiny CPU mode: inputs from the HH-RLHF sample, every task on rlxf's
side, TRL's DPO (when trl is installed) on the same token ids with the same step-0 loss, and the report files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_race_tiny_cpu_mode(tmp_path):
    has_trl = importlib.util.find_spec("trl") is not None and importlib.util.find_spec("datasets") is not None
    cmd = [sys.executable, str(ROOT / "benchmarks" / "race_gpu.py"), "--tiny", "--out", str(tmp_path)]
    cmd += ["--trl-tasks", "dpo_cached"] if has_trl else ["--no-trl"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "race_gpu.json").read_text())
    assert set(report["tasks"]) == {"dpo_cached", "dpo", "rm", "rloo"}
    for task, sides in report["tasks"].items():
        assert sides["rlxf"]["tokens_per_s"] > 0 and sides["rlxf"]["peak_mem_mib"] > 0, task
    rlxf = report["tasks"]["dpo_cached"]["rlxf"]
    assert rlxf["step0_loss"] == pytest.approx(report["tasks"]["dpo"]["rlxf"]["step0_loss"], abs=1e-6)
    if has_trl:  # TRL saw rlxf's ids row for row (its child stops otherwise) and computes the same loss
        trl = report["tasks"]["dpo_cached"]["trl"]
        assert abs(rlxf["step0_loss"] - trl["step0_loss"]) < 1e-4
    assert "| DPO, reference log-probs precomputed |" in (tmp_path / "race_gpu.md").read_text()
