"""--train.torch_dtype: the dtype every model of a stage is loaded in (policy, reference, reward model)."""

from __future__ import annotations

import math

import pytest
import torch

from rlxf.engine import TrainConfig
from rlxf.errors import UserError
from rlxf.hf import load_model


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"batch_size": 8, "per_device_batch_size": 8, "max_steps": 6, "lr": 3e-3, "progress": False,
                          "report_to": "none", "mixed_precision": "no"} | kw)  # fmt: skip


def test_load_kwargs_pick_the_dtype(tiny_model_dir, tmp_path):
    assert load_model(tiny_model_dir, **_train().load_kwargs()).dtype == torch.float32
    bf16 = load_model(tiny_model_dir, **_train(torch_dtype="bfloat16").load_kwargs())
    assert bf16.dtype == torch.bfloat16
    bf16.save_pretrained(tmp_path)  # a checkpoint saved in bf16: auto keeps it, float32 widens it
    assert load_model(tmp_path, **_train(torch_dtype="auto").load_kwargs()).dtype == torch.bfloat16
    assert load_model(tmp_path, **_train(torch_dtype="float32").load_kwargs()).dtype == torch.float32


def test_an_unknown_dtype_names_the_field():
    with pytest.raises(UserError, match="train.torch_dtype must be float32, bfloat16, float16 or auto"):
        _train(torch_dtype="fp8")


def test_sft_in_bf16_trains_bf16_weights(factworld_model_dir, factworld_dir, tmp_path):
    from rlxf.trainers.sft import SFTConfig, train_sft

    cfg = SFTConfig(model=str(factworld_model_dir), train_file=str(factworld_dir / "sft_train.jsonl"), out=str(tmp_path),
                    train=_train(torch_dtype="bfloat16"))  # fmt: skip
    losses = train_sft(cfg)["history"]["loss/nll"]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    saved = load_model(tmp_path / "final", **_train(torch_dtype="auto").load_kwargs())
    assert saved.dtype == torch.bfloat16


def test_dpo_reference_is_loaded_in_the_policys_dtype(factworld_sft_dir, factworld_dir, tmp_path):
    """Policy = reference in bf16: every pair's log-ratio is exactly 0, so the first loss is ln 2. A reference left in
    fp32 against a bf16 policy would not give exactly that."""
    from rlxf.trainers.dpo import DPOConfig, train_dpo

    cfg = DPOConfig(model=str(factworld_sft_dir), train_file=str(factworld_dir / "preferences_train.jsonl"),
                    out=str(tmp_path), reference="live", train=_train(max_steps=1, torch_dtype="bfloat16"))  # fmt: skip
    first = train_dpo(cfg)["history"]["loss/dpo"][0]
    assert first == pytest.approx(math.log(2.0), abs=1e-6)
