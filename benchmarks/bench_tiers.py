"""CPU cost of the `rlxf tiny-model --size` tiers: one training step (forward, backward, AdamW) per tier.

    .venv/bin/python benchmarks/bench_tiers.py --threads 2        # ~20 s

Each tier is built with a 512-token vocabulary (tied embeddings, as `rlxf tiny-model` builds it) and trained on a
fixed batch of random ids (`--batch-size` × `--seq-len`); the mean over `--steps` steps after `--warmup` is reported
with tokens per second. Tokens are random because only the shapes matter for the time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rlxf.models.tiny import MODEL_SIZES, TinyModelConfig, build_tiny_model  # noqa: E402


class _Vocab:
    """What build_tiny_model reads from a tokenizer: its length and special ids."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--batch-size", type=int, default=32, help="rows per step")
    p.add_argument("--seq-len", type=int, default=48, help="tokens per row")
    p.add_argument("--steps", type=int, default=10, help="timed steps per tier")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = _Vocab(512)
    ids = torch.randint(0, len(vocab), (args.batch_size, args.seq_len))
    rows = []
    print("| tier | parameters | ms per step | tokens/s |\n|---|---:|---:|---:|")
    for size in MODEL_SIZES:
        model = build_tiny_model(vocab, TinyModelConfig(size=size))
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimiser.step()
            optimiser.zero_grad()
        seconds = (time.perf_counter() - start) / args.steps
        row = {"tier": size, "parameters": sum(p.numel() for p in model.parameters()), "seconds_per_step": seconds}
        rows.append(row)
        print(f"| {size} | {row['parameters']:,} | {seconds * 1000:.0f} | {ids.numel() / seconds:,.0f} |")
    return rows


if __name__ == "__main__":
    main()
