"""Long-response bias: does a length-biased labeller make the scalar-RM policy verbose, and the seq2seq-RM one less so?

The seq2seq RM paper (arXiv 2409.00162, `docs/methods/seq2seq_rm.md`) reports that PPO with a scalar BT reward model
learns to write longer answers, and that the seq2seq RM's token-level rewards mitigate this. FactWorld can test it
with a labeller that likes length: the simulated human with `length_bias` B > 0 prefers the longer answer by B
logits per extra fact sentence, on top of σ(Δgold / T).

1. The shared base (`experiments/common.py`: world, SFT policy). A second world with the same seed and `length_bias`
   B (default 1: one extra sentence weighs as much as a gold difference of T): the same knowledge base and prompts
   (asserted), the same noisy answer pairs, other labels.
2. Four reward models, each trained from the SFT policy on one world's `preferences_train.jsonl` with the human's
   sampled choices as targets: {scalar BT RM (the demo's recipe), seq2seq RM (`common.seq2seq_rm_config`)} ×
   {unbiased labeller, length-biased labeller}.
3. PPO with each (the settings every FactWorld experiment shares, `common.ppo_arm`), 3 seeds.
4. Response length over training (tokens, per rollout), and on the 200 held-out prompts against SFT: words per
   answer, unrequested facts per fact answer, hallucination rate, gold win rate. Writes results.json,
   figures/length.png and the results block of README.md.

    python experiments/seq2seq_rm/length_bias.py          # ≈ 8 min on 2 CPU cores (base reused)
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
    factworld_seq2seq_rm,
    mean_sd,
    ppo_arm,
    read_jsonl,
    scalar_rm,
    seq2seq_rm,
    write_results_block,
)
from rlxf.evaluation import EvalConfig, run_eval  # noqa: E402
from rlxf.sampling import GenerationSettings  # noqa: E402
from rlxf.worlds.factworld import FactWorldConfig, write_factworld  # noqa: E402

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("length_bias")
METRICS = {
    "held-out words per answer": "mean_length_words",
    "unrequested facts per fact answer": "unrequested_fact_rate",
    "hallucination rate": "hallucination_rate",
    "gold win rate vs SFT": "win_rate",
}


def biased_world(base_world: Path, out: Path, length_bias: float) -> Path:
    """The base world re-labelled by a length-biased human: its config with another `length_bias`, so the same
    knowledge base, prompts and answer pairs (the labels draw from their own random stream)."""
    if not (out / "README.md").exists():
        config = json.loads((base_world / "kb.json").read_text())["config"]
        write_factworld(FactWorldConfig(**{**config, "length_bias": length_bias}), out)
    same = json.loads((out / "kb.json").read_text())["kb"] == json.loads((base_world / "kb.json").read_text())["kb"]
    for name in ("prompts_train.jsonl", "prompts_test.jsonl"):
        same = same and (out / name).read_text() == (base_world / name).read_text()
    if not same:
        raise RuntimeError(f"{out} is not the base world {base_world} with other labels; delete it and rerun")
    return out


def plot(curves: dict[str, list[list[float]]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for i, (name, runs) in enumerate(curves.items()):
        mean = [sum(r[s] for r in runs) / len(runs) for s in range(len(runs[0]))]
        ax.plot(range(1, len(mean) + 1), mean, label=name, color=f"C{i // 2}", linestyle="-" if i % 2 else "--")
    ax.set_xlabel("PPO rollout")
    ax.set_ylabel("response length (tokens, mean of seeds)")
    ax.set_title("PPO from SFT with a length-biased labeller's reward models")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/experiments/base", help="shared FactWorld base (built if missing)")
    p.add_argument("--out", default="runs/experiments/length_bias", help="run directory (never committed)")
    p.add_argument("--length-bias", type=float, default=1.0, help="the biased labeller's logits per extra sentence")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="PPO seeds")
    p.add_argument("--steps", type=int, default=30, help="PPO rollouts per run")
    p.add_argument("--prompts-per-step", type=int, default=32, help="prompts per rollout")
    p.add_argument("--eval-samples", type=int, default=2, help="held-out responses per prompt and policy")
    p.add_argument("--no-readme", action="store_true", help="leave README.md and figures/ alone (plot to --out)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("rlxf", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t0 = time.perf_counter()
    out = Path(args.out)
    base = factworld_base(args.base, progress=False)
    worlds = {"unbiased": base["world"], "biased": biased_world(base["world"], out / "world_biased", args.length_bias)}
    pairs = {labeller: world / "preferences_train.jsonl" for labeller, world in worlds.items()}
    rms = {
        "BT RM, unbiased labels": f"rm:{scalar_rm(base['sft'], pairs['unbiased'], out / 'rm_unbiased')}",
        "BT RM, length-biased labels": f"rm:{scalar_rm(base['sft'], pairs['biased'], out / 'rm_biased')}",
        "seq2seq RM, unbiased labels": f"seq2seq:{factworld_seq2seq_rm(base)}",
        "seq2seq RM, length-biased labels": f"seq2seq:{seq2seq_rm(base['sft'], pairs['biased'], out / 's2s_biased')}",
    }

    def slug(name: str, seed: int) -> str:
        return name.replace(", ", "-").replace(" ", "_") + f"-s{seed}"

    runs = {}
    for name, spec in rms.items():
        for seed in args.seeds:
            logger.info("PPO with %s, seed %d", name, seed)
            runs[(name, seed)] = ppo_arm(base["sft"], base["world"], spec, seed, out / slug(name, seed),
                                         steps=args.steps, prompts_per_step=args.prompts_per_step)  # fmt: skip
    names = ["sft"] + [slug(n, s) for n in rms for s in args.seeds]
    policies = [str(base["sft"])] + [str(out / slug(n, s) / "final") for n in rms for s in args.seeds]
    summary = run_eval(EvalConfig(policies=policies, names=names, world=str(base["world"]), out=str(out / "eval"),
                                  samples_per_prompt=args.eval_samples, seed=0,
                                  generation=GenerationSettings(max_new_tokens=48, temperature=1.0, batch_size=64)))  # fmt: skip
    evals = summary["policies"]
    curves = {n: [runs[(n, s)]["history"]["response/length"] for s in args.seeds] for n in rms}
    table = {}
    for n in rms:
        row = {
            "length, first 5 rollouts": mean_sd([sum(c[:5]) / 5 for c in curves[n]]),
            "length, last 5 rollouts": mean_sd([sum(c[-5:]) / 5 for c in curves[n]]),
        }
        row |= {label: mean_sd([evals[slug(n, s)][key] for s in args.seeds]) for label, key in METRICS.items()}
        table[n] = row
    sft = {label: evals["sft"][key] for label, key in METRICS.items()}
    preference = {labeller: _share_longer_chosen(read_jsonl(path)) for labeller, path in pairs.items()}
    results = {"table": table, "sft": sft, "longer_chosen": preference, "args": vars(args),
               "minutes": (time.perf_counter() - t0) / 60}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=2))
    figures = out if args.no_readme else HERE / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    plot(curves, figures / "length.png")
    block = render(results)
    print(block)
    if not args.no_readme:
        write_results_block(HERE / "README.md", "results", block)
    return results


def _share_longer_chosen(pairs: list[dict]) -> float:
    """Among training pairs of different word counts, the share whose chosen answer is the longer one."""
    differ = [p for p in pairs if len(p["chosen"].split()) != len(p["rejected"].split())]
    return sum(len(p["chosen"].split()) > len(p["rejected"].split()) for p in differ) / max(len(differ), 1)


def render(results: dict) -> str:
    table, args = results["table"], results["args"]
    cols = list(next(iter(table.values())))
    lines = ["| reward model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in row.values()) + " |")
    s = results["sft"]
    lines.append("| SFT (start) | – | – | " + " | ".join(f"{s[label]:.3f}" for label in METRICS) + " |")
    lc = results["longer_chosen"]
    return (
        f"length_bias {args['length_bias']}, seeds {args['seeds']}, {args['steps']} rollouts of "
        f"{args['prompts_per_step']} prompts × 2; mean ± sd over seeds; held-out: 200 prompts × {args['eval_samples']} "
        f"samples. Training pairs of different lengths whose chosen answer is the longer: unbiased labeller "
        f"{lc['unbiased']:.3f}, length-biased {lc['biased']:.3f}. Total {results['minutes']:.1f} min.\n\n"
        + "\n".join(lines)
        + "\n\n![response length over PPO](figures/length.png)\n"
    )


if __name__ == "__main__":
    main()
