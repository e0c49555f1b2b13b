"""Shared fixtures: a tiny tokenizer and Llama built locally (nothing is downloaded)."""

from __future__ import annotations

import os
import random

import pytest
import torch

from rlxf.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = "red blue green cat dog fish apple pear plum paris rome oslo the is of and a what colour city pet food".split()


def toy_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + "." for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(toy_corpus(), vocab_size=160)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A save_pretrained directory holding the tiny tokenizer and an untrained 2-layer Llama."""
    out = tmp_path_factory.mktemp("tiny-model")
    model = build_tiny_model(tiny_tokenizer, TinyModelConfig(hidden_size=32, intermediate_size=64, heads=4, layers=2))
    tiny_tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    return out
