"""The seq2seq reward model as a judge on FactWorld: does a model that rewrites rejected answers into chosen ones
know which tokens are wrong?

The seq2seq RM (`rlxf seq2seq-rm`, `docs/methods/seq2seq_rm.md`) starts from the SFT checkpoint, which states 99% of
the world's facts (`knowledge.py`), and learns by sequence MLE to rewrite each rejected answer into the chosen one
(and each chosen one into itself). Like the likelihood-ratio RM (`implicit_rm.py`) it reads the LM head, token by
token, where the knowledge is, and unlike it, it needs no reference model and gives ±token rewards directly.

It trains the RM on the world's own training pairs (`preferences_train.jsonl`: simulated-human labels with their
`label_prob`, never the gold score) for each (lr, epochs) setting and seed, then measures on the 915 held-out pairs
(`preferences_test.jsonl`, never trained on):
- pairwise accuracy of R(y) = Σ_t r_t against the simulated human (ties ½) and against gold, by pair type (as
  `knowledge.py`), for the reward variants A (the default), B and soft;
- the sanity metrics of the method page (§2.6): copy rate on chosen, flag rates and their gap;
- the precision / recall of its negative adaptive segments against the gold wrong-fact spans (`rlxf segments
  quality`, granularity `segment`, variant A), beside the other judges' in `README.md`.

    python experiments/judges/seq2seq_judge.py --world runs/demo/world --sft runs/demo/sft/final \\
        --out runs/experiments/judges/seq2seq_rm          # ≈ 2 min per setting and seed on 2 CPU cores

The first setting is the recipe of `experiments/common.factworld_seq2seq_rm` (the one PPO uses), chosen before any
of these numbers were seen: the likelihood-ratio RM's lr and epochs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.common import pair_outcomes, read_jsonl, seq2seq_rm  # noqa: E402
from experiments.judges.knowledge import PAIR_TYPES, accuracy_by_type, gold_ceiling  # noqa: E402
from rlxf.credit.inspect import SegmentQualityConfig, run_segment_quality  # noqa: E402
from rlxf.credit.segments import CreditConfig  # noqa: E402
from rlxf.data.tokenize import encode_preferences  # noqa: E402
from rlxf.hf import load_tokenizer  # noqa: E402
from rlxf.rewards.seq2seq import Seq2SeqRewardSource, sanity_metrics  # noqa: E402

VARIANTS = ("A", "B", "soft")


def train_judge(args, lr: float, epochs: float, seed: int, out: Path) -> Path:
    return seq2seq_rm(args.sft, Path(args.world) / "preferences_train.jsonl", out, seed, args.progress, lr, epochs)


def pair_accuracy(judge: Path, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of R(y) = Σ_t r_t on held-out pairs for each variant, and the sanity metrics (variant A)."""
    tokenizer = load_tokenizer(judge)
    result: dict[str, Any] = {}
    for variant in VARIANTS:
        source = Seq2SeqRewardSource(judge, variant=variant, device="cpu")
        result[variant] = accuracy_by_type(pairs, pair_outcomes(source, pairs, tokenizer))
        if variant == "A":
            rows = encode_preferences(pairs, tokenizer)
            result["sanity"] = sanity_metrics(source.model, source.template, rows, tokenizer.pad_token_id)
    return result


def increments(judge: Path, args) -> dict[str, float]:
    quality = run_segment_quality(SegmentQualityConfig(
        world=args.world, model=args.sft, credit=CreditConfig(granularity="segment", token_reward=f"seq2seq:{judge}"),
        granularities=["segment"]))["by_granularity"]["segment"]  # fmt: skip
    return {"precision": quality["precision"], "recall": quality["recall"]}


def mean_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def avg(get) -> float:
        return statistics.mean(get(r) for r in runs)

    out: dict[str, Any] = {
        "precision": avg(lambda r: r["precision"]),
        "recall": avg(lambda r: r["recall"]),
        "sanity": {k: avg(lambda r, k=k: r["sanity"][k]) for k in runs[0]["sanity"]},
    }
    for v in VARIANTS:
        out[v] = {
            "accuracy_human": avg(lambda r, v=v: r[v]["accuracy_human"]),
            "accuracy_gold": avg(lambda r, v=v: r[v]["accuracy_gold"]),
            "by_type": {
                t: {
                    k: avg(lambda r, v=v, t=t, k=k: r[v]["by_type"][t][k]) for k in ("accuracy_human", "accuracy_gold")
                }
                for t in PAIR_TYPES
            },  # fmt: skip
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    g = result["gold_ceiling"]
    lines = [
        "| judge | seeds | vs human | vs gold | value: human / gold | length: human / gold | both: human / gold "
        "| segment precision / recall | copy rate chosen | flag rate gap |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| gold scorer | – | {g['accuracy_human']:.3f} | 1 | "
        + " | ".join(f"{g['by_type'][t]:.3f} / 1" for t in PAIR_TYPES) + " | 1 / 1 | – | – |",
    ]  # fmt: skip
    for name, s in result["settings"].items():
        m = s["mean"]
        for v in VARIANTS:
            a = m[v]
            credit = f"{m['precision']:.3f} / {m['recall']:.3f}" if v == "A" else "–"
            sanity = (f"{m['sanity']['copy_rate_chosen']:.3f} | {m['sanity']['flag_rate_gap']:.3f}" if v == "A"
                      else "– | –")  # fmt: skip
            lines.append(f"| seq2seq RM, {name}, variant {v} | {len(s['runs'])} | {a['accuracy_human']:.3f} | "
                         f"{a['accuracy_gold']:.3f} | "
                         + " | ".join(f"{a['by_type'][t]['accuracy_human']:.3f} / {a['by_type'][t]['accuracy_gold']:.3f}"
                                      for t in PAIR_TYPES)
                         + f" | {credit} | {sanity} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="FactWorld directory (preferences_train / _test.jsonl, kb.json)")
    p.add_argument("--sft", required=True, help="the RM's starting point (the SFT policy; same tokenizer)")
    p.add_argument("--out", required=True, help="run directory (RMs and results.json)")
    p.add_argument("--settings", nargs="+", default=["1e-4:2", "1e-3:2"],
                   help="LR:EPOCHS of each RM; the first is the recipe PPO uses (experiments/common.py)")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--limit", type=int, default=0, help="held-out pairs to score (0: all 915)")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.out)
    pairs = read_jsonl(Path(args.world) / "preferences_test.jsonl")
    pairs = pairs[: args.limit] if args.limit else pairs
    result: dict[str, Any] = {"args": vars(args), "gold_ceiling": gold_ceiling(pairs), "settings": {}}
    t0 = time.perf_counter()
    for setting in args.settings:
        lr, epochs = (float(x) for x in setting.split(":"))
        name = f"lr {lr:g}, {epochs:g} epochs"
        runs = []
        for seed in args.seeds:
            judge = train_judge(args, lr, epochs, seed, out / f"lr{lr:g}_e{epochs:g}_seed{seed}")
            runs.append({"seed": seed, **pair_accuracy(judge, pairs), **increments(judge, args)})
        result["settings"][name] = {"runs": runs, "mean": mean_of(runs)}
    result["minutes"] = (time.perf_counter() - t0) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
