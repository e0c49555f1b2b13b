"""`rlxf demo`: the whole pipeline on FactWorld with a tiny model, end to end, in a few minutes on a CPU.

world → tokenizer + tiny Llama → SFT → sample pairs from the SFT policy → simulated-human labels → reward model
→ DPO → evaluation of SFT vs DPO → runs/<name>/report.md with the table and PNG plots.
Each stage is the same code the CLI runs; the demo only chooses settings and files.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from rlxf.config import check_ranges
from rlxf.engine import TrainConfig
from rlxf.evaluation import EvalConfig, markdown_table, run_eval
from rlxf.feedback.pairs import PairsConfig, run_pairs
from rlxf.models.tiny import TinyModelConfig, make_tiny_model
from rlxf.sampling import GenerationSettings
from rlxf.trainers.dpo import DPOConfig, train_dpo
from rlxf.trainers.rm import RewardModelConfig, train_reward_model
from rlxf.trainers.sft import SFTConfig, train_sft
from rlxf.worlds.factworld import FactWorldConfig, write_factworld

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    name: str = "demo"
    """Run name: everything is written to <runs_dir>/<name>/."""
    runs_dir: str = "runs"
    """Parent directory of all runs."""
    seed: int = 0
    """Seed of the world, the model initialisation, the data order and the sampling."""
    num_train_prompts: int = 500
    """FactWorld training prompts (the SFT data and the preference pairs are drawn from them)."""
    num_test_prompts: int = 200
    """FactWorld held-out prompts used by the evaluation."""
    vocab_size: int = 512
    """Tokenizer vocabulary."""
    hidden_size: int = 128
    """Width of the tiny Llama."""
    layers: int = 2
    """Transformer blocks of the tiny Llama."""
    sft_epochs: float = 8.0
    """Passes over the SFT data."""
    sft_lr: float = 3e-3
    """SFT learning rate."""
    pairs_per_prompt: int = 4
    """Responses sampled per training prompt from the SFT policy; every distinct pair is labelled."""
    label_temperature: float = 0.5
    """Simulated human's temperature T (label noise)."""
    rm_epochs: float = 2.0
    """Passes of the reward model over the sampled pairs."""
    rm_lr: float = 1e-3
    """Reward-model learning rate."""
    dpo_epochs: float = 2.0
    """Passes of DPO over the sampled pairs."""
    dpo_beta: float = 0.1
    """DPO β."""
    dpo_lr: float = 1e-4
    """DPO learning rate."""
    eval_samples_per_prompt: int = 4
    """Responses per held-out prompt and policy in the evaluation."""
    max_new_tokens: int = 48
    """Longest sampled response in tokens."""
    batch_size: int = 32
    """Examples per optimiser step in every training stage."""
    progress: bool = True
    """Show progress bars."""
    threads: int = 0
    """CPU threads torch uses (torch.set_num_threads) in every stage; 0 keeps torch's default (one per core)."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "num_train_prompts": ">=1",
                "num_test_prompts": ">=1",
                "vocab_size": ">=16",
                "hidden_size": ">=1",
                "layers": ">=1",
                "sft_epochs": ">0",
                "sft_lr": ">0",
                "pairs_per_prompt": ">=2",
                "label_temperature": ">=0",
                "rm_epochs": ">0",
                "rm_lr": ">0",
                "dpo_epochs": ">0",
                "dpo_beta": ">0",
                "dpo_lr": ">0",
                "eval_samples_per_prompt": ">=1",
                "max_new_tokens": ">=1",
                "batch_size": ">=1",
                "seed": ">=0",
                "threads": ">=0",
            },
        )


def run_demo(cfg: DemoConfig) -> Path:
    root = Path(cfg.runs_dir) / cfg.name
    root.mkdir(parents=True, exist_ok=True)
    if cfg.threads:  # sampling and evaluation run outside the engine, so the setting is made here for every stage
        torch.set_num_threads(cfg.threads)
    timings: dict[str, float] = {}

    def stage(name: str):
        logger.info("── %s", name)
        timings[name] = time.perf_counter()

    def done(name: str) -> None:
        timings[name] = time.perf_counter() - timings[name]

    def train(epochs: float, lr: float, **kw: Any) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            lr=lr,
            batch_size=cfg.batch_size,
            per_device_batch_size=cfg.batch_size,
            warmup_steps=10,
            seed=cfg.seed,
            progress=cfg.progress,
            threads=cfg.threads,
            **kw,
        )

    generation = GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=1.0, batch_size=64)

    stage("world")
    world = root / "world"
    write_factworld(
        FactWorldConfig(seed=cfg.seed, num_train_prompts=cfg.num_train_prompts, num_test_prompts=cfg.num_test_prompts),
        world,
    )
    done("world")

    stage("tiny model")
    tiny = make_tiny_model(
        TinyModelConfig(
            corpus=str(world / "corpus.txt"),
            out=str(root / "tiny"),
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=4 * cfg.hidden_size,
            layers=cfg.layers,
            seed=cfg.seed,
        )
    )
    done("tiny model")

    stage("sft")
    train_sft(
        SFTConfig(
            model=str(tiny),
            train_file=str(world / "sft_train.jsonl"),
            eval_file=str(world / "sft_test.jsonl"),
            out=str(root / "sft"),
            train=train(cfg.sft_epochs, cfg.sft_lr, eval_every=100),
        )
    )
    sft_model = root / "sft" / "final"
    done("sft")

    stage("pairs")
    pairs = run_pairs(
        PairsConfig(
            model=str(sft_model),
            prompts_file=str(world / "prompts_train.jsonl"),
            out=str(root / "pairs.jsonl"),
            world=str(world),
            label_temperature=cfg.label_temperature,
            k=cfg.pairs_per_prompt,
            generation=generation,
            seed=cfg.seed,
        )
    )
    done("pairs")

    stage("reward model")
    train_reward_model(
        RewardModelConfig(
            model=str(sft_model),
            train_file=str(pairs),
            eval_file=str(world / "preferences_test.jsonl"),
            out=str(root / "rm"),
            train=train(cfg.rm_epochs, cfg.rm_lr, eval_every=50),
        )
    )
    done("reward model")

    stage("dpo")
    dpo = train_dpo(
        DPOConfig(
            model=str(sft_model),
            train_file=str(pairs),
            eval_file=str(world / "preferences_test.jsonl"),  # the held-out curve; evaluation draws no random numbers
            out=str(root / "dpo"),
            beta=cfg.dpo_beta,
            train=train(cfg.dpo_epochs, cfg.dpo_lr, eval_every=50),
        )
    )
    done("dpo")

    stage("eval")
    summary = run_eval(
        EvalConfig(
            policies=[str(sft_model), str(root / "dpo" / "final")],
            names=["sft", "dpo"],
            world=str(world),
            reward_model=str(root / "rm" / "final"),
            out=str(root / "eval"),
            samples_per_prompt=cfg.eval_samples_per_prompt,
            generation=generation,
            seed=cfg.seed,
        )
    )
    done("eval")

    figures = plot_demo(root)
    report = root / "report.md"
    # DPO's policy is itself a reward model, r = β log π_dpo / π_sft (the likelihood-ratio RM of
    # experiments/judges): its last held-out evaluation ranks the same pairs as the BT RM's accuracy above.
    summary["dpo_implicit_rm_accuracy"] = dpo["eval"].get("eval/rewards_accuracies", float("nan"))
    report.write_text(render_report(cfg, summary, timings, figures, root))
    (root / "summary.json").write_text(json.dumps({"eval": summary, "timings_s": timings}, indent=2))
    logger.info("report written to %s (total %.0f s)", report, sum(timings.values()))
    return report


def smoothed(values: list[float], window: int = 15) -> list[float]:
    """Trailing moving average (the first points average what exists): the trend of a noisy per-batch metric."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


