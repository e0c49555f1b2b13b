"""Judge recipe study of experiments/rlaif: train one judge config, or evaluate an existing judge, on held-out pairs.

Every config is scored on the same 600 validation pairs: fresh draws of the world's generator and simulated human on
the training prompts (`judge.validation_pairs`, seed 0, exactly the `prepare_judge_data(..., val_pairs=600)` file),
kept out of the judge's rows, of the world's `preferences_train.jsonl` and of `pairs.jsonl`. The recipe is chosen
on them; `--also-pairs` labels the base's `pairs.jsonl` too, as a check after the choice (never to choose by).
One JSON line per config is appended to `--results`; `--table` prints them as a markdown table.

The study's configs (base `runs/demo`; each training run takes ~6-17 min on 2 CPU cores; the study's own run
directories exist, so add `--out-root NEW_DIR --results NEW_DIR/results.jsonl` to redo them):

    S=experiments/rlaif/judge_study.py
    export OMP_NUM_THREADS=1
    .venv/bin/python $S --name baseline-existing --eval-only runs/experiments/rlaif/judge/sft/final --also-pairs
    .venv/bin/python $S --name x5-1ep --extra-pairs 24 --epochs 1 --also-pairs
    .venv/bin/python $S --name x5-1ep-seed1 --extra-pairs 24 --epochs 1 --seed 1
    .venv/bin/python $S --name x5-1ep-lr2e-3 --extra-pairs 24 --epochs 1 --lr 2e-3
    .venv/bin/python $S --name deep4-base-3ep --extra-layers 2 --epochs 3
    .venv/bin/python $S --name deep4-x3-1ep --extra-layers 2 --extra-pairs 12 --epochs 1 --also-pairs
    .venv/bin/python $S --name deep4-x5-0.8ep --extra-layers 2 --extra-pairs 24 --epochs 0.8
    .venv/bin/python $S --name samelen-x5-2ep --extra-pairs 24 --same-length-only --epochs 2
    .venv/bin/python $S --name samelen-deep4-x5-1ep --extra-layers 2 --extra-pairs 24 --same-length-only --epochs 1
    .venv/bin/python $S --table

"deep4" is the study's name for 4 decoder layers in all: the 2-layer SFT policy + 2 identity-initialised blocks
(`--extra-layers 2` rebuilds the study's sft-deep4 start bit for bit). baseline-existing is the judge that
`run.py` trained (judge.py defaults); `--name baseline-3ep --epochs 3` retrains that recipe on the same rows.

The chain-of-thought judges (base `runs/experiments/base`; experiments/rlaif/README.md): `--reference-cot` (the judge
writes its own answer, then labels) at 0, 2 and 4 extra layers, and `--self-check-cot` (it copies and marks each
claim of both answers, then labels), e.g.

    .venv/bin/python $S --base runs/experiments/base --name selfcheck-2ep --self-check-cot --epochs 2 --also-pairs

Re-score a trained judge without training (a new --name: a run directory is never overwritten):

    .venv/bin/python $S --name check-x5-1ep --eval-only runs/experiments/rlaif-judge-study/x5-1ep/sft/final \\
        --results runs/experiments/rlaif-judge-study/results-check.jsonl

A smoke run (3 optimiser steps; shows the training path works, its numbers mean nothing):

    .venv/bin/python $S --name smoke-train --max-steps 3 --out-root /tmp/judge-smoke --results /tmp/judge-smoke/r.jsonl

Metrics (all on the validation pairs; `pairs_*` the same on pairs.jsonl):
- alignment: share of pairs where the judge's debiased P(a ≻ b) picks the simulated human's choice (ties wrong);
- alignment_same_length / alignment_different_length: the same on pairs whose two responses have the same number of
  words (`judge.same_length`: same number of facts, they differ only in the values) and on the others, where the
  length (how many facts an answer states) is a usable shortcut;
- mean_abs_p_minus_half: how far from ½ the judge's P(a ≻ b) is on average (confidence);
- position_bias: share of pairs where the judge prefers the same slot in both presentation orders;
  position_bias_slot1_share: among those, the share where it is slot 1;
- gold_agreement: on pairs with different gold scores, share where the judge's choice has the higher gold score;
- ceiling: expected alignment of a noiseless gold judge (always picks the gold-better response) with the simulated
  human, mean of max(label_prob, 1 − label_prob); also per length class.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import read_jsonl, update_judges_json  # noqa: E402
from experiments.rlaif.judge import (  # noqa: E402
    SELF_CHECK_MAX_TOKENS,
    alignment_by_length,
    deepen,
    judge_label_config,
    prepare_judge_data,
    same_length,
    train_judge,
    validation_pairs,
    write_preamble,
)
from rlxf.backends import BackendConfig  # noqa: E402
from rlxf.data.formats import write_jsonl  # noqa: E402
from rlxf.engine import TrainConfig  # noqa: E402
from rlxf.feedback.label import run_label  # noqa: E402

logger = logging.getLogger("rlaif.judge_study")
STUDY = "runs/experiments/rlaif-judge-study"
JUDGES_JSON = Path(__file__).resolve().parents[1] / "judges.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--name", default="", help="config name; its run directory is OUT_ROOT/NAME (must be new)")
    p.add_argument("--base", default="runs/demo", help="FactWorld base: world/, pairs.jsonl, sft/final")
    p.add_argument("--out-root", default=STUDY, help="where the run directories go")
    p.add_argument("--results", default=f"{STUDY}/results.jsonl", help="JSONL file one result line is appended to")
    p.add_argument("--eval-only", default="", metavar="MODEL_DIR", help="evaluate this judge; train nothing")
    p.add_argument(
        "--model", default="", help="model the judge is fine-tuned from; empty: BASE/sft/final, the SFT policy"
    )
    p.add_argument(
        "--extra-pairs",
        type=int,
        default=0,
        help="new human-labelled pairs per training prompt on top of the world's preferences_train "
        "(judge.simulated_human_pairs)",
    )
    p.add_argument(
        "--extra-layers",
        type=int,
        default=0,
        help="identity-initialised decoder blocks added on top of --model before fine-tuning (judge.deepen)",
    )
    p.add_argument(
        "--same-length-only",
        action="store_true",
        help="train only on rows whose two responses have the same word count (judge.same_length): a hypothesis "
        "test that removes the length shortcut, not a recipe",
    )
    p.add_argument(
        "--reference-cot",
        action="store_true",
        help="reference-guided chain of thought: the judge first writes its own answer to the question (rationale "
        "targets: the start model's greedy answers, judge.reference_answers), then labels (the paper's 2-step CoT)",
    )
    p.add_argument(
        "--self-check-cot",
        action="store_true",
        help="self-check chain of thought: the judge copies each claim of both answers and marks whether it would "
        "have written it (rationale targets: the start model's own teacher-forced greedy tokens, "
        "judge.self_check_marks), then labels",
    )
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the judge rows")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="rows per optimiser step")
    p.add_argument("--seed", type=int, default=0, help="training seed (order of the rows in each epoch)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimiser steps (0: all epochs)")
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="seed of the extra and validation draws (the study used 0 for every config, --seed 1 included)",
    )
    p.add_argument("--val-pairs", type=int, default=600, help="validation pairs to score every config on")
    p.add_argument(
        "--also-pairs",
        action="store_true",
        help="also label BASE/pairs.jsonl (a post-selection check, not a criterion)",
    )
    p.add_argument("--label-batch-size", type=int, default=16, help="prompts per forward pass when labelling")
    p.add_argument("--progress", action="store_true", help="progress bars")
    p.add_argument("--table", action="store_true", help="print --results as a markdown table and exit")
    p.add_argument(
        "--judges-json",
        nargs="+",
        default=[],
        metavar="NAME",
        help="write experiments/judges.json's labeller_alignment_by_size from these configs of --results (smallest "
        "labeller first; each needs pairs.jsonl labels: --also-pairs) and labeller_alignment from the last, then exit",
    )
    args = p.parse_args(argv)
    if not args.table and not args.judges_json and not args.name:
        p.error("--name is required (unless --table or --judges-json)")
    if args.reference_cot and args.self_check_cot:
        p.error("choose one chain of thought: --reference-cot or --self-check-cot")
    return args


# --- evaluation ------------------------------------------------------------------------------------------------------


def ceiling(rows: list[dict[str, Any]]) -> float | None:
    """Expected alignment of a noiseless gold judge with the simulated human: mean of max(label_prob, 1 − label_prob)
    (the human picks `chosen` with probability label_prob; the gold judge picks the gold-better response)."""
    return sum(max(r["label_prob"], 1 - r["label_prob"]) for r in rows) / len(rows) if rows else None


def evaluate(model: Path, preamble: Path, src: Path, out: Path, args: argparse.Namespace, prefix: str) -> dict:
    """Label `src` with the judge (`rlxf label`, local backend, both orders) and score the labels."""
    cfg = judge_label_config(
        preamble,
        input=str(src),
        out=str(out),
        backend=BackendConfig(kind="local", model=str(model), batch_size=args.label_batch_size),
        progress=args.progress,
        cot=args.reference_cot or args.self_check_cot,
        rationale_max_tokens=SELF_CHECK_MAX_TOKENS if args.self_check_cot else None,
    )
    metrics = json.loads(Path(run_label(cfg)["metrics"]).read_text())
    labelled = read_jsonl(out)  # chosen = the judge's choice; gold_chosen / gold_rejected follow it
    decided = [r for r in labelled if abs(r["gold_chosen"] - r["gold_rejected"]) > 1e-9]
    split = alignment_by_length(labelled)
    pairs = read_jsonl(src)  # chosen = the simulated human's choice, label_prob = P(human picks chosen)
    same = [r for r in pairs if same_length(r["chosen"], r["rejected"])]
    other = [r for r in pairs if not same_length(r["chosen"], r["rejected"])]
    result = {
        "alignment": metrics["alignment"]["accuracy"],
        "n": metrics["alignment"]["n"],
        "n_ties": metrics["alignment"]["n_ties"],
        "alignment_same_length": split["same_length"]["alignment"],
        "n_same_length": split["same_length"]["n"],
        "alignment_different_length": split["different_length"]["alignment"],
        "n_different_length": split["different_length"]["n"],
        "mean_abs_p_minus_half": sum(abs(r["p_a"] - 0.5) for r in labelled) / len(labelled),
        "position_bias": metrics["position_bias"]["rate"],
        "position_bias_slot1_share": metrics["position_bias"]["slot1_share"],
        "gold_agreement": sum(r["gold_chosen"] > r["gold_rejected"] for r in decided) / len(decided),
        "ceiling": ceiling(pairs),
        "ceiling_same_length": ceiling(same),
        "ceiling_different_length": ceiling(other),
        "labeler": labelled[0]["labeler"],
    }
    return {f"{prefix}_{k}": v for k, v in result.items()}


# --- the table -------------------------------------------------------------------------------------------------------


def fmt(x: Any, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(records: list[dict[str, Any]]) -> str:
    """One row per config. Records of the study's first ad hoc script (keys without the `val_` prefix, no length
    split, `extra_per_prompt`) are read too."""
    head = (
        "| config | start | extra pairs/prompt | rows | epochs | lr | seed | val alignment | same-length (n) | "
        "different-length (n) | mean abs(p − ½) | position bias | gold agreement | ceiling | pairs.jsonl alignment |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in records:
        val = lambda k: r.get(f"val_{k}", r.get(k))  # noqa: E731
        if "eval_only" not in r:  # a record of the first script: only the start model's path is known
            start = f"`{r.get('model')}`"
        elif r["eval_only"]:
            start = f"eval-only `{r['eval_only']}`"
        else:
            start = f"SFT + {r['extra_layers']} layers" if r.get("extra_layers") else "SFT"
            start += ", same-length rows only" if r.get("same_length_only") else ""
        split = lambda c: f"{fmt(val(f'alignment_{c}'))} ({fmt(val(f'n_{c}'))})" if val(f"n_{c}") else "–"  # noqa: E731
        lines.append(
            f"| {r['name']} | {start} | {fmt(r.get('extra_pairs_per_prompt', r.get('extra_per_prompt')))} | {fmt(r.get('rows'))} | "
            f"{fmt(r.get('epochs'), 1)} | {fmt(r.get('lr'), 4)} | {fmt(r.get('seed'))} | {fmt(val('alignment'))} | "
            f"{split('same_length')} | {split('different_length')} | {fmt(val('mean_abs_p_minus_half'))} | "
            f"{fmt(val('position_bias'))} | {fmt(val('gold_agreement'))} | {fmt(val('ceiling'))} | "
            f"{fmt(r.get('pairs_alignment'))} |"
        )
    return "\n".join(lines)


def write_judges_json(records: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Put the labellers' alignment with the simulated human on pairs.jsonl (the pairs experiments/rlaif labels) into
    experiments/judges.json: `labeller_alignment_by_size` for `names` in order (smallest first), and
    `labeller_alignment` = the last one's. The command that trained and scored each is stored in `commands`."""
    by_name = {r["name"]: r for r in records}
    missing = [n for n in names if n not in by_name or by_name[n].get("pairs_alignment") is None]
    if missing:
        raise SystemExit(f"no pairs.jsonl alignment for {missing} in the results; run them with --also-pairs")
    by_size = [round(by_name[n]["pairs_alignment"], 4) for n in names]
    commands = [by_name[n].get("command", f"python experiments/rlaif/judge_study.py --name {n} ...") for n in names]
    return update_judges_json(JUDGES_JSON, {"labeller_alignment_by_size": (by_size, " && ".join(commands)),
                                            "labeller_alignment": (by_size[-1], commands[-1])})  # fmt: skip


