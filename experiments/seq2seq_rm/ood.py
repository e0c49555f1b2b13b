"""Out of distribution: how well do reward models judge answers about entities their training pairs never mention?

The seq2seq RM paper (arXiv 2409.00162) reports that its reward model generalises better than a scalar one. In
FactWorld every (entity, attribute) of the held-out pairs also occurs in the training pairs (40 entities × 4
attributes, all seen), so an out-of-distribution test has to hold entities out. This script:

1. Holds out a fixed quarter of the knowledge base's entities (every 4th in the KB's order, decided before any run:
   no choice by result) and removes every training pair whose prompt asks about one of them (list prompts stay).
   The SFT policy, the RMs' starting point, still saw those entities in its own data, as a pre-trained model knows
   more than its preference data covers.
2. Trains three reward models from the SFT policy on the remaining pairs, with the human's sampled choices: the
   scalar BT RM (the demo's recipe), the likelihood-ratio RM (`rlxf dpo`, its recipe in `experiments/common.py`) and
   the seq2seq RM (`common.seq2seq_rm_config`).
3. Scores the 915 held-out pairs, split into fact pairs about held-out entities (out of distribution), fact pairs
   about the other entities (in distribution) and list pairs: pairwise accuracy against the human and against gold,
   mean of 3 training seeds.

    python experiments/seq2seq_rm/ood.py          # ≈ 4 min on 2 CPU cores (the shared base reused)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from experiments.common import (  # noqa: E402
    factworld_base,
    implicit_rm,
    pair_outcomes,
    read_jsonl,
    scalar_rm,
    seq2seq_rm,
    write_results_block,
)
from rlxf.data.formats import write_jsonl  # noqa: E402
from rlxf.hf import load_tokenizer  # noqa: E402
from rlxf.rewards.sources import build_reward_source  # noqa: E402
from rlxf.worlds.factworld import load_factworld  # noqa: E402

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("ood")
SPLITS = ("out of distribution", "in distribution", "list")


def held_out_entities(world) -> set[str]:
    """Every 4th entity of the knowledge base, in its own order."""
    return set(list(world.kb.entities)[::4])


def split_of(world, pair: dict[str, Any], held_out: set[str]) -> str:
    row = world.row_for(pair)
    if row["kind"] != "fact":
        return "list"
    return "out of distribution" if row["entity"] in held_out else "in distribution"


def train_rms(sft: Path, train_file: Path, out: Path, seed: int = 0) -> dict[str, str]:
    """The three reward models on `train_file`; returns their reward specs."""
    return {
        "scalar BT RM": f"rm:{scalar_rm(sft, train_file, out / 'rm', seed)}",
        "likelihood-ratio RM": f"dpo:{implicit_rm(sft, train_file, out / 'implicit_rm', seed)}:{sft}",
        "seq2seq RM": f"seq2seq:{seq2seq_rm(sft, train_file, out / 'seq2seq_rm', seed)}",
    }


def accuracy_by_split(pairs: list[dict[str, Any]], results: list[float], splits: list[str]) -> dict[str, Any]:
    human: dict[str, list[float]] = defaultdict(list)
    gold: dict[str, list[float]] = defaultdict(list)
    for p, r, s in zip(pairs, results, splits):
        human[s].append(r)
        if p["gold_chosen"] != p["gold_rejected"]:
            gold[s].append(r if p["gold_chosen"] > p["gold_rejected"] else 1.0 - r)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {s: {"pairs": len(human[s]), "accuracy_human": mean(human[s]), "accuracy_gold": mean(gold[s])}
            for s in SPLITS}  # fmt: skip


def mean_over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {s: {"pairs": runs[0][s]["pairs"], **{k: sum(r[s][k] for r in runs) / len(runs)
                                                  for k in ("accuracy_human", "accuracy_gold")}}
            for s in SPLITS}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/experiments/base", help="shared FactWorld base (built if missing)")
    p.add_argument("--out", default="runs/experiments/ood", help="run directory (never committed)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the reward models")
    p.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("rlxf", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    out = Path(args.out)
    base = factworld_base(args.base, progress=False)
    world = load_factworld(base["world"])
    held_out = held_out_entities(world)
    train = read_jsonl(base["world"] / "preferences_train.jsonl")
    kept = [r for r in train if split_of(world, r, held_out) != "out of distribution"]
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "preferences_train.jsonl", kept)
    logger.info("held out %d of %d entities; %d of %d training pairs kept", len(held_out), len(world.kb.entities),
                len(kept), len(train))  # fmt: skip
    test = read_jsonl(base["world"] / "preferences_test.jsonl")
    splits = [split_of(world, r, held_out) for r in test]
    tokenizer = load_tokenizer(base["sft"])
    per_seed: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for seed in args.seeds:
        specs = train_rms(base["sft"], out / "preferences_train.jsonl", out / f"seed{seed}", seed)
        for name, spec in specs.items():
            results = pair_outcomes(build_reward_source(spec, device="cpu"), test, tokenizer)
            per_seed[name].append(accuracy_by_split(test, results, splits))
    table = {name: mean_over_seeds(runs) for name, runs in per_seed.items()}
    gold = [1.0 if r["gold_chosen"] > r["gold_rejected"] else 0.5 if r["gold_chosen"] == r["gold_rejected"] else 0.0
            for r in test]  # fmt: skip
    table = {"gold scorer (the ceiling under label noise)": accuracy_by_split(test, gold, splits), **table}
    results = {"table": table, "per_seed": per_seed, "seeds": args.seeds, "held_out_entities": sorted(held_out),
               "train_pairs": [len(kept), len(train)], "minutes": (time.perf_counter() - t0) / 60}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    block = render(results)
    print(block)
    if not args.no_readme:
        write_results_block(HERE / "README.md", "ood", block)
    return results


def render(results: dict[str, Any]) -> str:
    first = next(iter(results["table"].values()))
    lines = ["| judge | " + " | ".join(f"{s} ({first[s]['pairs']} pairs): human / gold" for s in SPLITS) + " |",
             "|---" * (len(SPLITS) + 1) + "|"]  # fmt: skip
    for name, row in results["table"].items():
        cells = [f"{row[s]['accuracy_human']:.3f} / {row[s]['accuracy_gold']:.3f}" for s in SPLITS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    kept, total = results["train_pairs"]
    return (
        f"Held-out entities: {len(results['held_out_entities'])} ({', '.join(results['held_out_entities'])}); "
        f"training pairs kept: {kept} of {total}. Mean of reward models trained with seeds {results['seeds']}. Total "
        f"{results['minutes']:.1f} min.\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
