"""Model tiers of `rlxf tiny-model --size`: shapes, parameter counts, determinism, loadable by transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlxf.errors import UserError
from rlxf.models.tiny import MODEL_SIZES, TinyModelConfig, build_tiny_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_each_size_sets_the_documented_shape():
    for name, shape in MODEL_SIZES.items():
        cfg = TinyModelConfig(size=name)
        assert {k: getattr(cfg, k) for k in shape} == shape


@pytest.mark.parametrize(
    "size, expected",
    # Hand count, vocabulary 512 (tied embeddings): V·h + L·(4h² + 3h·m + 2h) + h. The docstring of MODEL_SIZES
    # quotes these rounded.
    [
        ("tiny", 512 * 128 + 2 * (4 * 128**2 + 3 * 128 * 512 + 2 * 128) + 128),
        ("small", 512 * 192 + 4 * (4 * 192**2 + 3 * 192 * 768 + 2 * 192) + 192),
        ("base", 512 * 256 + 6 * (4 * 256**2 + 3 * 256 * 1024 + 2 * 256) + 256),
    ],
)
def test_parameter_count_matches_the_hand_count(size, expected):
    tokenizer = _tokenizer_with_vocab(512)
    model = build_tiny_model(tokenizer, TinyModelConfig(size=size))
    assert n_params(model) == expected
    assert round(expected / 1e6, 2) == {"tiny": 0.59, "small": 2.46, "base": 6.43}[size]


def _tokenizer_with_vocab(n: int):
    """A tokenizer stand-in with `n` tokens (only its length and special ids reach build_tiny_model)."""

    class Vocab:
        bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

        def __len__(self) -> int:
            return n

    return Vocab()


def test_size_and_shape_flags_together_are_an_error():
    with pytest.raises(UserError, match="do not also pass hidden_size"):
        TinyModelConfig(size="small", hidden_size=100)
    with pytest.raises(UserError, match="size must be one of tiny, small, base"):
        TinyModelConfig(size="huge")
    # Restating the tier's own value is not a conflict.
    assert TinyModelConfig(size="small", layers=4).layers == 4


def test_cli_builds_a_tier_that_transformers_loads_deterministically(tmp_path, factworld_dir):
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "rlxf.cli", "tiny-model", "--corpus", str(factworld_dir / "corpus.txt")]
        cmd += ["--out", str(out), "--size", "small", "--vocab_size", "256", "--seed", "3"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        outs.append(out)
    models = [AutoModelForCausalLM.from_pretrained(o) for o in outs]
    assert models[0].config.num_hidden_layers == 4 and models[0].config.hidden_size == 192
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(p, q)
    tokenizer = AutoTokenizer.from_pretrained(outs[0])
    ids = tokenizer("Q: What is the colour of Zorbin?\nA:", return_tensors="pt").input_ids
    assert models[0](ids).logits.shape == (1, ids.shape[1], len(tokenizer))
    other = build_tiny_model(tokenizer, TinyModelConfig(size="small", seed=4))
    assert not torch.equal(next(other.parameters()), next(models[0].parameters()))


def test_help_documents_size():
    out = subprocess.run(
        [sys.executable, "-m", "rlxf.cli", "tiny-model", "--help"], check=True, capture_output=True, text=True
    ).stdout
    assert "--size" in out and "small" in out
