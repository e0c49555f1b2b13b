"""Shared fixtures: a tiny tokenizer and Llama built locally (nothing is downloaded)."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="session")
def factworld_dir(tmp_path_factory):
    """A small FactWorld (a few hundred rows) written to disk."""
    from rlxf.worlds.factworld import FactWorldConfig, write_factworld

    out = tmp_path_factory.mktemp("factworld")
    cfg = FactWorldConfig(seed=0, num_train_prompts=40, num_test_prompts=30, pairs_per_prompt=2, num_sft_retain=60)
    write_factworld(cfg, out)
    return out


@pytest.fixture(scope="session")
def factworld_model_dir(tmp_path_factory, factworld_dir):
    """An untrained tiny Llama whose tokenizer was trained on the small FactWorld's corpus."""
    from rlxf.models.tiny import make_tiny_model

    out = tmp_path_factory.mktemp("factworld-model")
    cfg = TinyModelConfig(
        corpus=str(factworld_dir / "corpus.txt"), out=str(out), vocab_size=256, hidden_size=32, intermediate_size=64
    )
    return make_tiny_model(cfg)


@pytest.fixture(scope="session")
def factworld_sft_dir(tmp_path_factory, factworld_model_dir, factworld_dir):
    """The tiny FactWorld model after a short SFT: it knows the answer format (a realistic RM / DPO start)."""
    from rlxf.engine import TrainConfig
    from rlxf.trainers.sft import SFTConfig, train_sft

    out = tmp_path_factory.mktemp("factworld-sft")
    train = TrainConfig(max_steps=60, batch_size=16, per_device_batch_size=16, lr=3e-3, warmup_steps=5,
                        progress=False, report_to="none")  # fmt: skip
    train_sft(SFTConfig(model=str(factworld_model_dir), train_file=str(factworld_dir / "sft_train.jsonl"),
                        out=str(out), train=train))  # fmt: skip
    return out / "final"


@pytest.fixture(scope="session")
def factworld_rm_dir(tmp_path_factory, factworld_sft_dir):
    """A reward model started from the small SFT model (fresh, seeded head): distinct scores for distinct texts."""
    from rlxf.hf import load_tokenizer
    from rlxf.models.reward_model import RewardModel

    out = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    rm = RewardModel.from_pretrained(factworld_sft_dir)
    torch.nn.init.normal_(rm.hf.score.weight, std=1.0)
    rm.save_pretrained(out)
    load_tokenizer(factworld_sft_dir).save_pretrained(out)
    return out


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine two threads that wait on each
    other at every op ran 10-20× slower whenever another process held a core. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rl_prompts_file(tmp_path_factory):
    """Six short RL prompts (JSONL) for the online-RL trainers' tiny runs."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    prompts = ["the cat is", "what colour is the dog", "a pear and", "the city of", "oslo is", "the food of a"]
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


@pytest.fixture
def factworld_base_dir(tmp_path, factworld_dir, factworld_model_dir, factworld_sft_dir, factworld_rm_dir):
    """A finished shared base of the small world, in the layout `experiments/common.factworld_base` reuses (its
    stages are skipped): what the experiments' smoke runs start from."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(factworld_dir, base / "world")
    shutil.copytree(factworld_model_dir, base / "tiny")
    shutil.copytree(factworld_sft_dir, base / "sft" / "final")
    shutil.copytree(factworld_rm_dir, base / "rm" / "final")
    shutil.copy(factworld_dir / "preferences_train.jsonl", base / "pairs.jsonl")
    return base
