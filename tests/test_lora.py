"""LoRA adapters (`lora:` section) on every trainer: only adapters (and a reward model's head) train, the saved
adapters load with PEFT and with rlxf, `rlxf merge` writes the same model, DPO's reference is the policy with its
adapters off, and a resumed run ends where an uninterrupted one does."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlxf.engine import TrainConfig
from rlxf.errors import UserError
from rlxf.hf import load_model
from rlxf.models.lora import LoraSettings, add_lora
from rlxf.models.merge import MergeConfig, merge_to_directory
from rlxf.models.reward_model import RewardModel

LORA = LoraSettings(r=4, alpha=8.0, dropout=0.0)


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "per_device_batch_size": 8, "max_steps": 6, "lr": 1e-2, "progress": False,
                          "report_to": "none", "mixed_precision": "no"} | kw)  # fmt: skip


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def _ids(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, factworld_model_dir):
    """The FactWorld tiny Llama, plus a GPT-2 (Conv1D layers, learned positions, dropout) and a Qwen2 (attention
    biases) built from transformers configs on its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(factworld_model_dir)
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    dirs = {"llama": factworld_model_dir}
    torch.manual_seed(0)
    for kind, model in {
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4,
                                           resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, **special)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256, **special)),
    }.items():  # fmt: skip
        out = tmp_path_factory.mktemp(kind)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        dirs[kind] = out
    return dirs


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_sft_with_lora_trains_only_the_adapters_and_reloads(model_dirs, factworld_dir, tmp_path, kind):
    from peft import PeftModel

    from rlxf.trainers.sft import SFTConfig, train_sft

    base_dir = model_dirs[kind]
    base_before = _weights(load_model(base_dir))
    model = add_lora(load_model(base_dir), LORA, base_dir, seed=0)
    before = _weights(model)
    cfg = SFTConfig(model=str(base_dir), train_file=str(factworld_dir / "sft_train.jsonl"), out=str(tmp_path),
                    lora=LORA, train=_train())  # fmt: skip
    losses = train_sft(cfg, model=model)["history"]["loss/nll"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    changed = _changed(before, _weights(model))
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]

    final = tmp_path / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(final)
    batch = _ids(tok, ["the capital of", "what is the colour of the"])
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
        # PEFT's own loader, on the untouched base model
        base = AutoModelForCausalLM.from_pretrained(base_dir)
        assert _changed(base_before, _weights(base)) == set()
        peft_logits = PeftModel.from_pretrained(base, final).eval()(**batch).logits
        merged_logits = load_model(final).eval()(**batch).logits  # rlxf stages merge on load
        untrained = AutoModelForCausalLM.from_pretrained(base_dir).eval()(**batch).logits  # PEFT changed `base`
    torch.testing.assert_close(peft_logits, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged_logits, trained, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(untrained, trained, atol=1e-3)  # the adapters did something


def test_reward_model_with_lora_trains_adapters_and_head(factworld_sft_dir, factworld_dir, tmp_path):
    from rlxf.trainers.rm import RewardModelConfig, train_reward_model

    torch.manual_seed(0)
    model = add_lora(load_model(factworld_sft_dir, RewardModel.from_pretrained), LORA, factworld_sft_dir, seed=0)
    before = _weights(model)
    cfg = RewardModelConfig(model=str(factworld_sft_dir), train_file=str(factworld_dir / "preferences_train.jsonl"),
                            out=str(tmp_path), lora=LORA, train=_train(max_steps=8))  # fmt: skip
    losses = train_reward_model(cfg, model=model)["history"]["loss/bt"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    changed = _changed(before, _weights(model))
    assert any("lora_" in k for k in changed) and any("score" in k for k in changed)
    assert all("lora_" in k or "score" in k for k in changed), sorted(changed)[:5]

    tok = AutoTokenizer.from_pretrained(factworld_sft_dir)
    batch = _ids(tok, ["the capital of france is paris", "the capital of"])
    model.eval()
    merged = merge_to_directory(MergeConfig(adapters=str(tmp_path / "final"), out=str(tmp_path / "merged")))
    with torch.no_grad():
        trained = model.sequence_rewards(batch["input_ids"], batch["attention_mask"])
        for reloaded in (
            load_model(tmp_path / "final", RewardModel.from_pretrained),  # adapters merged on load (`rm:DIR`, eval)
            RewardModel.from_pretrained(merged),  # `rlxf merge`: a plain sequence-classification model
        ):
            rewards = reloaded.eval().sequence_rewards(batch["input_ids"], batch["attention_mask"])
            torch.testing.assert_close(rewards, trained, rtol=1e-4, atol=1e-4)


def test_dpo_with_lora_uses_the_policy_without_adapters_as_reference(
    factworld_sft_dir, factworld_dir, tmp_path, monkeypatch
):
    """The reference is not loaded: the policy with its adapters switched off is the starting model, so the first
    loss is ln 2 exactly (LoRA's B starts at 0) and the loss then falls."""
    import rlxf.trainers.common as common
    from rlxf.trainers.dpo import DPOConfig, train_dpo

    pairs = tmp_path / "pairs.jsonl"  # 16 pairs, seen 6 times: the loss on them must fall
    pairs.write_text("".join((factworld_dir / "preferences_train.jsonl").read_text().splitlines(True)[:16]))
    loaded: list[str] = []
    real_load = common.load_model
    monkeypatch.setattr(
        common, "load_model", lambda path, *a, **k: loaded.append(str(path)) or real_load(path, *a, **k)
    )
    for reference in ("live", "cached"):
        out = tmp_path / reference
        cfg = DPOConfig(model=str(factworld_sft_dir), train_file=str(pairs), eval_file=str(pairs), out=str(out),
                        reference=reference, lora=LORA, train=_train(max_steps=12, eval_every=12))  # fmt: skip
        history = train_dpo(cfg)["history"]
        assert history["loss/dpo"][0] == pytest.approx(math.log(2.0), abs=1e-6)
        start, end = history["eval/loss_dpo"][0], history["eval/loss_dpo"][-1]
        assert start == pytest.approx(math.log(2.0), abs=1e-6) and end < start - 0.02
        assert (out / "final" / "adapter_config.json").is_file()
    assert loaded == []  # no second model in memory


def test_dpo_with_lora_and_a_named_reference_loads_it(factworld_sft_dir, factworld_dir, tmp_path):
    from rlxf.trainers.dpo import DPOConfig, train_dpo

    cfg = DPOConfig(model=str(factworld_sft_dir), train_file=str(factworld_dir / "preferences_train.jsonl"),
                    out=str(tmp_path), reference="live", ref_model=str(factworld_sft_dir), lora=LORA,
                    train=_train(max_steps=1))  # fmt: skip
    assert train_dpo(cfg)["history"]["loss/dpo"][0] == pytest.approx(math.log(2.0), abs=1e-6)


def response_length(prompts: list[str], texts: list[str]) -> list[float]:
    return [float(len(t)) for t in texts]


@pytest.mark.parametrize("trainer", ["ppo", "ppo_shared_head", "rloo", "rejection_sampling"])
def test_online_trainers_with_lora_change_only_adapters(factworld_sft_dir, rl_prompts_file, tmp_path, trainer):
    from rlxf.trainers.ppo import PPOConfig, train_ppo
    from rlxf.trainers.rejection_sampling import RejectionSamplingConfig, train_rejection_sampling
    from rlxf.trainers.rloo import RLOOConfig, train_rloo

    common = dict(model=str(factworld_sft_dir), prompts_file=str(rl_prompts_file), out=str(tmp_path), lora=LORA,
                  reward=f"callable:{__name__}:response_length", train=_train(batch_size=4, per_device_batch_size=4, max_steps=2))  # fmt: skip
    if trainer.startswith("ppo"):
        cfg, run = PPOConfig(**common, shared_value_head=trainer == "ppo_shared_head"), train_ppo
    elif trainer == "rloo":
        cfg, run = RLOOConfig(**common), train_rloo
    else:
        cfg, run = RejectionSamplingConfig(**common), train_rejection_sampling
    policy = add_lora(load_model(factworld_sft_dir), LORA, factworld_sft_dir, seed=0)
    before = _weights(policy)
    history = run(cfg, model=policy)["history"]
    assert history and all(math.isfinite(v) for values in history.values() for v in values)
    changed = _changed(before, _weights(policy))
    assert changed and all("lora_" in k for k in changed), sorted(changed)[:5]
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    if trainer == "ppo":  # the critic is a reward model with its own adapters and head
        assert (tmp_path / "final" / "value_model" / "adapter_config.json").is_file()
        assert history["loss/value"][-1] < history["loss/value"][0]
    tok = AutoTokenizer.from_pretrained(tmp_path / "final")
    batch = _ids(tok, ["the cat is", "a pear and"])
    policy.eval()
    with torch.no_grad():  # the saved adapters reload into the policy that was trained
        torch.testing.assert_close(load_model(tmp_path / "final").eval()(**batch).logits, policy(**batch).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_resume_with_adapters_is_exact(factworld_model_dir, factworld_dir, tmp_path):
    from safetensors.torch import load_file

    from rlxf.trainers.sft import SFTConfig, train_sft

    def run(out, **kw):
        cfg = SFTConfig(model=str(factworld_model_dir), train_file=str(factworld_dir / "sft_train.jsonl"),
                        out=str(out), lora=LoraSettings(r=4, dropout=0.1), train=_train(save_every=2, **kw))  # fmt: skip
        return train_sft(cfg)

    run(tmp_path / "whole")
    assert not run(tmp_path / "cut", stop_after=3)["finished"]
    assert run(tmp_path / "cut", resume=True)["finished"]
    whole = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
    cut = load_file(tmp_path / "cut" / "final" / "adapter_model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)


def test_cli_merge_writes_a_plain_model(factworld_model_dir, factworld_dir, tmp_path):
    from peft import PeftModel

    run = [sys.executable, "-m", "rlxf.cli"]
    sft = subprocess.run(
        run + ["sft", "--model", str(factworld_model_dir), "--train_file", str(factworld_dir / "sft_train.jsonl"),
               "--out", str(tmp_path / "sft"), "--lora.r", "4", "--train.max_steps", "2", "--train.progress", "false",
               "--train.report_to", "none"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert sft.returncode == 0, sft.stderr[-2000:]
    merged = subprocess.run(run + ["merge", "--adapters", str(tmp_path / "sft" / "final"), "--out", str(tmp_path / "m")],
                            capture_output=True, text=True)  # fmt: skip
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (tmp_path / "m" / "config.json").is_file() and not (tmp_path / "m" / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    batch = _ids(tok, ["the capital of"])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(**batch).logits
        base = AutoModelForCausalLM.from_pretrained(factworld_model_dir)
        peft = PeftModel.from_pretrained(base, tmp_path / "sft" / "final").eval()(**batch).logits
    torch.testing.assert_close(plain, peft, rtol=1e-4, atol=1e-4)

    again = subprocess.run(run + ["merge", "--adapters", str(tmp_path / "m"), "--out", str(tmp_path / "x")],
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode != 0 and "is not a LoRA adapter directory" in again.stderr


def test_unknown_target_modules_are_a_clear_error(factworld_model_dir):
    with pytest.raises(UserError, match="lora.target_modules='c_attn' does not fit"):
        add_lora(load_model(factworld_model_dir), LoraSettings(r=4, target_modules="c_attn"), factworld_model_dir)


def test_bad_lora_settings_name_the_field():
    with pytest.raises(Exception, match="lora.r must be"):
        LoraSettings(r=-1)


def test_trl_peft_flags_point_to_the_lora_section():
    from rlxf.config import suggest_field
    from rlxf.trainers.dpo import DPOConfig

    assert "lora.r" in suggest_field("use_peft", DPOConfig)
    assert "lora.alpha" in suggest_field("lora_alpha", DPOConfig)
