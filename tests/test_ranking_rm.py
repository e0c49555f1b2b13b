"""Ranking reward-model trainer (rlxf.trainers.ranking_rm), its batching and scoring (rlxf.collapse.ranking), the CLI
that routes `rlxf rm --loss ranking` to it, and `rlxf collapse diagnose / predict` (rlxf.collapse.commands) on a tiny
LengthWorld."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from rlxf.collapse.commands import DiagnoseConfig, PredictConfig, run_diagnose, run_predict
from rlxf.collapse.losses import utility_ranking_loss
from rlxf.collapse.ranking import (
    collate_rankings,
    completion_values,
    pack_rankings,
    ranking_pairwise_accuracy,
    row_utilities,
    score_rankings,
)
from rlxf.collapse.utilities import utility
from rlxf.data import load_rankings
from rlxf.data.tokenize import encode_rankings
from rlxf.engine import TrainConfig
from rlxf.hf import load_tokenizer
from rlxf.models.reward_model import RewardModel
from rlxf.models.tiny import TinyModelConfig, make_tiny_model
from rlxf.trainers.ranking_rm import RankingRewardModelConfig, ranking_loss_and_metrics, train_ranking_reward_model
from rlxf.trainers.rm import RewardModelConfig
from rlxf.worlds.lengthworld import LengthWorldConfig, write_lengthworld

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """A tiny model gains nothing from a second thread, and on a shared 2-core machine two threads that wait on each
    other at every op ran 10-20× slower whenever another process held a core (the training fixture: 1 s vs 25 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lengthworld(tmp_path_factory):
    """4 training prompts (2 open, 2 closed) and 4 held-out ones, 8 responses each."""
    return write_lengthworld(
        LengthWorldConfig(out=str(tmp_path_factory.mktemp("lw")), train_prompts=4, test_prompts=4)
    )


@pytest.fixture(scope="module")
def lw_model_dir(tmp_path_factory, lengthworld):
    cfg = TinyModelConfig(
        corpus=str(lengthworld / "corpus.txt"),
        out=str(tmp_path_factory.mktemp("lw-model")),
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        layers=2,
        heads=4,
    )
    return make_tiny_model(cfg)


def _rm_config(model_dir, world, out, **kw) -> RankingRewardModelConfig:
    train = TrainConfig(
        lr=3e-3, batch_size=4, per_device_batch_size=2, max_steps=8, report_to="none", progress=False, seed=0
    )
    return RankingRewardModelConfig(
        model=str(model_dir),
        train_file=str(world / "train.jsonl"),
        eval_file=str(world / "test.jsonl"),
        out=str(out),
        max_length=512,
        max_prompt_length=64,
        loss="ranking",
        train=train,
        **kw,
    )


@pytest.fixture(scope="module")
def ranking_run(tmp_path_factory, lw_model_dir, lengthworld):
    """A few full-batch steps (batch = all 4 training prompts, 2 per micro-batch) of the log-utility ranking loss."""
    model = RewardModel.from_pretrained(lw_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out = tmp_path_factory.mktemp("ranking-run")
    cfg = _rm_config(lw_model_dir, lengthworld, out, utility="log")
    cfg.train.mixed_precision = "no"  # the reload test compares scores: on a GPU, bf16 autocast would round them
    result = train_ranking_reward_model(cfg, model=model)
    return {"result": result, "model": model, "before": before, "out": out}


def _encoded(model_dir, path, **kw):
    tokenizer = load_tokenizer(model_dir)
    rows = encode_rankings(load_rankings(path), tokenizer, max_length=512, max_prompt_length=64)
    return tokenizer, rows


def test_ranking_rm_trains_changes_every_parameter_and_reloads(ranking_run, lengthworld):
    result, model = ranking_run["result"], ranking_run["model"]
    losses = result["history"]["loss/ranking"]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    assert losses[-1] < losses[0]  # the same 4 prompts every step: full-batch descent
    unchanged = [
        n
        for n, p in model.named_parameters()
        if n in ranking_run["before"] and torch.equal(p.detach().cpu(), ranking_run["before"][n])
    ]
    assert not unchanged
    assert result["finished"] and 0.0 <= result["eval"]["eval/pairwise_accuracy"] <= 1.0
    assert {"eval/profile_mae/all", "eval/gap"} <= set(result["eval"])
    # the saved model reloads and scores exactly like the trained one
    final = Path(result["out"]) / "final"
    tokenizer, rows = _encoded(final, lengthworld / "test.jsonl")
    again = RewardModel.from_pretrained(final)
    got = score_rankings(again, rows, tokenizer.pad_token_id, batch_size=16)
    want = score_rankings(model, rows, tokenizer.pad_token_id, batch_size=5)  # other chunking, same values
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-5, atol=1e-5)  # float32 sums


def test_mixed_batch_routes_the_utility_per_prompt(lw_model_dir, lengthworld):
    torch.manual_seed(0)
    tokenizer, rows = _encoded(lw_model_dir, lengthworld / "train.jsonl")
    assert {r["prompt_type"] for r in rows} == {"open", "closed"}
    for row, u in zip(rows, row_utilities(rows, "prompt_aware")):
        row["_utility"] = u
    # ragged K: the last prompt keeps 5 of its 8 responses
    rows[-1] = {**rows[-1], "responses_ids": rows[-1]["responses_ids"][:5]}
    model = RewardModel.from_pretrained(lw_model_dir).eval()
    batch = collate_rankings(rows, tokenizer.pad_token_id, "ranking", "prompt")
    assert batch["input_ids"].shape[0] == 8 * 3 + 5 and batch["num_units"] == 4
    with torch.no_grad():
        loss_sum, metrics = ranking_loss_and_metrics(model, batch, "ranking", "prompt")
        # the pure loss, one prompt at a time with that prompt's own utility, summed over prompts (units)
        per_prompt, naive = [], 0.0
        for row in rows:
            one = collate_rankings([row], tokenizer.pad_token_id)
            r = torch.sigmoid(completion_values(model, one))  # (1, K)
            per_prompt.append(utility_ranking_loss(r, row["_utility"])[0])
            # naive float64 loop: −mean over i above j of Ũ(r_i − r_j), columns best -> worst
            rr, k = r[0].double(), r.shape[1]
            terms = [-row["_utility"](rr[i] - rr[j]) for i in range(k) for j in range(i + 1, k)]
            naive += float(sum(terms) / len(terms))
    torch.testing.assert_close(loss_sum, torch.stack(per_prompt).sum())
    # float32 margins d = r_i − r_j of an untrained model (r ≈ 0.5, d ~ 1e-3) carry ~1e-7 absolute error each, and
    # the terms of opposite sign (x vs −1/x) cancel to a small total, so the float64 twin is compared absolutely.
    assert math.isclose(float(loss_sum), naive, rel_tol=1e-5, abs_tol=1e-6)
    # one utility for the whole batch gives another loss: the routing is real
    with torch.no_grad():
        fixed = {**batch, "utilities": [utility("log")] * 4}
        assert not torch.allclose(ranking_loss_and_metrics(model, fixed, "ranking", "prompt")[0], loss_sum)
    assert 0.0 <= float(metrics["rewards/accuracies"]) / batch["num_units"] <= 1.0


def test_packed_rankings_give_the_padded_rewards(lw_model_dir, lengthworld):
    tokenizer, rows = _encoded(lw_model_dir, lengthworld / "train.jsonl")
    rows[1] = {**rows[1], "responses_ids": rows[1]["responses_ids"][:3]}  # ragged K
    for row in rows:
        row["_utility"] = utility("log")
    pad_id = tokenizer.pad_token_id
    model = RewardModel.from_pretrained(lw_model_dir).eval()
    padded = collate_rankings(rows, pad_id, pack=False)
    packed = collate_rankings(rows, pad_id, pack=True)  # one prompt per row
    shared = {**padded, **pack_rankings(rows, pad_id, capacity=10_000)}  # every prompt in one row
    assert packed["input_ids"].shape[0] == 4 and shared["input_ids"].shape[0] == 1
    assert packed["num_tokens"] == padded["num_tokens"]
    with torch.no_grad():
        want = completion_values(model, padded)  # (P, K)
        for batch in (packed, shared):
            # same context and positions, another attention layout: equal up to float32 rounding
            torch.testing.assert_close(completion_values(model, batch), want, rtol=1e-4, atol=1e-5)
            loss, _ = ranking_loss_and_metrics(model, batch, "ranking")
            torch.testing.assert_close(
                loss, ranking_loss_and_metrics(model, padded, "ranking")[0], rtol=1e-4, atol=1e-5
            )


def test_units_of_the_pairs_reduction_and_the_unbounded_losses(lw_model_dir, lengthworld):
    tokenizer, rows = _encoded(lw_model_dir, lengthworld / "train.jsonl")
    rows = rows[:2]
    rows[1] = {**rows[1], "scores": [3.0, 2.0, 2.0, 1.0, 0.0, 0.0, 0.0, -1.0]}  # ties: 28 − 1 − 3 = 24 ranked pairs
    for row in rows:
        row["_utility"] = utility("inverse")
    model = RewardModel.from_pretrained(lw_model_dir).eval()
    pairs = collate_rankings(rows, tokenizer.pad_token_id, "ranking", "pairs")
    assert pairs["num_units"] == 28 + 24
    lists = collate_rankings(rows, tokenizer.pad_token_id, "plackett_luce", "prompt")
    assert lists["num_units"] == 2
    with torch.no_grad():
        for loss, batch in (("ranking", pairs), ("pairwise_bt", pairs), ("plackett_luce", lists)):
            total, metrics = ranking_loss_and_metrics(model, batch, loss, "pairs" if batch is pairs else "prompt")
            assert torch.isfinite(total) and f"loss/{loss}" in metrics


def test_run_diagnose_reads_the_training_utility_and_writes_json_and_png(ranking_run, lengthworld, tmp_path):
    summary = run_diagnose(
        DiagnoseConfig(rm=str(ranking_run["out"]), data=str(lengthworld / "test.jsonl"), out=str(tmp_path))
    )
    assert summary["utility_source"] == "training config" and summary["utility"]["all"] == "log(eps=0.1)"
    assert summary["prompts"] == 4 and summary["n"] == 8 and summary["gap"] is not None
    # ε-smoothed log optimum at n = 8 (spec §4.1 row `log`, ε = 0.1), solver tolerance ±0.001
    want = [0, 0, 0.146, 0.373, 0.627, 0.854, 1, 1]
    assert max(abs(a - b) for a, b in zip(summary["prediction"]["all"], want)) < 1e-3
    on_disk = json.loads((tmp_path / "diagnose.json").read_text())
    assert on_disk["profile_mae"] == summary["profile_mae"]
    assert (tmp_path / "profiles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = (tmp_path / "profiles.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["profile"] == sorted(json.loads(lines[0])["rewards"])
    # an explicit --utility overrides the training config; the prompt-aware rule predicts per type
    other = run_diagnose(
        DiagnoseConfig(
            rm=str(ranking_run["out"] / "final"),
            data=str(lengthworld / "test.jsonl"),
            out=str(tmp_path / "pa"),
            utility="prompt_aware",
        )
    )
    assert other["prompt_aware"] and other["utility"] == {"closed": "linear(eps=0.1)", "open": "inverse(eps=0.1)"}
    assert other["predicted_gap"] == pytest.approx(0.186, abs=1e-3)  # spec §4.1: prompt-aware gap, ε rows


def test_run_diagnose_without_training_config_needs_a_utility(lw_model_dir, lengthworld, tmp_path):
    with pytest.raises(ValueError, match="--utility"):
        run_diagnose(DiagnoseConfig(rm=str(lw_model_dir), data=str(lengthworld / "test.jsonl"), out=str(tmp_path)))


def test_run_diagnose_refuses_a_bradley_terry_run_without_a_utility(tmp_path):
    # `rlxf rm` records loss=bradley_terry in its run's config.json (and no utility): diagnose must say so
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "config.json").write_text(json.dumps(asdict(RewardModelConfig())))
    with pytest.raises(ValueError, match="bradley_terry.*unbounded"):
        run_diagnose(DiagnoseConfig(rm=str(tmp_path / "run"), data=str(tmp_path / "unused.jsonl")))


def test_ranking_pairwise_accuracy_by_hand():
    # row 1, best -> worst by column: (0,1) right, (0,2) right, (1,2) a tie -> 2.5 of 3
    # row 2 ranked by `scores` (column 2 best, columns 0 and 1 tied, so not a pair): (2,0) right, (2,1) wrong -> 1 of 2
    values = [np.array([3.0, 1.0, 1.0]), np.array([0.5, 9.0, 2.0])]
    rows = [{}, {"scores": [0.0, 0.0, 1.0]}]
    assert ranking_pairwise_accuracy(values, rows) == pytest.approx(3.5 / 5)
    assert ranking_pairwise_accuracy([np.array([1.0])], [{}]) == 0.0  # no pairs


def test_run_predict_writes_the_smoothed_profile_and_png(tmp_path):
    result = run_predict(PredictConfig(utility="inverse", n=8, out=str(tmp_path)))
    want = [0, 0.089, 0.241, 0.412, 0.588, 0.759, 0.911, 1]  # spec §4.1 row `inv`, ε = 0.1
    assert max(abs(a - b) for a, b in zip(result["smoothed"], want)) < 1e-3
    assert result["limit_law"].startswith("uniform")
    assert (tmp_path / "predict.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "predict.json").read_text())["n"] == 8
    # openness 0.75 routes to −x^(−0.5) (spec §4.1 row `neg_power(0.5)`, ε = 0.1)
    quarter = run_predict(PredictConfig(openness=0.75, n=8, out=str(tmp_path / "o")))
    want = [0, 0.055, 0.210, 0.400, 0.600, 0.790, 0.945, 1]
    assert max(abs(a - b) for a, b in zip(quarter["smoothed"], want)) < 1e-3


# ---- CLI (subprocess) ------------------------------------------------------------------------------------------------
def _rlxf(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlxf.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def _wired(command: str) -> bool:
    from rlxf.cli import COMMANDS

    return command in COMMANDS


def test_cli_rm_plackett_luce_trains(lw_model_dir, lengthworld, tmp_path):
    proc = _rlxf(
        "rm", "--model", str(lw_model_dir), "--train_file", str(lengthworld / "train.jsonl"),
        "--out", str(tmp_path), "--loss", "plackett_luce", "--max_length", "512", "--max_prompt_length", "64",
        "--train.max_steps", "2", "--train.batch_size", "4", "--train.per_device_batch_size", "4",
        "--train.report_to", "none", "--train.progress", "false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "final" / "config.json").is_file()
    assert "loss/plackett_luce" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


@pytest.mark.parametrize(
    "argv, cls",
    [
        (["rm"], RewardModelConfig),
        (["rm", "--loss", "bradley_terry"], RewardModelConfig),
        (["rm", "--loss", "ranking", "--utility", "inverse"], RankingRewardModelConfig),
        (["--log-level", "INFO", "rm", "--loss=plackett_luce"], RankingRewardModelConfig),
        (["rm", "--config", "{yaml}"], RankingRewardModelConfig),  # `loss: pairwise_bt` in the file
        (["rm", "--config", "{yaml}", "--loss", "bradley_terry"], RewardModelConfig),  # the flag wins
        (["ranking-rm"], RankingRewardModelConfig),
    ],
)
def test_cli_rm_routes_ranking_losses_to_the_ranking_trainer(argv, cls, tmp_path):
    from rlxf.cli import build_parser

    path = tmp_path / "rm.yaml"
    path.write_text("loss: pairwise_bt\nutility: log\n")
    _, command = build_parser([str(path) if a == "{yaml}" else a for a in argv])
    assert command is not None and command.config_cls is cls


def test_rm_help_points_to_the_ranking_trainer():
    from rlxf.cli import build_parser

    parser, _ = build_parser(["rm"])
    text = parser._subparsers._group_actions[0].choices["rm"].format_help()
    assert "--loss ranking" in text and "ranking-rm" in text


def test_pairs_trainer_refuses_a_ranking_loss():
    from rlxf.trainers.rm import train_reward_model

    with pytest.raises(ValueError, match="train_ranking_reward_model"):
        train_reward_model(RewardModelConfig(loss="ranking"))  # type: ignore[arg-type]


@pytest.mark.skipif(
    not _wired("collapse diagnose"), reason="`rlxf collapse diagnose` is not wired into rlxf/cli.py yet"
)
def test_cli_collapse_diagnose_and_predict(ranking_run, lengthworld, tmp_path):
    proc = _rlxf(
        "collapse",
        "diagnose",
        "--rm",
        str(ranking_run["out"]),
        "--data",
        str(lengthworld / "test.jsonl"),
        "--out",
        str(tmp_path / "d"),
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "d" / "diagnose.json").is_file() and (tmp_path / "d" / "profiles.png").is_file()
    proc = _rlxf("collapse", "predict", "--utility", "log", "--n", "8", "--out", str(tmp_path / "p"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p" / "predict.png").is_file()
