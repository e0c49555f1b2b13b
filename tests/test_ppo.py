"""PPO and REINFORCE with a baseline (rlxf.trainers.ppo): trivial rewards are learned, resume is exact, credit masks
touch only the policy loss, the CLI runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlxf.credit.segments import CreditConfig
from rlxf.engine import TrainConfig
from rlxf.sampling import GenerationSettings
from rlxf.trainers.ppo import PPOConfig, advantages_and_masks, ppo_loss, train_ppo
from rlxf.trainers.reinforce import ReinforceConfig

VOWELS = "aeiou"


def count_vowels(prompts, texts):
    """The trivial reward: how many vowels the response has (dense enough for a random tiny model: a single letter
    gave so few non-zero rewards that 20 steps learned it for some sampling seeds only)."""
    return [float(sum(c in VOWELS for c in t)) for t in texts]


def vowel_spans(prompts, texts):
    """The same reward as character spans: +1 on every vowel, so a token-level source."""
    return [[(i, i + 1, 1.0) for i, c in enumerate(t) if c in VOWELS] for t in texts]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(model_dir, rl_prompts_file, out, cls=PPOConfig, train=None, **kw) -> PPOConfig:
    kw = {
        "reward": f"callable:{__name__}:count_vowels",
        "k": 4,
        "generation": GenerationSettings(max_new_tokens=8, temperature=1.0, batch_size=4),
        "kl_coef": 0.01,
    } | kw
    return cls(
        model=str(model_dir),
        prompts_file=str(rl_prompts_file),
        out=str(out),
        train=TrainConfig(
            **{
                "batch_size": 4,
                "per_device_batch_size": 2,
                "max_steps": 20,
                "lr": 1e-2,
                "lr_schedule": "constant",
                "progress": False,
                "report_to": "none",
                "seed": 0,
            }
            | (train or {})
        ),
        **kw,
    )


def learns(result, steps):
    history = result["history"]
    rewards = history["rewards/mean"]
    assert result["finished"] and len(rewards) == steps
    for key in ("loss/policy", "loss/value", "objective/kl", "objective/entropy", "policy/clip_frac", "value/error"):
        assert all(map(math.isfinite, history[key])), key
    return sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4


def test_ppo_with_separate_critic_learns_a_trivial_reward(tiny_model_dir, rl_prompts_file, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_ppo(config(tiny_model_dir, rl_prompts_file, tmp_path), model=model)
    first, last = learns(result, 20)
    assert last > first + 1.0, result["history"]["rewards/mean"]
    assert not [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach().cpu())]
    assert (tmp_path / "final" / "config.json").exists()
    assert (tmp_path / "final" / "value_model" / "config.json").exists()


def test_ppo_with_shared_value_head_and_token_rewards(tiny_model_dir, rl_prompts_file, tmp_path):
    cfg = config(
        tiny_model_dir, rl_prompts_file, tmp_path, shared_value_head=True, reward=f"callable:{__name__}:vowel_spans"
    )
    first, last = learns(train_ppo(cfg), 20)
    assert last > first + 1.0
    assert (tmp_path / "final" / "value_head.pt").exists()


def test_reinforce_with_baseline_learns(tiny_model_dir, rl_prompts_file, tmp_path):
    cfg = config(tiny_model_dir, rl_prompts_file, tmp_path, cls=ReinforceConfig)
    assert cfg.advantage == "reinforce" and cfg.ppo_epochs == 1
    result = train_ppo(cfg)
    first, last = learns(result, 20)
    assert last > first + 1.0
    # one on-policy update per rollout: the ratio is 1 up to padding round-off, nothing is clipped
    assert max(result["history"]["policy/clip_frac"]) == 0.0


def test_resume_continues_exactly(tiny_model_dir, rl_prompts_file, tmp_path):
    """Stopped after 3 rollouts and resumed = uninterrupted: same samples, losses, adaptive β and final weights."""
    common = {"kl_target": 0.5, "kl_horizon": 100.0, "num_minibatches": 2, "ppo_epochs": 2}
    full = train_ppo(config(tiny_model_dir, rl_prompts_file, tmp_path / "a", train={"max_steps": 6}, **common))
    part = config(tiny_model_dir, rl_prompts_file, tmp_path / "b", train={"max_steps": 6, "stop_after": 3}, **common)
    assert not train_ppo(part)["finished"]
    resumed = config(tiny_model_dir, rl_prompts_file, tmp_path / "b", train={"max_steps": 6, "resume": True}, **common)
    second = train_ppo(resumed)
    assert second["finished"]
    for key in ("rewards/mean", "loss/policy", "loss/value", "objective/kl_coef"):
        torch.testing.assert_close(second["history"][key], full["history"][key][3:], msg=key)
    assert len(set(full["history"]["objective/kl_coef"])) > 1  # the adaptive β moved, so its restore is tested
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=name)


def rollout_of_two():
    """A hand-made rollout: two responses of 4 and 3 tokens, with per-token rewards of opposite signs."""
    return {
        "prompt_ids": [[1, 5], [1, 6, 7]],
        "response_ids": [[8, 9, 10, 2], [11, 12, 2]],
        "rewards": [torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 0.5])],
        "credit_rewards": [torch.tensor([1.0, 1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 0.5])],
        "score": [0.0, -1.5],
        "kl": [torch.tensor([0.1, 0.2, 0.0, 0.1]), torch.tensor([0.3, 0.0, 0.1])],
        "old_values": [torch.tensor([0.5, 0.2, 0.1, 0.0]), torch.tensor([0.0, -0.2, 0.1])],
        "old_logps": [torch.tensor([-1.0, -2.0, -1.5, -0.5]), torch.tensor([-1.0, -1.0, -3.0])],
    }


def test_credit_masks_the_policy_loss_only(tiny_model_dir, tmp_path):
    """Granularity 'token' keeps, per response, the tokens whose reward agrees with the sign of the sequence
    advantage; advantages, returns (so the value loss) and the KL-shaped rewards do not change."""
    plain = PPOConfig(model="m", k=1, whiten_advantages=False)
    token = PPOConfig(model="m", k=1, whiten_advantages=False, credit=CreditConfig(granularity="token"))
    t_plain, _ = advantages_and_masks(rollout_of_two(), plain, 0.1, tokenizer=None)
    t_token, stats = advantages_and_masks(rollout_of_two(), token, 0.1, tokenizer=None)
    for key in ("advantages", "returns", "old_values", "old_logps", "response_mask"):
        torch.testing.assert_close(t_plain[key], t_token[key], msg=key)
    # scores 0 and -1.5, batch-mean baseline -0.75: labels +1 and -1. Row 0 keeps its positive tokens, row 1 its
    # negative ones; every token of the plain run is kept.
    assert t_token["keep"].tolist() == [[True, True, False, False], [True, True, False, False]]
    assert t_plain["keep"].tolist() == [[True] * 4, [True, True, True, False]]
    assert stats["asr/kept_frac"] == pytest.approx(4 / 7)

    # One loss evaluation on a real actor-critic: the value loss is the same whatever the keep-mask, and the
    # gradient of the policy loss is zero on the masked tokens' log-probs.
    from rlxf.trainers.ppo import collate_update, load_actor_critic

    model = load_actor_critic(PPOConfig(model=str(tiny_model_dir), shared_value_head=True), None)
    with torch.no_grad():
        model.value_head.weight.normal_()  # a non-zero critic, so the value loss is not trivially equal
    counts = {"tokens": torch.tensor(7.0), "kept_tokens": torch.tensor(4.0), "sequences": 2.0, "kept_sequences": 2.0}
    losses = {}
    for name, tensors in (("plain", t_plain), ("token", t_token)):
        batch = collate_update(rollout_of_two(), tensors, [0, 1], pad_id=0)
        _, metrics = ppo_loss(model, batch, PPOConfig(model="m"), counts)
        losses[name] = metrics
    torch.testing.assert_close(losses["plain"]["loss/value"], losses["token"]["loss/value"])
    assert not torch.equal(losses["plain"]["loss/policy"], losses["token"]["loss/policy"])


def test_ppo_with_segment_credit_runs_and_logs_kept_fractions(tiny_model_dir, rl_prompts_file, tmp_path):
    credit = CreditConfig(granularity="segment", token_reward=f"callable:{__name__}:vowel_spans")
    result = train_ppo(config(tiny_model_dir, rl_prompts_file, tmp_path, credit=credit, train={"max_steps": 4}))
    history = result["history"]
    assert result["finished"] and all(map(math.isfinite, history["loss/policy"]))
    assert all(0.0 <= f <= 1.0 for f in history["asr/kept_frac"])


def test_cli_runs_ppo_and_documents_every_option(tiny_model_dir, rl_prompts_file, tmp_path):
    help_text = subprocess.run(
        [sys.executable, "-m", "rlxf.cli", "reinforce", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for option in ("--shared_value_head", "--kl_estimator", "--credit.granularity", "--train.lr", "--gamma"):
        assert option in help_text, option
    run = subprocess.run(
        [
            sys.executable, "-m", "rlxf.cli", "ppo", "--model", str(tiny_model_dir),
            "--prompts_file", str(rl_prompts_file), "--reward", f"callable:{__name__}:count_vowels",
            "--out", str(tmp_path / "cli"), "--k", "2", "--generation.max_new_tokens", "4",
            "--train.batch_size", "2", "--train.per_device_batch_size", "2", "--train.max_steps", "2",
            "--train.progress", "false", "--train.report_to", "none",
        ],
        capture_output=True, text=True, cwd=str(__import__("pathlib").Path(__file__).parent),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["finished"] is True
    assert (tmp_path / "cli" / "final" / "value_model").is_dir()

    bad = subprocess.run(
        [sys.executable, "-m", "rlxf.cli", "ppo", "--model", str(tiny_model_dir), "--prompts_file", str(rl_prompts_file)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bad.returncode == 2 and "--reward" in bad.stderr


def test_non_finite_update_mid_rollout_restores_the_rollouts_start(
    tiny_model_dir, rl_prompts_file, tmp_path, monkeypatch
):
    """Update 3 of a rollout's 4 (2 epochs × 2 minibatches) gets a NaN loss: updates 1 and 2 were already applied in
    memory, and the run must stop with the model exactly as before the rollout, saying so."""
    import rlxf.trainers.ppo as ppo
    from rlxf.engine import NonFiniteLossError

    calls = {"n": 0}
    real_loss = ppo.ppo_loss

    def nan_on_third_update(model, batch, cfg, counts):
        calls["n"] += 1
        loss, metrics = real_loss(model, batch, cfg, counts)
        return (loss * float("nan"), metrics) if calls["n"] == 3 else (loss, metrics)

    monkeypatch.setattr(ppo, "ppo_loss", nan_on_third_update)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    start = {k: v.clone() for k, v in policy.state_dict().items()}
    # per_device_batch_size 2 prompts × k 4 = 8 responses: each minibatch of 8 is one micro-batch, one loss call
    cfg = config(tiny_model_dir, rl_prompts_file, tmp_path, ppo_epochs=2, num_minibatches=2, train={"max_steps": 1})
    with pytest.raises(NonFiniteLossError, match="update 3 of 4 of rollout 1.*as they were before this rollout"):
        train_ppo(cfg, model=policy)
    assert calls["n"] == 3
    for name, value in policy.state_dict().items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0, msg=name)