# (stage, row, y label, [(train metric, held-out metric, label)], reference line or None)
DEMO_PANELS = [
    ("sft", 0, "NLL per completion token", [("loss/nll", "eval/nll", "NLL")], None),
    ("sft", 1, "learning rate", [("train/lr", None, "learning rate")], None),
    ("rm", 0, "Bradley–Terry loss", [("loss/bt", "eval/bt_loss", "BT loss")], (0.6931, "ln 2 (chance)")),
    ("rm", 1, "pairwise accuracy", [("rewards/accuracies", "eval/pairwise_accuracy", "accuracy")], (0.5, "chance")),
    ("dpo", 0, "DPO loss", [("loss/dpo", "eval/loss_dpo", "DPO loss")], (0.6931, "ln 2 (start)")),
    ("dpo", 1, "reward accuracy", [("rewards/accuracies", "eval/rewards_accuracies", "accuracy")], (0.5, "chance")),
]


def plot_demo(root: Path) -> dict[str, str]:
    """Training curves (losses on the top row, accuracies below; per-batch values faint with their moving average,
    held-out values as dots) and the gold-score distributions of SFT and DPO responses, as PNG files."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 6.4))
    axes = fig.subplots(2, 3, sharex="col")
    columns = {"sft": 0, "rm": 1, "dpo": 2}
    titles = {"sft": "SFT", "rm": "reward model", "dpo": "DPO"}
    for stage, row, ylabel, series, reference in DEMO_PANELS:
        ax = axes[row, columns[stage]]
        records = [json.loads(line) for line in (root / stage / "metrics.jsonl").read_text().splitlines()]
        for train_key, eval_key, label in series:
            points = [(r["step"], r[train_key]) for r in records if train_key in r]
            if points:
                steps, values = zip(*points)
                noisy = not train_key.startswith("train/")
                ax.plot(steps, values, color="C0", alpha=0.25 if noisy else 1.0, linewidth=1)
                if noisy:
                    ax.plot(steps, smoothed(list(values)), color="C0", label=f"train {label} (moving average)")
            held_out = [(r["step"], r[eval_key]) for r in records if eval_key and eval_key in r]
            if held_out:
                ax.plot(*zip(*held_out), color="C1", marker="o", markersize=4, label=f"held-out {label}")
        if reference is not None:
            ax.axhline(reference[0], color="grey", linestyle=":", linewidth=1, label=reference[1])
        if row == 0:
            ax.set_title(titles[stage])
        else:
            ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    curves = root / "training_curves.png"
    fig.savefig(curves, dpi=110)

    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    gold = {
        name: [
            json.loads(line)["gold"] for line in (root / "eval" / f"responses_{name}.jsonl").read_text().splitlines()
        ]
        for name in ("sft", "dpo")
    }
    lowest = min(min(g) for g in gold.values())
    for name, scores in gold.items():
        ax.hist(
            scores, bins=24, range=(lowest, 1.0), alpha=0.55, label=f"{name} (mean {sum(scores) / len(scores):.2f})"
        )
    ax.set_xlabel("gold score of a held-out response (1 = every requested fact right)")
    ax.set_ylabel("responses")
    ax.set_title("Gold scores of SFT and DPO answers to the held-out prompts")
    ax.legend()
    fig.tight_layout()
    dist = root / "gold_scores.png"
    fig.savefig(dist, dpi=110)
    return {"curves": curves.name, "gold": dist.name}


def render_report(
    cfg: DemoConfig, summary: dict, timings: dict[str, float], figures: dict[str, str], root: Path
) -> str:
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in timings.items())
    return f"""# rlxf demo: SFT vs DPO on FactWorld

Regenerate with `rlxf demo --name {cfg.name}` (settings below). Held-out prompts: {cfg.num_test_prompts},
{cfg.eval_samples_per_prompt} sampled responses each (temperature 1). The win rate counts ties as ½; the interval is a
normal-approximation 95% interval.

{markdown_table(summary)}
DPO policy read as a likelihood-ratio reward model (β log π_dpo / π_sft, `dpo:DIR:SFT`): pairwise accuracy
{summary.get("dpo_implicit_rm_accuracy", float("nan")):.3f} on the same held-out pairs (ties count as wrong).

![training curves]({figures["curves"]})

![gold scores]({figures["gold"]})

## Wall time (seconds)

| stage | s |
|---|---|
{rows}
| **total** | {sum(timings.values()):.1f} |

## Settings

```json
{json.dumps(asdict(cfg), indent=2)}
```
"""
