"""Refusal-to-response: does PPO on a scalar RM learn to abstain where the SFT policy knew the answer, and on the
seq2seq RM less so?

The seq2seq RM paper (arXiv 2409.00162, `docs/methods/seq2seq_rm.md`) reports that PPO with a scalar BT reward model
drifts into refusing ("refusal-to-response"), and that the seq2seq RM's token-level feedback prevents it. FactWorld
tests it with an abstention answer:

1. A variant base (`experiments/common.factworld_base` with `abstain_prob` P, default 0.1): the same world seed and
   sizes, but each SFT completion and preference response to a fact prompt is " I don't know." with probability P.
   Its gold score is 0, below a right answer and above a wrong one, so the simulated human prefers abstaining to a
   wrong answer and a right answer to abstaining. The SFT policy is trained on this world's SFT data, so it abstains
   sometimes and PPO can find the answer.
2. Two reward models from that SFT policy on the world's `preferences_train.jsonl` (human choices, never gold): the
   scalar BT RM (the demo's recipe, `common.scalar_rm`) and the seq2seq RM (`common.seq2seq_rm`). The gold reward
   (`factworld:WORLD`) is the control: it pays a right answer more than abstaining.
3. PPO with each (the settings every FactWorld experiment shares, `common.ppo_arm`), 3 seeds.
4. On the held-out prompts: the refusal rate on the fact prompts whose SFT greedy answer is right (the prompts where
   abstaining throws a known answer away), the refusal rate on all fact prompts, the gold win rate vs SFT and the
   hallucination rate. Writes results.json, figures/refusal.png and the results block of README.md.

    python experiments/seq2seq_rm/refusal.py          # ≈ 10 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import (  # noqa: E402
    factworld_base,
    greedy_answers,
    mean_sd,
    ppo_arm,
    read_jsonl,
    scalar_rm,
    seq2seq_rm,
    write_results_block,
)
from rlxf.evaluation import EvalConfig, run_eval  # noqa: E402
from rlxf.sampling import GenerationSettings  # noqa: E402
from rlxf.worlds.factworld import ABSTENTION, load_factworld  # noqa: E402

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("refusal")


def known_prompts(world_dir: Path, sft: Path) -> list[str]:
    """Held-out fact prompts whose SFT greedy answer is perfect (gold score 1): where abstaining loses a known answer."""
    world = load_factworld(world_dir)
    facts = [r for r in world.read("prompts_test") if r["kind"] == "fact"]
    answers = greedy_answers(sft, [r["prompt"] for r in facts], max_new_tokens=48)
    return [r["prompt"] for r in facts if world.score(r, " " + answers[r["prompt"]]).score == 1.0]


def refusal_rates(responses_file: Path, known: set[str]) -> dict[str, float]:
    """Abstentions among a policy's held-out responses (`rlxf eval`'s responses_NAME.jsonl): on the known prompts and
    on every fact prompt (the rows whose prompt asks "What ...")."""
    rows = read_jsonl(responses_file)
    facts = [r for r in rows if r["prompt"].startswith("Q: What ")]
    on_known = [r for r in facts if r["prompt"] in known]

    def rate(rs: list[dict]) -> float:
        return sum(r["response"].strip() == ABSTENTION for r in rs) / len(rs) if rs else float("nan")

    return {"refusal on known prompts": rate(on_known), "refusal on all fact prompts": rate(facts)}


def plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, (name, runs) in enumerate(curves.items()):
        mean = [sum(r[s] for r in runs) / len(runs) for s in range(len(runs[0]))]
        ax.plot(range(1, len(mean) + 1), mean, label=name, color=f"C{i}")
    ax.set_xlabel("PPO rollout")
    ax.set_ylabel("gold score of the rollouts (mean of seeds)")
    ax.set_title("PPO from an SFT policy that sometimes abstains")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/experiments/base_abstain", help="the abstention base (built if missing)")
    p.add_argument("--out", default="runs/experiments/refusal", help="run directory (never committed)")
    p.add_argument("--abstain-prob", type=float, default=0.1, help="share of fact answers in the data that abstain")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="PPO seeds")
    p.add_argument("--steps", type=int, default=30, help="PPO rollouts per run")
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompts per rollout")
    p.add_argument("--eval-samples", type=int, default=4, help="held-out responses per prompt and policy")
    p.add_argument("--no-readme", action="store_true", help="leave README.md and figures/ alone (plot to --out)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("rlxf", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    out = Path(args.out)
    base = factworld_base(args.base, progress=False, world={"abstain_prob": args.abstain_prob})
    config = json.loads((base["world"] / "kb.json").read_text())["config"]
    if config["abstain_prob"] != args.abstain_prob:
        raise SystemExit(f"{args.base} was built with abstain_prob {config['abstain_prob']}; use another --base")
    pairs = base["world"] / "preferences_train.jsonl"
    rewards = {
        "BT RM": f"rm:{scalar_rm(base['sft'], pairs, out / 'rm')}",
        "seq2seq RM": f"seq2seq:{seq2seq_rm(base['sft'], pairs, out / 's2s')}",
        "gold (control)": f"factworld:{base['world']}",
    }

    def slug(name: str, seed: int) -> str:
        return name.split(" ")[0].replace("(", "") + f"-s{seed}"

    runs = {}
    for name, spec in rewards.items():
        for seed in args.seeds:
            logger.info("PPO with %s, seed %d", name, seed)
            runs[(name, seed)] = ppo_arm(base["sft"], base["world"], spec, seed, out / slug(name, seed),
                                         steps=args.steps, prompts_per_step=args.prompts_per_step)  # fmt: skip
    names = ["sft"] + [slug(n, s) for n in rewards for s in args.seeds]
    policies = [str(base["sft"])] + [str(out / slug(n, s) / "final") for n in rewards for s in args.seeds]
    evals = run_eval(EvalConfig(policies=policies, names=names, world=str(base["world"]), out=str(out / "eval"),
                                samples_per_prompt=args.eval_samples, seed=0,
                                generation=GenerationSettings(max_new_tokens=48, temperature=1.0, batch_size=64)))["policies"]  # fmt: skip
    known = set(known_prompts(base["world"], base["sft"]))
    refusals = {name: refusal_rates(out / "eval" / f"responses_{name}.jsonl", known) for name in names}
    metrics = {"gold win rate vs SFT": "win_rate", "hallucination rate": "hallucination_rate"}
    table = {}
    for n in rewards:
        row = {k: mean_sd([refusals[slug(n, s)][k] for s in args.seeds]) for k in refusals["sft"]}
        row |= {label: mean_sd([evals[slug(n, s)][key] for s in args.seeds]) for label, key in metrics.items()}
        table[n] = row
    sft = refusals["sft"] | {label: evals["sft"][key] for label, key in metrics.items()}
    train_pairs = read_jsonl(pairs)
    abstain_pairs = [r for r in train_pairs if ABSTENTION in (r["chosen"].strip(), r["rejected"].strip())]
    results = {
        "table": table,
        "sft": sft,
        "known_prompts": len(known),
        "pairs_with_abstention": len(abstain_pairs),
        "abstention_chosen": sum(r["chosen"].strip() == ABSTENTION for r in abstain_pairs)
        / max(len(abstain_pairs), 1),
        "args": vars(args),
        "minutes": (time.perf_counter() - t0) / 60,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figures = out if args.no_readme else HERE / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plot({n: [runs[(n, s)]["history"]["rewards/gold"] for s in args.seeds] for n in rewards}, figures / "refusal.png")
    block = render(results)
    print(block)
    if not args.no_readme:
        write_results_block(HERE / "README.md", "results-refusal", block)
    return results


def render(results: dict) -> str:
    table, args = results["table"], results["args"]
    cols = list(next(iter(table.values())))
    lines = ["| PPO reward | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    s = results["sft"]
    lines.append("| SFT (start) | " + " | ".join(f"{s[c]:.3f}" for c in cols) + " |")
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in row.values()) + " |")
    return (
        f"abstain_prob {args['abstain_prob']}, seeds {args['seeds']}, {args['steps']} rollouts of "
        f"{args['prompts_per_step']} prompts × 2; mean ± sd over seeds; held-out: 200 prompts × {args['eval_samples']} "
        f"samples; known prompts (SFT's greedy answer right): {results['known_prompts']}. Training pairs with an "
        f"abstention: {results['pairs_with_abstention']}, the abstention chosen in {results['abstention_chosen']:.3f} "
        f"of them. Total {results['minutes']:.1f} min.\n\n"
        + "\n".join(lines)
        + "\n\n![gold over PPO](figures/refusal.png)\n"
    )


if __name__ == "__main__":
    main()
