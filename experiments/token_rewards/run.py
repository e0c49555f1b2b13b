"""PPO on FactWorld with sequence-level vs token-level gold rewards vs a trained Bradley–Terry reward model.

    .venv/bin/python experiments/token_rewards/run.py            # ~20 minutes on 2 CPU cores (5 rewards × 3 seeds)

1. The shared FactWorld base (`experiments/common.py`: world, tiny Llama, SFT, simulated-human pairs, BT reward
   model; built once, reused).
2. PPO from the SFT policy, the same settings for every run, with four rewards:
   (a) `factworld:W` the gold score of the whole response, on its last token;
   (b) `factworld:W:token` the gold signs of each fact value, on the token that ends the value's span;
   (c) `rm:RM` the BT reward model trained on the simulated human's labels (the RLHF case);
   (d) `dpo:IMPLICIT_RM:SFT` the likelihood-ratio reward model r = β·log π/π_sft, a BT model trained (by `rlxf
       dpo`) on the world's simulated-human training pairs (`experiments/common.py`, `experiments/judges/`);
   (e) `seq2seq:SEQ2SEQ_RM` the seq2seq reward model (arXiv 2409.00162), trained by `rlxf seq2seq-rm` on the same
       pairs: +α on tokens it would have written, −β where it would have written something else.
   Three seeds each (seed = sampling + data order; same SFT start).
3. Gold score of the training rollouts vs rollouts seen (the plot), and a held-out evaluation of every final policy
   against SFT (`rlxf eval`): gold win rate, gold score, hallucination rate, retain accuracy, KL. Head to head
   (`HEAD_TO_HEAD`): every policy answered the same held-out prompts with the same sampling seed, so two rewards'
   policies of one seed are compared answer by answer on gold score (ties ½).
4. figures/gold_vs_rollouts.png, results.json, and the results block of README.md (between its markers).

The expectation to test (issue 5): dense (token) rewards learn faster than sequence rewards, and the RM-driven run
improves the gold win rate over SFT. Whatever the numbers say is what the README reports.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import (
    factworld_base,
    factworld_implicit_rm,
    factworld_seq2seq_rm,
    mean_sd,
    ppo_arm,
    read_jsonl,
    write_results_block,
)  # noqa: E402
from rlxf.evaluation import EvalConfig, run_eval  # noqa: E402
from rlxf.sampling import GenerationSettings  # noqa: E402

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("token_rewards")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/experiments/token_rewards", help="run directory (never committed)")
    p.add_argument("--base", default="runs/experiments/base", help="shared FactWorld base (built if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="PPO seeds")
    p.add_argument("--steps", type=int, default=30, help="PPO rollouts (optimiser steps of the engine) per run")
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompts per rollout")
    p.add_argument("--k", type=int, default=2, help="responses per prompt")
    p.add_argument("--lr", type=float, default=1e-4, help="policy learning rate")
    p.add_argument("--value-lr", type=float, default=1e-3, help="critic learning rate")
    p.add_argument("--kl-coef", type=float, default=0.05, help="β of the per-token KL penalty")
    p.add_argument("--eval-samples", type=int, default=2, help="held-out responses per prompt and policy")
    p.add_argument(
        "--no-readme",
        action="store_true",
        help="do not rewrite README.md's results block or figures/ (the plot goes to --out)",
    )
    p.add_argument("--progress", action="store_true", help="progress bars")
    return p.parse_args(argv)


REWARDS = {
    "gold, sequence": "factworld:{world}",
    "gold, token": "factworld:{world}:token",
    "BT reward model": "rm:{rm}",
    "likelihood-ratio RM": "dpo:{implicit_rm}:{sft}",
    "seq2seq RM": "seq2seq:{seq2seq_rm}",
}
HEAD_TO_HEAD = [
    ("seq2seq RM", "BT reward model"),
    ("seq2seq RM", "likelihood-ratio RM"),
    ("seq2seq RM", "gold, token"),
]
"""Pairs of rewards compared directly: the first's policy against the second's, same seed, on gold score."""


def ppo_run(args, base: dict[str, Path], spec: str, seed: int, out: Path) -> dict:
    return ppo_arm(base["sft"], base["world"], spec.format(**base), seed, out, steps=args.steps,
                   prompts_per_step=args.prompts_per_step, k=args.k, lr=args.lr, value_lr=args.value_lr,
                   kl_coef=args.kl_coef, progress=args.progress)  # fmt: skip


def file_name(name: str) -> str:
    """The evaluation's name of policy `REWARD|SEED` (its responses are in `eval/responses_<name>.jsonl`)."""
    return name.replace("|", "-s").replace(", ", "-").replace(" ", "_")


