"""Short real training runs on a small FactWorld: the loss falls and the model learns something measurable."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlxf.engine import TrainConfig
from rlxf.models.reward_model import RewardModel
from rlxf.trainers.rm import RewardModelConfig, train_reward_model
from rlxf.trainers.sft import SFTConfig, train_sft
from rlxf.worlds.factworld import FactWorldConfig, write_factworld


def fast(**kw) -> TrainConfig:
    return TrainConfig(**{"progress": False, "report_to": "none", "warmup_steps": 5} | kw)


def test_sft_held_out_loss_falls_and_every_parameter_changes(factworld_model_dir, factworld_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = SFTConfig(
        model=str(factworld_model_dir),
        train_file=str(factworld_dir / "sft_train.jsonl"),
        eval_file=str(factworld_dir / "sft_test.jsonl"),
        out=str(tmp_path),
        train=fast(max_steps=30, batch_size=16, per_device_batch_size=16, lr=3e-3, eval_every=15),
    )
    history = train_sft(cfg, model=model)["history"]
    assert all(map(math.isfinite, history["loss/nll"]))
    held_out = history["eval/nll"]
    assert held_out[-1] < held_out[0] - 1.0, held_out  # from ~ln(vocab) = 5.5 nats to well below
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach().cpu())] == []
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    torch.testing.assert_close(reloaded.state_dict()["lm_head.weight"], model.state_dict()["lm_head.weight"].cpu())


@pytest.fixture(scope="module")
def gold_world(tmp_path_factory):
    """Pairs labelled by the gold scorer itself (temperature 0): the label is the sign of the gold-score gap."""
    out = tmp_path_factory.mktemp("gold-world")
    write_factworld(FactWorldConfig(seed=1, temperature=0.0), out)  # default size: ~2,600 train pairs
    return out


def test_reward_model_learns_gold_preferences(factworld_sft_dir, gold_world, tmp_path):
    held_out = [json.loads(x) for x in (gold_world / "preferences_test.jsonl").read_text().splitlines()]
    decided = [r for r in held_out if r["gold_chosen"] != r["gold_rejected"]]  # gold ties carry no label
    (tmp_path / "decided.jsonl").write_text("".join(json.dumps(r) + "\n" for r in decided))
    model = RewardModel.from_pretrained(factworld_sft_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = RewardModelConfig(
        model=str(factworld_sft_dir),
        train_file=str(gold_world / "preferences_train.jsonl"),
        eval_file=str(tmp_path / "decided.jsonl"),
        out=str(tmp_path / "rm"),
        train=fast(epochs=1, batch_size=16, per_device_batch_size=16, lr=1e-3),
    )
    result = train_reward_model(cfg, model=model)
    losses = result["history"]["loss/bt"]
    assert all(map(math.isfinite, losses)) and sum(losses[-10:]) < sum(losses[:10])
    accuracy = result["eval"]["eval/pairwise_accuracy"]
    print(f"held-out gold pairwise accuracy: {accuracy:.3f} on {len(decided)} pairs")
    # Chance is 0.5 with a standard error of 0.018 on ~740 pairs; measured 0.654 (1 torch thread, x86_64).
    assert accuracy > 0.6, accuracy
    assert [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach().cpu())] == []
    reloaded = RewardModel.from_pretrained(tmp_path / "rm" / "final")
    torch.testing.assert_close(reloaded.hf.score.weight, model.hf.score.weight.cpu())
