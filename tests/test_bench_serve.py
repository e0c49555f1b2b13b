"""benchmarks/bench_serve.py runs small: every request answered through the official client, the table written."""

from __future__ import annotations

import json

import pytest

from scripts import load_script

pytest.importorskip("openai")


def test_bench_serve_tiny(tmp_path, one_torch_thread):
    bench = load_script("benchmarks/bench_serve.py", "bench_serve")
    result = bench.main(["--clients", "1", "2", "--seconds", "0.3", "--max_tokens", "2", "--batch_sizes", "1", "4",
                         "--hidden_size", "16", "--out", str(tmp_path)])  # fmt: skip
    rows = result["rows"]
    assert [(r["batch_size"], r["clients"]) for r in rows] == [(1, 1), (1, 2), (4, 1), (4, 2)]
    assert all(r["requests"] > 0 and r["errors"] == 0 and r["req_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "serve.json").read_text())["rows"] == rows
    table = (tmp_path / "serve.md").read_text()
    assert "| clients | batch_size 1 | batch_size 4 |" in table and "Failed requests: 0." in table
