"""Where should a reward model read its reward? The final token (rlxf's and TRL's default) against a sum of per-token
head outputs over the response, on FactWorld's own preference pairs.

The knowledge table (`knowledge.py`) found the RM's backbone knows 99% of the facts, yet every RM is at chance on
pairs that differ only in a stated value. A reward read at the final token must carry "one of the values said
earlier was wrong" through the last position of a 2-layer model; a reward summed over the response lets the head
act at the value token itself, where the backbone's knowledge is. This trains the same RM recipe with each reading
and reports held-out accuracy by pair type (`value` / `length` / `both`) against the simulated human and gold.

    python experiments/judges/rm_reading.py --world runs/demo/world --sft runs/demo/sft/final \\
        --out runs/experiments/judges/rm_reading.json          # ≈ 4 min per reading on 2 CPU cores

`--readings last sum mean`: `last` = the value at the final token; `sum` = Σ over response tokens; `mean` = the
sum over the response length.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from experiments.common import read_jsonl  # noqa: E402
from experiments.judges.knowledge import PAIR_TYPES, accuracy_by_type, gold_ceiling  # noqa: E402
from rlxf.data.tokenize import encode_preferences, pad  # noqa: E402
from rlxf.hf import load_model, load_tokenizer  # noqa: E402
from rlxf.losses import bradley_terry_losses, pairwise_accuracy  # noqa: E402
from rlxf.models.reward_model import RewardModel  # noqa: E402

READINGS = ("last", "sum", "mean")


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """2B right-padded sequences (chosen first) with a mask of the response tokens."""
    seqs, response = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for r in rows:
            seqs.append(r["prompt_ids"] + r[side])
            response.append([0] * len(r["prompt_ids"]) + [1] * len(r[side]))
    ids, attention = pad(seqs, pad_id, side="right")
    response_mask, _ = pad(response, 0, side="right")
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response_mask.float()}


def read(values: torch.Tensor, batch: dict[str, torch.Tensor], reading: str) -> torch.Tensor:
    """(2B, T) per-position head outputs -> (2B,) rewards."""
    if reading == "last":
        last = batch["attention_mask"].sum(-1) - 1
        return values.gather(-1, last[:, None]).squeeze(-1)
    total = (values * batch["response_mask"]).sum(-1)
    return total if reading == "sum" else total / batch["response_mask"].sum(-1).clamp(min=1)


def train_rm(args, reading: str, train_rows, tokenizer) -> RewardModel:
    torch.manual_seed(args.seed)
    model = load_model(args.sft, RewardModel.from_pretrained, "reward model")
    model.config.pad_token_id = tokenizer.pad_token_id
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    order = list(range(len(train_rows)))
    steps = math.ceil(args.epochs * len(order) / args.batch_size)
    rng = random.Random(args.seed)
    model.train()
    queue: list[int] = []
    for _ in tqdm(range(steps), desc=f"RM ({reading})", dynamic_ncols=True, leave=False):
        if len(queue) < args.batch_size:
            rng.shuffle(order)
            queue += order
        chunk = [train_rows[i] for i in queue[: args.batch_size]]
        del queue[: args.batch_size]
        batch = collate(chunk, tokenizer.pad_token_id)
        rewards = read(model(batch["input_ids"], batch["attention_mask"]), batch, reading)
        chosen, rejected = rewards.chunk(2)
        label_prob = torch.tensor([float(r.get("label_prob", 1.0)) for r in chunk]) if args.soft_labels else None
        loss = bradley_terry_losses(chosen, rejected, label_prob=label_prob).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return model.eval()


@torch.no_grad()
def evaluate(model: RewardModel, reading: str, rows, raw, pad_id: int) -> dict[str, Any]:
    outcomes: list[float] = []
    for i in range(0, len(rows), 64):
        batch = collate(rows[i : i + 64], pad_id)
        chosen, rejected = read(model(batch["input_ids"], batch["attention_mask"]), batch, reading).chunk(2)
        outcomes += pairwise_accuracy(chosen, rejected, reduction="none").tolist()
    return accuracy_by_type(raw, outcomes)


def markdown(result: dict[str, Any]) -> str:
    def f(x):
        return "–" if x is None else f"{x:.3f}"

    lines = [
        "| reading | vs human | vs gold | value: human / gold | length: human / gold | both: human / gold | min |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    g = result["gold_ceiling"]
    lines.append(f"| gold scorer | {f(g['accuracy_human'])} | 1 | "
                 + " | ".join(f"{f(g['by_type'][t])} / 1" for t in PAIR_TYPES) + " | – |")  # fmt: skip
    for reading, r in result["readings"].items():
        by = r["by_type"]
        lines.append(f"| {reading} | {f(r['accuracy_human'])} | {f(r['accuracy_gold'])} | "
                     + " | ".join(f"{f(by[t]['accuracy_human'])} / {f(by[t]['accuracy_gold'])}" for t in PAIR_TYPES)
                     + f" | {r['minutes']:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="a FactWorld directory (preferences_train / _test.jsonl)")
    p.add_argument("--sft", required=True, help="the RM's starting point (the demo's SFT policy)")
    p.add_argument("--out", required=True, help="JSON result path")
    p.add_argument("--readings", nargs="+", default=list(READINGS), choices=READINGS)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--soft-labels", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--train-rows", type=int, default=0, help="use the first N training pairs (0: all)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    world = Path(args.world)
    tokenizer = load_tokenizer(args.sft)
    train_raw = read_jsonl(world / "preferences_train.jsonl")
    train_raw = train_raw[: args.train_rows] if args.train_rows else train_raw
    test_raw = read_jsonl(world / "preferences_test.jsonl")
    train_rows = [r | {"label_prob": raw.get("label_prob", 1.0)}
                  for r, raw in zip(encode_preferences(train_raw, tokenizer), train_raw)]  # fmt: skip
    test_rows = encode_preferences(test_raw, tokenizer)
    result: dict[str, Any] = {"args": vars(args), "gold_ceiling": gold_ceiling(test_raw), "readings": {}}
    for reading in args.readings:
        t0 = time.perf_counter()
        model = train_rm(args, reading, train_rows, tokenizer)
        result["readings"][reading] = evaluate(model, reading, test_rows, test_raw, tokenizer.pad_token_id)
        result["readings"][reading]["minutes"] = (time.perf_counter() - t0) / 60
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
