"""Several processes as users launch them: `accelerate launch` with the configs in configs/accelerate/, and FSDP2.

Real gloo processes on the CPU, no mocks. Accelerate starts several CPU processes only with a MULTI_GPU / FSDP
config (or `--multi_gpu`): a bare `accelerate launch --num_processes 2` on a machine without CUDA runs ONE process
(its simple launcher), which the README says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_toy import run_toy

HERE = Path(__file__).parent
ROOT = HERE.parent
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]

pytestmark = pytest.mark.multiprocess


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _launch(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def test_accelerate_launch_ddp_config_trains_like_one_process(tiny_model_dir, tmp_path):
    """configs/accelerate/ddp.yaml starts 2 gloo processes; 2 × batch 4 give the losses of 1 × batch 8."""
    single, _ = run_toy(tiny_model_dir, tmp_path / "one", per_device_batch_size=8, max_steps=4)
    result = tmp_path / "two.json"
    config = ROOT / "configs" / "accelerate" / "ddp.yaml"
    _launch([*ACCELERATE, "--config_file", str(config), "--main_process_port", "29561",
             str(HERE / "engine_toy.py"), str(tiny_model_dir), str(tmp_path / "two"), "4", str(result)])  # fmt: skip
    two = json.loads(result.read_text())
    assert two["world_size"] == 2
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single), rtol=0, atol=1e-5)


def test_cli_under_accelerate_logs_each_line_once(tiny_model_dir, factworld_dir, tmp_path):
    """`accelerate launch --config_file ddp.yaml -m rlxf.cli dpo ...`: one log line per event, not one per rank."""
    config = ROOT / "configs" / "accelerate" / "ddp.yaml"
    proc = _launch([*ACCELERATE, "--config_file", str(config), "--main_process_port", "29562", "-m", "rlxf.cli",
                    "dpo", "--model", str(tiny_model_dir), "--train_file", str(factworld_dir / "preferences_train.jsonl"),
                    "--out", str(tmp_path / "dpo"), "--train.max_steps", "2", "--train.batch_size", "4",
                    "--train.per_device_batch_size", "2", "--train.report_to", "none"])  # fmt: skip
    text = proc.stdout + proc.stderr
    assert text.count("training 2 steps: 4 examples/step = 2 per pass × 2 processes") == 1, text[-3000:]
    assert text.count("preference rows") == 1, text[-3000:]
    assert text.count('"finished": true') == 1  # the summary
    lines = (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_fsdp2_two_gloo_processes_train_like_one(tiny_model_dir, tmp_path):
    """torch's fully_shard (FSDP2) over 2 gloo CPU processes trains the tiny Llama like 1 process (losses 1e-5)."""
    script = str(HERE / "fsdp2_toy.py")
    _launch([sys.executable, script, str(tiny_model_dir), "4", str(tmp_path / "one.json")])
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
             script, str(tiny_model_dir), "4", str(tmp_path / "two.json")])  # fmt: skip
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["losses"][-1] != one["losses"][0]  # it trained
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=0, atol=1e-5)


def test_bare_accelerate_launch_on_cpus_runs_one_process_and_says_so(tiny_model_dir, tmp_path):
    """`accelerate launch --num_processes 2` without CUDA starts one process (Accelerate's simple launcher): rlxf
    trains alone, as before, but warns how to launch several."""
    result = tmp_path / "one.json"
    proc = _launch([*ACCELERATE, "--num_processes", "2", "--main_process_port", "29564", str(HERE / "engine_toy.py"),
                    str(tiny_model_dir), str(tmp_path / "run"), "4", str(result)])  # fmt: skip
    assert json.loads(result.read_text())["world_size"] == 1
    assert "started this one alone" in proc.stderr and "configs/accelerate/ddp.yaml" in proc.stderr
