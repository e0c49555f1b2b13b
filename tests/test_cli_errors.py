"""Every user mistake reaches the user as one line, `rlxf: error: ...` naming the file / field / directory, exit 2;
`--log-level debug` adds the traceback; a bug (any other exception) keeps its traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM

from rlxf.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = ["--train.max_steps", "1", "--train.batch_size", "2", "--train.per_device_batch_size", "2",
        "--train.progress", "false", "--train.report_to", "none"]  # fmt: skip


def one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("rlxf: error:")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


@pytest.fixture
def sft_args(factworld_dir, tmp_path):
    return ["--train_file", str(factworld_dir / "sft_train.jsonl"), "--out", str(tmp_path / "out"), *FAST]


def test_config_mistakes(capsys, tmp_path, sft_args):
    yaml_int = tmp_path / "train5.yaml"
    yaml_int.write_text("train: 5\n")
    line = one_line_error(capsys, ["sft", "--config", str(yaml_int), "--train.lr", "1e-3"])
    assert "train5.yaml" in line and "'train' must be a mapping" in line
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"model: caf\xe9\n")
    assert "latin.yaml: not UTF-8" in one_line_error(capsys, ["sft", "--config", str(latin)])


def test_model_directory_mistakes(capsys, tmp_path, tiny_model_dir, sft_args):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in one_line_error(capsys, ["sft", "--model", str(empty), *sft_args])
    a_file = tmp_path / "model.txt"
    a_file.write_text("x")
    assert f"{a_file} is a file" in one_line_error(capsys, ["sft", "--model", str(a_file), *sft_args])

    broken = tmp_path / "broken_config"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "config.json").write_text("{not json")
    assert "config.json is not valid JSON" in one_line_error(capsys, ["sft", "--model", str(broken), *sft_args])

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    line = one_line_error(capsys, ["sft", "--model", str(truncated), *sft_args])
    assert f"cannot load the model in {truncated}" in line and "truncated" in line


def test_tokenizer_larger_than_the_embeddings_is_reported_at_load(capsys, tmp_path, tiny_model_dir, sft_args):
    small = tmp_path / "small_vocab"
    shutil.copytree(tiny_model_dir, small)
    model = AutoModelForCausalLM.from_pretrained(small)
    model.resize_token_embeddings(model.config.vocab_size - 8)
    model.save_pretrained(small)
    line = one_line_error(capsys, ["sft", "--model", str(small), *sft_args])
    assert "embeddings have" in line and str(small) in line


def test_output_and_spec_mistakes(capsys, tmp_path, tiny_model_dir, factworld_dir, sft_args):
    out_file = tmp_path / "out_is_a_file"
    out_file.write_text("")
    argv = ["sft", "--model", str(tiny_model_dir), "--train_file", str(factworld_dir / "sft_train.jsonl")]
    assert "out_is_a_file" in one_line_error(capsys, [*argv, "--out", str(out_file), *FAST])

    (tmp_path / "rewards_with_missing_dependency.py").write_text("import no_such_dependency_xyz\n")
    sys.path.insert(0, str(tmp_path))
    try:
        line = one_line_error(capsys, [
            "rloo", "--model", str(tiny_model_dir), "--prompts_file", str(factworld_dir / "prompts_train.jsonl"),
            "--reward", "callable:rewards_with_missing_dependency:score", "--out", str(tmp_path / "rloo"), *FAST,
        ])  # fmt: skip
    finally:
        sys.path.remove(str(tmp_path))
    assert "no_such_dependency_xyz" in line


def test_a_prompt_of_another_world_names_its_file_and_line(capsys, tmp_path, tiny_model_dir, factworld_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Q: " + "long " * 5000 + "\nA:"}) + "\n")
    line = one_line_error(capsys, [
        "rloo", "--model", str(tiny_model_dir), "--prompts_file", str(prompts), "--k", "2",
        "--reward", f"factworld:{factworld_dir}", "--generation.max_new_tokens", "4", "--out", str(tmp_path / "r"),
        *FAST,
    ])  # fmt: skip
    assert "prompts.jsonl:1" in line and "not a FactWorld prompt" in line and len(line) < 500


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cmd = [sys.executable, "-m", "rlxf.cli", "--log-level", "debug", "sft", "--model", str(empty), "--train_file", "x"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "rlxf: error:" in proc.stderr
    # an internal bug (here: a ValueError from inside a stage, not a UserError) is not dressed up as a user error
    bug = (
        "import sys, rlxf.cli as cli\n"
        "def broken():\n"
        "    def run(cfg): raise ValueError('internal bug')\n"
        "    return cli.Command(cli.SampleConfig, run)\n"
        "from rlxf.sampling import SampleConfig\n"
        "cli.SampleConfig = SampleConfig\n"
        "cli.COMMANDS['sample'] = ('x', broken)\n"
        "sys.exit(cli.main(['sample']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", bug], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ValueError: internal bug" in proc.stderr


def test_run_time_failures_are_one_line(capsys, tmp_path, tiny_model_dir, factworld_dir):
    """A metrics file that is a directory (IsADirectoryError) and a non-finite gradient stop with one line each."""
    argv = ["sft", "--model", str(tiny_model_dir), "--train_file", str(factworld_dir / "sft_train.jsonl")]
    blocked = tmp_path / "blocked"
    (blocked / "metrics.jsonl").mkdir(parents=True)
    line = one_line_error(capsys, [*argv, "--out", str(blocked), *FAST])
    assert "is a directory" in line and "metrics.jsonl" in line
    line = one_line_error(capsys, [*argv, "--out", str(tmp_path / "nan"), *FAST, "--train.max_steps", "4",
                                   "--train.lr", "1e30"])  # fmt: skip
    assert "non-finite" in line and "no update was applied" in line
