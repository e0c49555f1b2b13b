"""A toy SFT problem for engine tests: random token rows on the tiny model, trained through `Engine` directly.

Also runnable as a script, so the multi-process test can start it under torchrun:
    python -m torch.distributed.run --nproc_per_node 2 tests/engine_toy.py MODEL_DIR OUT_DIR PER_DEVICE_BATCH_SIZE RESULT_JSON
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rlxf.engine import Engine, TrainConfig, end_distributed_run
from rlxf.trainers.sft import collate_sft, completion_nll


def toy_rows(vocab_size: int, n: int = 24, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(10, vocab_size) for _ in range(rng.randint(2, 6))]
        completion = [rng.randrange(10, vocab_size) for _ in range(rng.randint(1, 8))]
        rows.append({"input_ids": prompt + completion, "completion_mask": [0] * len(prompt) + [1] * len(completion)})
    return rows


def run_toy(model_dir, out_dir, **train_overrides) -> tuple[list[float], torch.nn.Module]:
    """Train the toy problem; returns the loss at every step and the trained model."""
    cfg = TrainConfig(
        **{"batch_size": 8, "per_device_batch_size": 8, "max_steps": 6, "lr": 1e-2, "progress": False}
        | train_overrides
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = toy_rows(model.config.vocab_size)
    engine = Engine(cfg, out_dir, model, num_examples=len(rows))
    policy = engine.model

    def loss_fn(batch):
        nll, _ = completion_nll(policy, batch)
        return nll, {"loss/nll": nll.detach()}

    for micro in engine.steps(rows, lambda b: collate_sft(b, pad_id=0), [len(r["input_ids"]) for r in rows]):
        engine.train_step(micro, loss_fn)
    engine.close()
    return engine.history.get("loss/nll", []), engine.unwrap()


if __name__ == "__main__":
    model_dir, out_dir, per_device, result = sys.argv[1:5]
    import torch.distributed as dist

    losses, model = run_toy(model_dir, out_dir, per_device_batch_size=int(per_device), max_steps=4)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if losses:  # rank 0 only
        Path(result).write_text(json.dumps({"losses": losses, "world_size": world_size}))
    end_distributed_run()  # a gloo launch can abort at exit after a finished run (see its docstring)