def head_to_head(eval_dir: Path, a: str, b: str, seeds: list[int]) -> tuple[float, float]:
    """Gold win rate of reward a's policy over reward b's, answer by answer on the same held-out prompts and sampling
    seed (ties ½); mean ± sd over seeds."""
    rates = []
    for seed in seeds:
        ga = [r["gold"] for r in read_jsonl(eval_dir / f"responses_{file_name(f'{a}|{seed}')}.jsonl")]
        gb = [r["gold"] for r in read_jsonl(eval_dir / f"responses_{file_name(f'{b}|{seed}')}.jsonl")]
        rates.append(sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ga, gb)) / len(ga))
    return mean_sd(rates)


def plot(curves: dict[str, list[list[float]]], rollouts_per_step: int, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, runs in curves.items():
        steps = len(runs[0])
        x = [(s + 1) * rollouts_per_step for s in range(steps)]
        for run in runs:
            ax.plot(x, run, alpha=0.25, linewidth=0.8, color=f"C{list(curves).index(name)}")
        mean = [sum(r[s] for r in runs) / len(runs) for s in range(steps)]
        ax.plot(x, mean, label=f"{name} (mean of {len(runs)} seeds)", color=f"C{list(curves).index(name)}")
    ax.set_xlabel("responses sampled (rollouts seen)")
    ax.set_ylabel("gold score of the rollout's responses")
    ax.set_title("PPO from SFT on FactWorld")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("rlxf", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    t0 = time.perf_counter()
    base = factworld_base(args.base, seed=0, progress=args.progress)
    base["implicit_rm"] = factworld_implicit_rm(base, progress=args.progress)
    base["seq2seq_rm"] = factworld_seq2seq_rm(base, progress=args.progress)
    base_seconds = time.perf_counter() - t0

    runs: dict[str, dict[int, dict]] = {}
    for name, spec in REWARDS.items():
        for seed in args.seeds:
            slug = name.replace(", ", "-").replace(" ", "_")
            logger.info("PPO with %s, seed %d", name, seed)
            runs.setdefault(name, {})[seed] = ppo_run(args, base, spec, seed, out / f"{slug}-seed{seed}")
            h = runs[name][seed]["history"]
            logger.info(
                "  gold %.3f -> %.3f, KL %.2f, %.0f s",
                h["rewards/gold"][0], sum(h["rewards/gold"][-5:]) / 5, h["objective/kl"][-1], runs[name][seed]["seconds"],
            )  # fmt: skip

    policies = [str(base["sft"])] + [
        str(out / f"{name.replace(', ', '-').replace(' ', '_')}-seed{seed}" / "final")
        for name in REWARDS
        for seed in args.seeds
    ]
    names = ["sft"] + [f"{name}|{seed}" for name in REWARDS for seed in args.seeds]
    logger.info("held-out evaluation of %d policies", len(policies))
    eval_start = time.perf_counter()
    summary = run_eval(
        EvalConfig(
            policies=policies,
            names=[file_name(n) for n in names],
            world=str(base["world"]),
            out=str(out / "eval"),
            samples_per_prompt=args.eval_samples,
            generation=GenerationSettings(max_new_tokens=48, temperature=1.0, batch_size=64),
            seed=0,
        )
    )
    evals = dict(zip(names, summary["policies"].values()))
    eval_seconds = time.perf_counter() - eval_start

    rollouts_per_step = args.prompts_per_step * args.k
    curves = {name: [runs[name][s]["history"]["rewards/gold"] for s in args.seeds] for name in REWARDS}
    figures = out if args.no_readme else HERE / "figures"  # a trial run leaves the committed figure alone
    figures.mkdir(parents=True, exist_ok=True)
    plot(curves, rollouts_per_step, figures / "gold_vs_rollouts.png")

    table = {}
    for name in REWARDS:
        gold = [runs[name][s]["history"]["rewards/gold"] for s in args.seeds]
        e = [evals[f"{name}|{s}"] for s in args.seeds]
        table[name] = {
            "train gold, first 5 rollouts": mean_sd([sum(g[:5]) / 5 for g in gold]),
            "train gold, mean over the run": mean_sd([sum(g) / len(g) for g in gold]),
            "train gold, last 5 rollouts": mean_sd([sum(g[-5:]) / 5 for g in gold]),
            "held-out win rate vs SFT": mean_sd([x["win_rate"] for x in e]),
            "held-out gold score": mean_sd([x["gold_score"] for x in e]),
            "hallucination rate": mean_sd([x["hallucination_rate"] for x in e]),
            "retain accuracy": mean_sd([x["retain_accuracy"] for x in e]),
            "KL to SFT": mean_sd([x["kl_to_reference"] for x in e]),
            "seconds per run": mean_sd([runs[name][s]["seconds"] for s in args.seeds]),
        }
    sft = evals["sft"]
    duels = {f"{a} vs {b}": head_to_head(out / "eval", a, b, args.seeds) for a, b in HEAD_TO_HEAD}
    results = {
        "table": table,
        "head_to_head": duels,
        "sft": sft,
        "per_run": {f"{n}|{s}": evals[f"{n}|{s}"] for n in REWARDS for s in args.seeds},
        "settings": vars(args),
        "base_seconds": base_seconds,
        "total_seconds": time.perf_counter() - t0,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    compute = base_seconds + sum(r["seconds"] for per_seed in runs.values() for r in per_seed.values())
    results["compute_seconds"] = compute + eval_seconds
    block = render(table, sft, duels, args, results["compute_seconds"])
    print(block)
    if not args.no_readme:
        write_results_block(HERE / "README.md", "results", block)
    return results


def render(table: dict, sft: dict, duels: dict, args, seconds: float) -> str:
    cols = list(next(iter(table.values())))
    lines = ["| reward | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in row.values()) + " |")
    lines.append(
        f"| SFT (start) | – | – | – | 0.500 | {sft['gold_score']:.3f} | {sft['hallucination_rate']:.3f} | "
        f"{sft['retain_accuracy']:.3f} | 0 | – |"
    )
    return (
        f"Seeds {args.seeds}, {args.steps} rollouts of {args.prompts_per_step} prompts × k={args.k}, lr {args.lr}, "
        f"critic lr {args.value_lr}, β {args.kl_coef}; mean ± sd over seeds; held-out: 200 prompts × "
        f"{args.eval_samples} samples. Compute {seconds / 60:.1f} min (PPO runs + evaluation; base not counted when reused).\n\n"
        + "\n".join(lines)
        + "\n\nHead to head (same held-out prompts and sampling seed, gold score, ties ½; mean ± sd over seeds):\n\n"
        + "| policy A vs policy B | gold win rate of A |\n|---|---|\n"
        + "".join(f"| {pair} | {m:.3f} ± {sd:.3f} |\n" for pair, (m, sd) in duels.items())
        + "\n![gold vs rollouts](figures/gold_vs_rollouts.png)\n"
    )


if __name__ == "__main__":
    main()
