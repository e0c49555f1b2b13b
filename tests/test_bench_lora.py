"""The LoRA-vs-full DPO benchmark runs end to end in its tiny mode (the real run is a command: benchmarks/README.md)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_lora_tiny(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_lora.py"), "--tiny", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "lora.json").read_text())
    runs = {r["mode"]: r for r in report["runs"]}
    assert set(runs) == {"full", "lora"}
    for r in runs.values():
        assert r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
        assert abs(r["first_loss"] - 0.6931471805599453) < 1e-5  # policy = reference at step 0, in both modes
    assert "LoRA / full: memory" in (tmp_path / "lora.md").read_text()
