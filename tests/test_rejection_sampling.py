"""Rejection sampling (best-of-N fine-tuning) with rlxf-ASR masks: selection, masked NLL, a short run, the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from rlxf.credit.segments import CreditConfig
from rlxf.engine import TrainConfig
from rlxf.sampling import GenerationSettings
from rlxf.trainers.rejection_sampling import (
    RejectionSamplingConfig,
    best_of_n,
    masked_nll,
    train_rejection_sampling,
    winner_batch,
)


def vowels(prompts, texts):
    """Per-character spans: +1 on a vowel, −0.25 on anything else (so responses mix good and bad segments)."""
    return [[(i, i + 1, 1.0 if ch in "aeiou" else -0.25) for i, ch in enumerate(t)] for t in texts]


def checksum(prompts, texts):
    """A scalar per response that differs between most samples (few ties)."""
    return [float(sum(map(ord, t)) % 101) for t in texts]


def _cfg(model_dir, world, out, **kw):
    train = kw.pop("train", {})
    return RejectionSamplingConfig(
        model=str(model_dir),
        prompts_file=str(world / "prompts_train.jsonl"),
        out=str(out),
        n=4,
        generation=GenerationSettings(max_new_tokens=16),
        train=TrainConfig(
            **{
                "batch_size": 4,
                "per_device_batch_size": 4,
                "max_steps": 2,
                "lr": 1e-2,
                "progress": False,
                "report_to": "none",
            }
            | train  # fmt: skip
        ),
        **kw,
    )


def test_best_of_n_by_hand():
    # rows: a clear best; a tie between samples 0 and 2 (the first wins); all equal (the first wins)
    scores = torch.tensor([[0.1, 0.9, -1.0], [2.0, 1.0, 2.0], [0.0, 0.0, 0.0]])
    assert best_of_n(scores).tolist() == [1, 0, 0]


def test_picks_the_best_of_n_by_the_reward_source(factworld_model_dir, factworld_dir, tmp_path):
    cfg = _cfg(factworld_model_dir, factworld_dir, tmp_path, reward=f"callable:{__name__}:checksum")
    result = train_rejection_sampling(cfg)
    records = [json.loads(line) for line in (tmp_path / "selected.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 4 and [r["step"] for r in records] == [0] * 4 + [1] * 4  # 2 steps × 4 prompts
    for r in records:
        assert len(r["rewards"]) == 4
        assert r["sample_index"] == max(range(4), key=lambda j: (r["rewards"][j], -j))  # the first best
        assert r["reward"] == max(r["rewards"]) == checksum([r], [r["response"]])[0]
        assert r["keep"] == [1] * len(r["tokens"]) and not r["skipped"]  # 'sequence': every token trained on
    assert result["finished"] and (tmp_path / "final" / "config.json").is_file()
    # the mean of all N rewards is at most the mean of the winners'
    hist = result["history"]
    assert all(m <= b for m, b in zip(hist["rewards/mean"], hist["rewards/best"]))


def _winners(model_dir, world, n=3, seed=0):
    from rlxf.data import load_prompts
    from rlxf.data.tokenize import encode_prompts
    from rlxf.hf import load_tokenizer

    tok = load_tokenizer(model_dir)
    rows = encode_prompts(load_prompts(world / "prompts_train.jsonl")[:n], tok)
    g = torch.Generator().manual_seed(seed)
    winners = [{"row": r, "response_ids": torch.randint(5, 200, (4 + 3 * i,), generator=g).tolist()}
               for i, r in enumerate(rows)]  # fmt: skip
    weights = [(torch.rand(len(w["response_ids"]), generator=g) < 0.5).float().tolist() for w in winners]
    weights[0][0] = 1.0
    weights[0][1] = 0.0
    return winners, weights, tok.pad_token_id


def test_masked_nll_by_hand_and_gradient_zero_on_masked_tokens(factworld_model_dir, factworld_dir):
    from transformers import AutoModelForCausalLM

    from rlxf.logprobs import token_logprobs

    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    winners, weights, pad_id = _winners(factworld_model_dir, factworld_dir)
    batch = winner_batch(winners, weights, pad_id)
    assert batch["num_units"] == sum(map(sum, weights))
    captured = {}

    def keep_logits(module, args, output):  # the LM head's output is the logits
        output.retain_grad()
        captured["logits"] = output

    hook = model.lm_head.register_forward_hook(keep_logits)
    nll, metrics = masked_nll(model, batch)
    hook.remove()
    # naive twin: each winner alone, Σ_t −w_t log π(y_t), y_t predicted at len(prompt) + t − 1
    expected = 0.0
    with torch.no_grad():
        for w, ws in zip(winners, weights):
            seq = torch.tensor([w["row"]["prompt_ids"] + w["response_ids"]])
            lp = token_logprobs(model(seq).logits[:, :-1], seq[:, 1:])[0]
            p = len(w["row"]["prompt_ids"])
            expected -= sum(x * lp[p - 1 + t].item() for t, x in enumerate(ws))
    torch.testing.assert_close(nll, torch.tensor(expected))
    assert metrics["loss/nll"] == nll.detach()

    nll.backward()
    grad = captured["logits"].grad.abs().sum(-1)  # (W, keep): logits from position first − 1 on
    first = batch["first_response_position"]
    weight = batch["token_weight"][:, first:]  # (W, keep − 1): logits[:, j] predicts token first + j
    response = torch.zeros_like(weight, dtype=torch.bool)
    for b, w in enumerate(winners):
        p = len(w["row"]["prompt_ids"])
        response[b, p - first : p - first + len(w["response_ids"])] = True
    assert (grad[:, :-1][response & (weight == 0)] == 0).all()
    assert (grad[:, :-1][response & (weight == 1)] > 0).all()
    assert (grad[:, :-1][~response] == 0).all()  # prompt and padding positions are never trained on


def test_short_masked_run_trains_and_writes_masks(factworld_model_dir, factworld_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(factworld_model_dir, factworld_dir, tmp_path, reward=f"callable:{__name__}:vowels",
               credit=CreditConfig(granularity="segment"), train={"max_steps": 8})  # fmt: skip
    hist = train_rejection_sampling(cfg, model=model)["history"]
    losses = hist["loss/nll"]
    assert len(losses) == 8 and all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach().cpu())] == []
    assert all(0 < f < 1 for f in hist["asr/kept_frac_pos"])  # the mask keeps the vowel-rich segments
    for key in ("asr/tau", "asr/segments_per_seq", "asr/mean_segment_len", "asr/skipped_winners"):
        assert len(hist[key]) == 8
    records = [json.loads(line) for line in (tmp_path / "selected.jsonl").read_text().splitlines()]
    for r in records:
        assert len(r["keep"]) == len(r["tokens"]) == len(r["token_rewards"])
        assert r["skipped"] == (sum(r["keep"]) == 0)
    assert any(0 < sum(r["keep"]) < len(r["keep"]) for r in records)


def negative(prompts, texts):
    return [-1.0 for _ in texts]


def test_winners_with_empty_masks_are_skipped(factworld_model_dir, factworld_dir, tmp_path):
    # every reward negative: no segment agrees with the winner's label +1, so every winner is skipped, the step still
    # counts (a zero-weight pass) and nothing changes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = _cfg(factworld_model_dir, factworld_dir, tmp_path, reward=f"callable:{__name__}:negative",
               credit=CreditConfig(granularity="token"))  # fmt: skip
    result = train_rejection_sampling(cfg, model=model)
    assert result["finished"] and result["history"]["asr/skipped_winners"] == [4.0, 4.0]
    assert result["history"]["loss/nll"] == [0.0, 0.0]
    assert all(torch.equal(before[n], p.detach().cpu()) for n, p in model.named_parameters())


def test_resume_keeps_the_winners_file_in_step(factworld_model_dir, factworld_dir, tmp_path):
    first = _cfg(factworld_model_dir, factworld_dir, tmp_path, reward=f"callable:{__name__}:checksum",
                 train={"max_steps": 3, "stop_after": 2})  # fmt: skip
    train_rejection_sampling(first)
    resumed = _cfg(factworld_model_dir, factworld_dir, tmp_path, reward=f"callable:{__name__}:checksum",
                   train={"max_steps": 3, "resume": True})  # fmt: skip
    train_rejection_sampling(resumed)
    steps = [json.loads(line)["step"] for line in (tmp_path / "selected.jsonl").read_text().splitlines()]
    assert steps == [0] * 4 + [1] * 4 + [2] * 4


# --------------------------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "rlxf.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_cli_rejection_sampling(factworld_model_dir, factworld_dir, tmp_path):
    proc = run_cli(
        "rejection-sampling", "--model", str(factworld_model_dir), "--prompts_file",
        str(factworld_dir / "prompts_train.jsonl"), "--reward", f"factworld:{factworld_dir}:token", "--n", "2",
        "--out", str(tmp_path), "--generation.max_new_tokens", "8", "--credit.granularity", "segment",
        "--train.max_steps", "2", "--train.batch_size", "2", "--train.per_device_batch_size", "2",
        "--train.progress", "false", "--train.report_to", "none",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["finished"] is True
    assert len((tmp_path / "selected.jsonl").read_text().splitlines()) == 4


def test_cli_rejection_sampling_bad_input(factworld_model_dir, tmp_path):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "Q: hi\\nA:"}\n{"question": "no prompt"}\n')
    proc = run_cli("rejection-sampling", "--model", str(factworld_model_dir), "--prompts_file", str(bad),
                   "--reward", f"callable:{__name__}:checksum", "--out", str(tmp_path / "run"))  # fmt: skip
    assert proc.returncode == 2
    assert "prompts.jsonl, line 2" in proc.stderr and "'prompt'" in proc.stderr
    with pytest.raises(ValueError, match="at least 1 sample"):
        RejectionSamplingConfig(n=0)
