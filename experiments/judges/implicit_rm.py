"""A reward model that reads what it judges: the Bradley–Terry reward parameterised as a likelihood ratio.

`knowledge.py` found the SFT checkpoint knows 99% of FactWorld's facts, yet every scalar-head reward model trained
from it is at chance on pairs that differ only in a stated value, and `rm_reading.py` found that where the scalar
head is read (last token, sum, mean over the response) does not change that. This script trains the other
parameterisation of the same Bradley–Terry model: r(x, y) = β·log π_θ(y|x)/π_ref(y|x), with π_θ and π_ref starting
from the SFT checkpoint. Maximising the BT likelihood of the pairs under this r is exactly DPO's loss (Rafailov et
al. 2023, eq. 7), so the judge is trained by `rlxf dpo` and read by the `dpo:DIR` reward source; its reward reads the
LM head, where the knowledge is, token by token.

It trains the judge on the world's own training pairs (`preferences_train.jsonl`: simulated-human labels, never the
gold score) for each (lr, epochs) setting and seed, then measures on the 915 held-out pairs
(`preferences_test.jsonl`, never trained on):
- pairwise accuracy against the simulated human (ties ½) and against gold, by pair type (as `knowledge.py`);
- the precision / recall of its negative adaptive segments against the gold wrong-fact spans (`rlxf segments
  quality`, granularity `segment`), i.e. how well its token increments find the wrong facts.

    python experiments/judges/implicit_rm.py --world runs/demo/world --sft runs/demo/sft/final \\
        --out runs/experiments/judges/implicit_rm            # ≈ 2 min per setting and seed on 2 CPU cores

The first setting's mean over seeds is written to experiments/judges.json (`rm_accuracy_human_heldout`,
`rm_accuracy_gold_heldout`, `increment_precision`, `increment_recall`) with this command.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.common import implicit_rm, pair_outcomes, read_jsonl, update_judges_json  # noqa: E402
from experiments.judges.knowledge import PAIR_TYPES, accuracy_by_type, gold_ceiling  # noqa: E402
from experiments.rlaif.judge import simulated_human_pairs  # noqa: E402
from rlxf.credit.inspect import SegmentQualityConfig, run_segment_quality  # noqa: E402
from rlxf.credit.segments import CreditConfig  # noqa: E402
from rlxf.data.formats import write_jsonl  # noqa: E402
from rlxf.hf import load_tokenizer  # noqa: E402
from rlxf.rewards.sources import DPOImplicitRewardSource  # noqa: E402

JUDGES_JSON = ROOT / "experiments" / "judges.json"


def training_pairs(world: Path, extra_pairs_per_prompt: int, out: Path) -> Path:
    """The world's `preferences_train.jsonl`, plus `extra_pairs_per_prompt` new draws per training prompt of the
    world's own generator and simulated human (`simulated_human_pairs`: training prompts only, so never a held-out
    pair; labels from the simulated human, never gold). The world can draw as many pairs as asked."""
    world_pairs = world / "preferences_train.jsonl"
    if not extra_pairs_per_prompt:
        return world_pairs
    path = out / f"preferences_train_plus{extra_pairs_per_prompt}.jsonl"
    if not path.exists():
        extra = simulated_human_pairs(world, extra_pairs_per_prompt, seed=0, stream="implicit-rm")
        write_jsonl(path, read_jsonl(world_pairs) + extra)
    return path


def pair_accuracy(judge: Path, sft: str, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy of the summed implicit reward on held-out pairs, against the human labels and gold, by pair type."""
    source = DPOImplicitRewardSource(judge, sft, device="cpu")
    return accuracy_by_type(pairs, pair_outcomes(source, pairs, load_tokenizer(judge)))


def increments(judge: Path, args) -> dict[str, float]:
    quality = run_segment_quality(SegmentQualityConfig(
        world=args.world, model=args.sft, credit=CreditConfig(granularity="segment", token_reward=f"dpo:{judge}:{args.sft}"),
        granularities=["segment"]))["by_granularity"]["segment"]  # fmt: skip
    return {"precision": quality["precision"], "recall": quality["recall"]}


