"""Every stage through a subprocess, as a user runs it: `rlxf <stage> --flags`, on a small FactWorld."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FAST_TRAIN = ["--train.max_steps", "3", "--train.batch_size", "8", "--train.per_device_batch_size", "8",
              "--train.progress", "false", "--train.report_to", "none"]  # fmt: skip


def rlxf(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlxf.cli", *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )
    assert proc.returncode == 0, f"rlxf {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli")
    rlxf("world", "factworld", "--out", str(out / "world"), "--seed", "3", "--num_train_prompts", "30",
         "--num_test_prompts", "24", "--pairs_per_prompt", "2", "--num_sft_retain", "40")  # fmt: skip
    rlxf("tiny-model", "--corpus", str(out / "world" / "corpus.txt"), "--out", str(out / "tiny"),
         "--vocab_size", "300", "--hidden_size", "32", "--intermediate_size", "64")  # fmt: skip
    return out


def test_world_and_tiny_model(cli_world):
    world = cli_world / "world"
    for name in ("kb.json", "sft_train.jsonl", "prompts_test.jsonl", "preferences_train.jsonl", "README.md"):
        assert (world / name).is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cli_world / "tiny")
    model = AutoModelForCausalLM.from_pretrained(cli_world / "tiny")
    assert len(tok) == model.config.vocab_size and tok.chat_template


def test_sft_rm_dpo_sample_pairs_eval(cli_world):
    world, tiny = cli_world / "world", cli_world / "tiny"
    rlxf("sft", "--model", str(tiny), "--train_file", str(world / "sft_train.jsonl"),
         "--eval_file", str(world / "sft_test.jsonl"), "--out", str(cli_world / "sft"), *FAST_TRAIN)  # fmt: skip
    sft = cli_world / "sft" / "final"
    assert (sft / "config.json").is_file() and (cli_world / "sft" / "metrics.jsonl").is_file()

    rlxf("rm", "--model", str(sft), "--train_file", str(world / "preferences_train.jsonl"),
         "--eval_file", str(world / "preferences_test.jsonl"), "--out", str(cli_world / "rm"), *FAST_TRAIN)  # fmt: skip
    assert (cli_world / "rm" / "final" / "model.safetensors").is_file()

    rlxf("dpo", "--model", str(sft), "--train_file", str(world / "preferences_train.jsonl"),
         "--out", str(cli_world / "dpo"), "--beta", "0.2", *FAST_TRAIN)  # fmt: skip
    assert (cli_world / "dpo" / "final" / "model.safetensors").is_file()

    rlxf("sample", "--model", str(sft), "--prompts_file", str(world / "prompts_test.jsonl"), "--n", "2",
         "--out", str(cli_world / "samples.jsonl"), "--generation.max_new_tokens", "8")  # fmt: skip
    samples = [json.loads(x) for x in (cli_world / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 24 and {"prompt", "response", "sample_index", "finished", "kind"} <= samples[0].keys()

    rlxf("pairs", "--model", str(sft), "--prompts_file", str(world / "prompts_train.jsonl"), "--world", str(world),
         "--k", "3", "--out", str(cli_world / "pairs.jsonl"), "--generation.max_new_tokens", "8")  # fmt: skip
    pairs = [json.loads(x) for x in (cli_world / "pairs.jsonl").read_text().splitlines()]
    assert pairs and all(0.0 <= p["label_prob"] <= 1.0 and p["chosen"] != p["rejected"] for p in pairs)

    proc = rlxf("eval", "--policies", f"{sft},{cli_world / 'dpo' / 'final'}", "--names", "sft,dpo",
                "--world", str(world), "--reward_model", str(cli_world / "rm" / "final"),
                "--out", str(cli_world / "eval"), "--generation.max_new_tokens", "8")  # fmt: skip
    assert "| dpo |" in proc.stdout
    summary = json.loads((cli_world / "eval" / "eval.json").read_text())
    assert summary["policies"]["sft"]["win_rate"] == 0.5  # against itself: every prompt a tie
    assert summary["policies"]["sft"]["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert summary["policies"]["dpo"]["kl_to_reference"] > 0
    assert 0.0 <= summary["reward_model_pairwise_accuracy"] <= 1.0


def test_rloo_with_the_token_level_gold_reward(cli_world):
    world = cli_world / "world"
    rlxf("rloo", "--model", str(cli_world / "tiny"), "--prompts_file", str(world / "prompts_train.jsonl"),
         "--reward", f"factworld:{world}:token", "--gold_world", str(world), "--k", "2", "--generation.max_new_tokens", "8",
         "--out", str(cli_world / "rloo"), "--train.max_steps", "2", "--train.batch_size", "4",
         "--train.per_device_batch_size", "4", "--train.progress", "false", "--train.report_to", "none")  # fmt: skip
    records = [json.loads(x) for x in (cli_world / "rloo" / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/gold" in r for r in records) and (cli_world / "rloo" / "final" / "config.json").is_file()


def test_bad_row_is_reported_with_file_line_and_field(cli_world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    good = (cli_world / "world" / "preferences_train.jsonl").read_text().splitlines()[:6]
    bad.write_text("\n".join(good[:2] + ['{"prompt": "Q", "chosen": "a", "rejected": "a"}'] + good[2:]) + "\n")
    args = [
        "rm",
        "--model",
        str(cli_world / "tiny"),
        "--train_file",
        str(bad),
        "--out",
        str(tmp_path / "rm"),
        *FAST_TRAIN,
    ]
    proc = subprocess.run([sys.executable, "-m", "rlxf.cli", *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "bad.jsonl, line 3" in proc.stderr and "Traceback" not in proc.stderr
    rlxf(*args, "--on-bad-row", "skip", cwd=tmp_path)
    side = [json.loads(x) for x in (tmp_path / "rm" / "rejected_train.jsonl").read_text().splitlines()]
    assert len(side) == 1 and side[0]["origin"].endswith(":3")


def test_reduced_demo_writes_the_report(tmp_path):
    rlxf("demo", "--runs_dir", str(tmp_path), "--name", "mini", "--num_train_prompts", "30", "--num_test_prompts", "20",
         "--vocab_size", "300", "--hidden_size", "32", "--sft_epochs", "0.5", "--rm_epochs", "0.5", "--dpo_epochs", "0.5",
         "--pairs_per_prompt", "2", "--eval_samples_per_prompt", "1", "--max_new_tokens", "12", "--progress", "false")  # fmt: skip
    run = tmp_path / "mini"
    report = (run / "report.md").read_text()
    assert "| sft |" in report and "| dpo |" in report and "Wall time" in report
    # The DPO policy's accuracy as a likelihood-ratio RM is its final held-out evaluation, as DPO logged it.
    last_eval = [json.loads(x) for x in (run / "dpo" / "metrics.jsonl").read_text().splitlines() if "eval/" in x][-1]
    assert f"pairwise accuracy\n{last_eval['eval/rewards_accuracies']:.3f} on the same held-out pairs" in report
    for png in ("training_curves.png", "gold_scores.png"):
        assert (run / png).stat().st_size > 5000
