"""--train.gradient_checkpointing: the same gradients and the same training as without, on every model kind rlxf
trains (Llama, GPT-2, Qwen2, a RewardModel's backbone), and a clear error where there is nothing to checkpoint."""

from __future__ import annotations

import pytest
import torch
from engine_toy import run_toy
from test_engine import first_step_gradients
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from rlxf.engine import enable_gradient_checkpointing
from rlxf.errors import UserError
from rlxf.models.reward_model import RewardModel


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # fmt: skip
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))  # fmt: skip


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether any block of `model` recomputes its activations in the backward pass (any transformers version)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "qwen2"])
def test_same_gradients_with_checkpointing(kind):
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    model = _model(kind)
    plain = _grads(model, ids)
    assert not is_checkpointing(model)
    assert enable_gradient_checkpointing(model) >= 1 and is_checkpointing(model)
    checkpointed = _grads(model, ids)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_reward_model_backbone_is_found(tiny_model_dir):
    rm = RewardModel.from_pretrained(tiny_model_dir)
    assert enable_gradient_checkpointing(rm) >= 1 and is_checkpointing(rm.hf)


def test_a_model_without_transformers_blocks_is_a_clear_error():
    with pytest.raises(UserError, match="gradient_checkpointing.*holds no transformers model"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_engine_trains_the_same_with_checkpointing(tiny_model_dir, tmp_path):
    fp32 = {"mixed_precision": "no", "max_grad_norm": 0}
    plain = first_step_gradients(tiny_model_dir, tmp_path / "a", **fp32)
    checkpointed = first_step_gradients(tiny_model_dir, tmp_path / "b", gradient_checkpointing=True, **fp32)
    assert plain.keys() == checkpointed.keys() and len(plain) > 10
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    losses_plain, _ = run_toy(tiny_model_dir, tmp_path / "c", max_steps=3, mixed_precision="no")
    losses_ckpt, model = run_toy(tiny_model_dir, tmp_path / "d", max_steps=3, mixed_precision="no",
                                 gradient_checkpointing=True)  # fmt: skip
    assert is_checkpointing(model)
    torch.testing.assert_close(torch.tensor(losses_ckpt), torch.tensor(losses_plain), rtol=1e-5, atol=1e-6)