# --- main ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = Path(args.results)
    if args.table:
        print(markdown_table(read_jsonl(results)))
        return
    if args.judges_json:
        write_judges_json(read_jsonl(results), args.judges_json)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    base = Path(args.base)
    world, pairs_file = base / "world", base / "pairs.jsonl"
    run_dir = Path(args.out_root) / args.name
    if args.eval_only and not (Path(args.eval_only) / "config.json").exists():
        raise SystemExit(
            f"--eval-only {args.eval_only}: no model there (expected a save_pretrained dir, e.g. .../sft/final)"
        )
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists; choose a new --name (run directories are never overwritten)")
    run_dir.mkdir(parents=True)
    record: dict[str, Any] = {"name": args.name, "base": str(base), "eval_only": args.eval_only,
                              "command": "python experiments/rlaif/judge_study.py " + shlex.join(argv or sys.argv[1:])}  # fmt: skip

    # 1. Data: the validation pairs, and unless --eval-only the judge's rows (both orders of each pair), all disjoint
    #    from the validation pairs and pairs.jsonl. --eval-only writes only the validation file, built by the same
    #    call prepare_judge_data makes (exclusions: pairs.jsonl and the world's preferences_train).
    if args.eval_only:
        preamble = write_preamble(run_dir / "preamble.txt")
        val_file = run_dir / "judge_val.jsonl"
        excluded = [pairs_file, world / "preferences_train.jsonl"]
        write_jsonl(val_file, validation_pairs(world, args.val_pairs, args.data_seed, exclude_pairs=excluded))
        model = Path(args.eval_only)
    else:
        data = prepare_judge_data(
            world,
            pairs_file,
            run_dir,
            extra_pairs_per_prompt=args.extra_pairs,
            val_pairs=args.val_pairs,
            seed=args.data_seed,
            reference_model=(args.model or base / "sft" / "final")
            if args.reference_cot or args.self_check_cot
            else None,
            rationale="self-check" if args.self_check_cot else "reference",
        )
        preamble, val_file, train_file = data["preamble"], data["val_file"], data["train_file"]
        rows = read_jsonl(train_file)
        if args.same_length_only:  # both orders of a pair have the same two responses: kept or dropped together
            rows = [r for r in rows if same_length(r["response_1"], r["response_2"])]
            train_file = run_dir / "judge_train.same_length.jsonl"
            write_jsonl(train_file, rows)
        logger.info("%d judge rows in %s", len(rows), train_file)

        # 2. Start model: the SFT policy, optionally deepened (identity-initialised blocks on top).
        start_model = Path(args.model or base / "sft" / "final")
        if args.extra_layers:
            start_model = deepen(start_model, run_dir / "start", args.extra_layers)

        # 3. Fine-tune on the labelling prompts (next-token NLL on the label token and EOS).
        from transformers import AutoConfig

        positions = AutoConfig.from_pretrained(start_model).max_position_embeddings
        train = TrainConfig(
            epochs=args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            per_device_batch_size=args.batch_size,
            warmup_steps=10,
            seed=args.seed,
            max_steps=args.max_steps,
            progress=args.progress,
            report_to="none",
        )
        started = time.perf_counter()
        model = train_judge(start_model, train_file, run_dir / "sft", train, positions)
        record |= {
            "model": str(args.model or base / "sft" / "final"),
            "extra_pairs_per_prompt": args.extra_pairs,
            "extra_layers": args.extra_layers,
            "same_length_only": args.same_length_only,
            "reference_cot": args.reference_cot,
            "self_check_cot": args.self_check_cot,
            "rows": len(rows),
            "epochs": args.epochs,
            "lr": args.lr,
            "seed": args.seed,
            "max_steps": args.max_steps,
            "train_seconds": time.perf_counter() - started,
        }
    history = model.parent / "metrics.jsonl"
    nll = [r["loss/nll"] for r in read_jsonl(history) if "loss/nll" in r] if history.exists() else []
    record["train_nll_last20"] = sum(nll[-20:]) / len(nll[-20:]) if nll else None

    # 4. Score on the validation pairs (the selection criterion), then optionally on pairs.jsonl (a check only).
    record |= evaluate(model, preamble, val_file, run_dir / "val_labels.jsonl", args, "val")
    if args.also_pairs:
        record |= evaluate(model, preamble, pairs_file, run_dir / "pairs_labels.jsonl", args, "pairs")

    print(json.dumps(record))
    results.parent.mkdir(parents=True, exist_ok=True)
    with results.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