def markdown(result: dict[str, Any]) -> str:
    g = result["gold_ceiling"]
    lines = [
        "| judge | seeds | vs human | vs gold | value: human / gold | length: human / gold | both: human / gold "
        "| segment precision / recall |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| gold scorer | – | {g['accuracy_human']:.3f} | 1 | "
        + " | ".join(f"{g['by_type'][t]:.3f} / 1" for t in PAIR_TYPES) + " | 1 / 1 |",
    ]  # fmt: skip
    for name, s in result["settings"].items():
        m = s["mean"]
        lines.append(f"| implicit RM, {name} | {len(s['runs'])} | {m['accuracy_human']:.3f} | {m['accuracy_gold']:.3f} | "
                     + " | ".join(f"{m['by_type'][t]['accuracy_human']:.3f} / {m['by_type'][t]['accuracy_gold']:.3f}" for t in PAIR_TYPES)
                     + f" | {m['precision']:.3f} / {m['recall']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_data_curve(result: dict[str, Any], path: Path) -> None:
    """Held-out accuracy (human, gold) and negative-segment precision / recall against training pairs, with the
    issue's targets dashed and the gold scorer's accuracy against the human (the noise ceiling) dotted."""
    from matplotlib.figure import Figure

    settings = sorted(result["settings"].values(), key=lambda s: s["train_pairs"])
    x = [s["train_pairs"] for s in settings]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for i, (key, label, target) in enumerate((("accuracy_human", "accuracy vs human", 0.70),
                                              ("accuracy_gold", "accuracy vs gold", 0.85),
                                              ("precision", "segment precision", 0.6),
                                              ("recall", "segment recall", 0.6))):  # fmt: skip
        ax.plot(x, [s["mean"][key] for s in settings], marker="o", color=f"C{i}", label=label)
        ax.axhline(target, color=f"C{i}", linestyle="--", linewidth=0.7)
    ax.axhline(result["gold_ceiling"]["accuracy_human"], color="grey", linestyle=":", linewidth=0.8,
               label="gold scorer vs human (ceiling)")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{n:,}" for n in x])
    ax.minorticks_off()
    ax.set_xlabel("training pairs (simulated-human labels)")
    ax.set_ylabel("held-out pairs / gold wrong-fact spans")
    ax.set_title("Likelihood-ratio RM: more pairs (dashed: the issue's targets)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def mean_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    avg = lambda key: statistics.mean(r[key] for r in runs)  # noqa: E731
    return {
        "accuracy_human": avg("accuracy_human"),
        "accuracy_gold": avg("accuracy_gold"),
        "precision": avg("precision"),
        "recall": avg("recall"),
        "by_type": {
            t: {k: statistics.mean(r["by_type"][t][k] for r in runs) for k in ("accuracy_human", "accuracy_gold")}
            for t in PAIR_TYPES
        },  # fmt: skip
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="FactWorld directory (preferences_train / _test.jsonl, kb.json)")
    p.add_argument("--sft", required=True, help="the judge's starting point and reference (the SFT policy)")
    p.add_argument("--out", required=True, help="run directory (judges and results.json)")
    p.add_argument("--settings", nargs="+", default=["1e-4:2", "3e-4:2", "1e-4:4"],
                   help="LR:EPOCHS[:EXTRA] of each judge, EXTRA new simulated-human pairs per training prompt on top "
                        "of the world's (default 0); the first is the headline written to experiments/judges.json")  # fmt: skip
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--beta", type=float, default=0.1, help="β of the implicit reward (DPO's default)")
    p.add_argument("--limit", type=int, default=0, help="held-out pairs to score (0: all 915)")
    p.add_argument("--no-json", action="store_true", help="do not update experiments/judges.json")
    p.add_argument("--figure", default="", help="PNG of accuracy and segment precision / recall against the number of "
                   "training pairs, one point per setting (for settings that differ only in EXTRA)")  # fmt: skip
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    out = Path(args.out)
    pairs = read_jsonl(Path(args.world) / "preferences_test.jsonl")
    pairs = pairs[: args.limit] if args.limit else pairs
    result: dict[str, Any] = {"args": vars(args), "gold_ceiling": gold_ceiling(pairs), "settings": {}}
    t0 = time.perf_counter()
    for setting in args.settings:
        lr, epochs, extra = (float(x) for x in (setting + ":0").split(":")[:3])
        name = f"lr {lr:g}, {epochs:g} epochs" + (f", +{extra:g} pairs/prompt" if extra else "")
        tag = f"lr{lr:g}_e{epochs:g}" + (f"_plus{extra:g}" if extra else "")
        train_file = training_pairs(Path(args.world), int(extra), out)
        runs = []
        for seed in args.seeds:
            judge = implicit_rm(args.sft, train_file, out / f"{tag}_seed{seed}", seed, args.progress, lr, epochs,
                                args.beta)  # fmt: skip
            runs.append({"seed": seed, **pair_accuracy(judge, args.sft, pairs), **increments(judge, args)})
        n_pairs = sum(1 for _ in train_file.open())
        result["settings"][name] = {"runs": runs, "mean": mean_of(runs), "train_pairs": n_pairs}
    result["minutes"] = (time.perf_counter() - t0) / 60
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(markdown(result))
    if args.figure:
        plot_data_curve(result, Path(args.figure))
    if not args.no_json:
        head = next(iter(result["settings"].values()))["mean"]
        command = "python experiments/judges/implicit_rm.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        update_judges_json(JUDGES_JSON, {key: (round(value, 4), command) for key, value in (
            ("rm_accuracy_human_heldout", head["accuracy_human"]), ("rm_accuracy_gold_heldout", head["accuracy_gold"]),
            ("increment_precision", head["precision"]), ("increment_recall", head["recall"]))})  # fmt: skip
    return result


if __name__ == "__main__":
    main()
