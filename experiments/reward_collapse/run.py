"""Reward collapse on LengthWorld with a tiny model: Song, Cai, Lee & Su, "Reward Collapse in Aligning Large Language
Models" (arXiv:2305.17608, §5), docs/methods/reward_collapse.md §4.5 and §5.

    .venv/bin/python experiments/reward_collapse/run.py          # about 3 minutes on 2 CPU cores

1. Write LengthWorld (open prompts: prefixes of 10, 20, …, 80 words; closed: 16–34 and 56–74 words; longer is
   better) and build a tiny Llama with a BPE tokenizer trained on the world's corpus.
2. Train five ranking reward models (r = σ(value), loss −mean Ũ(r_i − r_j) over the 28 pairs of each prompt), one
   per utility: x, log x, −1/x, log σ(4x), and the prompt-aware rule (closed -> x, open -> −1/x). Each run stops at
   25% of its steps (checkpoint), is diagnosed there, then resumes exactly to 100%.
3. Diagnose every model at 25% and 100% with `rlxf.collapse.commands.run_diagnose` (the code behind
   `rlxf collapse diagnose`) on training prompts and on held-out prompts: profile MAE vs the ε-smoothed prediction
   for the utility trained, open-vs-closed gap, prompt independence, pairwise accuracy.
4. Write figures/ and the results block of README.md (between its `results` markers), plus results.json.

Everything is seeded (world, tokenizer corpus, weights, data order); runs go under --out (never committed).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from any directory: import the rlxf of this checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from rlxf.collapse.commands import DiagnoseConfig, run_diagnose  # noqa: E402
from rlxf.collapse.diagnose import COLLAPSED_GAP, MAE_HELD_OUT, MAE_TRAIN, PROMPT_AWARE_GAP  # noqa: E402
from rlxf.config import add_config_arguments, config_from_args  # noqa: E402
from rlxf.engine import TrainConfig  # noqa: E402
from rlxf.hf import load_tokenizer  # noqa: E402
from rlxf.models.reward_model import RewardModel  # noqa: E402
from rlxf.models.tiny import TinyModelConfig, make_tiny_model  # noqa: E402
from rlxf.trainers.ranking_rm import RankingRewardModelConfig, train_ranking_reward_model  # noqa: E402
from rlxf.worlds.lengthworld import LengthWorldConfig, write_lengthworld  # noqa: E402

logger = logging.getLogger("reward_collapse")
HERE = Path(__file__).resolve().parent

# (run name, --utility, label): the four fixed utilities of the paper's figures and its prompt-aware rule.
RUNS: tuple[tuple[str, str, str], ...] = (
    ("linear", "linear", "x"),
    ("log", "log", "log x"),
    ("inverse", "inverse", "−1/x"),
    ("logsigmoid4", "logsigmoid", "log σ(4x)"),
    ("prompt_aware", "prompt_aware", "prompt-aware (closed: x, open: −1/x)"),
)
SPLIT_NAMES = {"train": "training", "test": "held-out"}
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


@dataclass
class ExperimentConfig:
    out: str = "runs/reward_collapse"
    """Directory for the world, the tiny model and the five runs (not committed)."""
    figures: str = str(HERE / "figures")
    """Directory for the PNG figures (committed)."""
    readme: str = str(HERE / "README.md")
    """README whose block between the results markers is rewritten; empty: do not touch it."""
    seed: int = 0
    """Seed of the world, the weights and the data order."""
    train_prompts: int = 1600
    """LengthWorld training prompts (the paper used 8,192); one epoch is `steps` × `prompts_per_step`."""
    test_prompts: int = 64
    """Held-out prompts (the paper used 16)."""
    steps: int = 200
    """Optimiser steps per reward model (the paper used 1,000)."""
    prompts_per_step: int = 8
    """Prompts per optimiser step (8 × 8 responses = 64 sequences per forward pass), as in the paper."""
    lr: float = 1e-3
    """Peak learning rate (10% linear warm-up, linear decay, weight decay 0.01, clip 2.0: the paper's recipe)."""
    diagnose_train_prompts: int = 256
    """Training prompts diagnosed (the first ones of train.jsonl)."""
    vocab_size: int = 1024
    """BPE vocabulary: large enough that most invented words are one token (sequences ≤ ~105 tokens)."""
    hidden_size: int = 64
    """Width of the tiny Llama."""
    layers: int = 2
    """Transformer blocks of the tiny Llama."""
    intermediate_size: int = 128
    """MLP width of the tiny Llama."""
    threads: int = 1
    """Torch CPU threads (0: torch's default). 1 is the robust choice on a shared machine: two threads that wait on
    each other at every op ran 10-20× slower here whenever another process held one of the two cores."""
    only: str = ""
    """Comma-separated run names to train (default: all five)."""


class Clock:
    """Wall and CPU seconds per named stage."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        clock = self

        class _Stage:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), time.process_time()

            def __exit__(self, *exc):
                clock.stages[name] = {
                    "wall_s": time.perf_counter() - self.wall,
                    "cpu_s": time.process_time() - self.cpu,
                }
                logger.info("%s: %.1f s wall, %.1f s CPU", name, *clock.stages[name].values())

        return _Stage()


# ---- 1. world and model --------------------------------------------------------------------------------------------
def build_world_and_model(cfg: ExperimentConfig, out: Path) -> tuple[Path, Path]:
    world = write_lengthworld(
        LengthWorldConfig(
            out=str(out / "lengthworld"), seed=cfg.seed, train_prompts=cfg.train_prompts, test_prompts=cfg.test_prompts
        )
    )
    model = make_tiny_model(
        TinyModelConfig(
            corpus=str(world / "corpus.txt"),
            out=str(out / "tiny-model"),
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            layers=cfg.layers,
            heads=4,
            intermediate_size=cfg.intermediate_size,
            max_position_embeddings=256,
            seed=cfg.seed,
        )
    )
    return world, model


# ---- 2. + 3. one run -----------------------------------------------------------------------------------------------
def rm_config(
    cfg: ExperimentConfig, world: Path, model: Path, run_dir: Path, utility: str
) -> RankingRewardModelConfig:
    return RankingRewardModelConfig(
        model=str(model),
        train_file=str(world / "train.jsonl"),
        eval_file=str(world / "test.jsonl"),
        out=str(run_dir),
        max_length=160,  # the longest prompt + 80-word response is ~105 tokens: nothing is cut
        max_prompt_length=64,
        pack=True,  # each prompt once, its 8 responses attending to it and to themselves: no padding
        loss="ranking",
        utility=utility,
        utility_c=4.0,
        utility_eps=0.1,
        train=TrainConfig(
            batch_size=cfg.prompts_per_step,
            per_device_batch_size=cfg.prompts_per_step,
            max_steps=cfg.steps,
            lr=cfg.lr,
            lr_schedule="linear",
            warmup_steps=cfg.steps // 10,
            weight_decay=0.01,
            max_grad_norm=2.0,
            seed=cfg.seed,
            log_every=10,
            eval_every=cfg.steps // 8,
            stop_after=cfg.steps // 4,
            report_to="none",
            progress=False,
        ),
    )


def diagnose_both(cfg: ExperimentConfig, rm_dir: Path, world: Path, tag: str) -> dict[str, Any]:
    """run_diagnose on the first training prompts and on the held-out prompts."""
    out = {}
    for split, data, held_out, limit in (
        ("train", "train.jsonl", False, cfg.diagnose_train_prompts),
        ("test", "test.jsonl", True, 0),
    ):
        out[split] = run_diagnose(
            DiagnoseConfig(
                rm=str(rm_dir),
                data=str(world / data),
                out=str(rm_dir.parent / f"diagnose-{tag}-{split}"),
                held_out=held_out,
                max_prompts=limit,
            )
        )
    return out


def run_one(cfg: ExperimentConfig, world: Path, model: Path, out: Path, name: str, utility: str) -> dict[str, Any]:
    run_dir = out / name
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: never resume a stale checkpoint
    rm_cfg = rm_config(cfg, world, model, run_dir, utility)
    # stops at 25% of the steps with a checkpoint
    first = train_ranking_reward_model(rm_cfg, model=RewardModel.from_pretrained(model))
    assert not first["finished"], "the first leg should stop at 25% of the steps"
    # The checkpoint holds the model at 25%; save it as a plain reward model directory for run_diagnose.
    at_25 = run_dir / "at_25pct"
    rm_25 = RewardModel.from_pretrained(model)
    ckpt = sorted((run_dir / "checkpoints").glob("step-*"))[-1]
    rm_25.load_state_dict(load_file(str(ckpt / "model.safetensors")))
    rm_25.save_pretrained(at_25)
    load_tokenizer(model).save_pretrained(at_25)
    diag_25 = diagnose_both(cfg, at_25, world, "25pct")

    rm_cfg.train.resume, rm_cfg.train.stop_after = True, 0
    second = train_ranking_reward_model(rm_cfg, model=RewardModel.from_pretrained(model))
    assert second["finished"]
    diag_100 = diagnose_both(cfg, run_dir / "final", world, "100pct")
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"25": diag_25, "100": diag_100, "history": history}


# ---- 4. figures and table ------------------------------------------------------------------------------------------
def _profiles(summary: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
    rows = [json.loads(line) for line in Path(summary["profiles_file"]).read_text().splitlines()]
    return np.array([r["profile"] for r in rows]), [r["prompt_type"] for r in rows]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=90)
    FigureCanvasAgg(fig)
    return fig


def plot_profile_grid(results: dict[str, Any], split: str, path: Path) -> None:
    """Rows: 25% and 100% of training; columns: the utilities. Mean sorted profile per prompt type with a 10–90%
    band, and the ε-smoothed prediction (dashed)."""
    names = [n for n, _, _ in RUNS if n in results]
    fig = _figure(3.0 * len(names), 5.6)
    x = np.arange(1, 9)
    for col, name in enumerate(names):
        for row, when in enumerate(("25", "100")):
            summary = results[name][when][split]
            prof, types = _profiles(summary)
            ax = fig.add_subplot(2, len(names), row * len(names) + col + 1)
            for t, colour in (("open", "C1"), ("closed", "C0")):
                g = prof[np.array(types) == t]
                ax.plot(x, g.mean(0), "o-", ms=3, color=colour, label=f"{t}")
                ax.fill_between(x, np.quantile(g, 0.1, 0), np.quantile(g, 0.9, 0), color=colour, alpha=0.2, lw=0)
                pred = summary["prediction"].get(t)
                ax.plot(x, pred, "--", color=colour if summary["prompt_aware"] else "k", lw=1)
            gap = summary["gap"]
            ax.set_title(f"{LABELS[name]}, {when}%\ngap {gap:.3f}", fontsize=8)
            ax.set_ylim(-0.03, 1.03)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("reward", fontsize=8)
            if row == 1:
                ax.set_xlabel("rank (worst → best)", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(
        f"Sorted reward profiles on {SPLIT_NAMES[split]} prompts (dashed: prediction for the utility trained)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path)


def plot_gap_dynamics(results: dict[str, Any], cfg: ExperimentConfig, path: Path) -> None:
    """Held-out open-vs-closed gap over training (the trainer's evaluations every steps/8)."""
    fig = _figure(5.6, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, _, label) in enumerate(r for r in RUNS if r[0] in results):
        points = [(h["step"], h["eval/gap"]) for h in results[name]["history"] if "eval/gap" in h]
        steps, gaps = zip(*sorted(dict(points).items()))
        ax.plot(np.array(steps) / cfg.steps * 100, gaps, "o-", ms=3, color=f"C{i}", label=label)
    ax.axhline(COLLAPSED_GAP, color="grey", ls=":", lw=1)
    ax.axhline(PROMPT_AWARE_GAP, color="grey", ls="--", lw=1)
    ax.set_xlabel("% of training")
    ax.set_ylabel("open-vs-closed gap (held-out)")
    ax.set_title("Gap over training (dotted: collapse ≤ 0.03; dashed: separated ≥ 0.15)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


LABELS = {name: label for name, _, label in RUNS}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def results_block(results: dict[str, Any], cfg: ExperimentConfig, clock: Clock, total_wall: float) -> str:
    lines = [
        MARK_START,
        "",
        "| utility trained | profile MAE train 25% → 100% | profile MAE held-out 100% | gap train 25% → 100% "
        "| gap held-out 25% → 100% | predicted gap | prompt independence train 100% | held-out pairwise acc. |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, label in RUNS:
        if name not in results:
            continue
        r = results[name]
        t25, t100, h25, h100 = r["25"]["train"], r["100"]["train"], r["25"]["test"], r["100"]["test"]

        def mae(s: dict[str, Any]) -> float:
            return max(s["profile_mae"].values())  # the worst group (all / open / closed)

        indep = t100["prompt_independence"]
        indep_v = max(v for g, v in indep.items() if g != "all") if t100["prompt_aware"] else indep["all"]
        lines.append(
            f"| {label} | {_fmt(mae(t25))} → **{_fmt(mae(t100))}** | {_fmt(mae(h100))} "
            f"| {_fmt(t25['gap'])} → **{_fmt(t100['gap'])}** | {_fmt(h25['gap'])} → {_fmt(h100['gap'])} "
            f"| {_fmt(t100['predicted_gap'])} | {_fmt(indep_v)} | {_fmt(h100['pairwise_accuracy'])} |"
        )
    lines += [
        "",
        f"Targets (spec §4.5): profile MAE ≤ {MAE_TRAIN} on training prompts (≤ {MAE_HELD_OUT} held out), "
        f"gap ≤ {COLLAPSED_GAP} with a fixed U and ≥ {PROMPT_AWARE_GAP} with the prompt-aware rule, prompt "
        "independence ≤ 0.05. Profile MAE is the worst of the groups (all, open, closed); predicted gap is the gap "
        "between the predictions for open and closed prompts (0 for a fixed U).",
        "",
        "Mean sorted profiles at 100% on training prompts (worst → best) against the ε-smoothed prediction:",
        "",
        "| utility trained | type | mean profile | prediction |",
        "|---|---|---|---|",
    ]
    for name, _, label in RUNS:
        if name not in results:
            continue
        s = results[name]["100"]["train"]
        for t in ("closed", "open"):
            prof = ", ".join(f"{v:.2f}" for v in s["mean_profile"][t])
            pred = ", ".join(f"{v:.2f}" for v in s["prediction"][t])
            lines.append(f"| {label} | {t} | {prof} | {pred} |")
    stages = ", ".join(f"{k} {v['wall_s']:.0f} s" for k, v in clock.stages.items())
    lines += [
        "",
        f"Wall time {total_wall / 60:.1f} min on {os.cpu_count()} CPU cores (torch threads {torch.get_num_threads()}, "
        f"{platform.processor() or platform.machine()}); per stage: {stages}. CPU time "
        f"{sum(v['cpu_s'] for v in clock.stages.values()) / 60:.1f} min. Load average at the end: "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}.",
        "",
        MARK_END,
    ]
    return "\n".join(lines)


def write_readme_block(readme: Path, block: str) -> None:
    text = readme.read_text(encoding="utf-8") if readme.exists() else f"{MARK_START}\n{MARK_END}\n"
    if MARK_START not in text or MARK_END not in text:
        raise ValueError(f"{readme} has no {MARK_START} … {MARK_END} block to rewrite")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    readme.write_text(head + block + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, ExperimentConfig)
    cfg = config_from_args(ExperimentConfig, parser.parse_args(argv))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("rlxf.data", "rlxf.data.tokenize", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = Clock()
    with clock("world+model"):
        world, model = build_world_and_model(cfg, out)
    only = [s for s in cfg.only.split(",") if s] or [name for name, _, _ in RUNS]
    results: dict[str, Any] = {}
    for name, utility, _ in RUNS:
        if name in only:
            with clock(name):
                results[name] = run_one(cfg, world, model, out, name, utility)
    figures = Path(cfg.figures)
    figures.mkdir(parents=True, exist_ok=True)
    with clock("figures"):
        plot_profile_grid(results, "train", figures / "profiles_train.png")
        plot_profile_grid(results, "test", figures / "profiles_heldout.png")
        plot_gap_dynamics(results, cfg, figures / "gap_dynamics.png")
    total = time.perf_counter() - start
    block = results_block(results, cfg, clock, total)
    summary = {
        name: {when: {split: {k: v for k, v in s.items() if k not in ("plot", "profiles_file")} for split, s in d.items()}
               for when, d in r.items() if when != "history"}
        for name, r in results.items()
    }  # fmt: skip
    (out / "results.json").write_text(
        json.dumps(
            {"config": cfg.__dict__, "timing": clock.stages, "total_wall_s": total, "results": summary}, indent=2
        )
    )
    if cfg.readme:
        write_readme_block(Path(cfg.readme), block)
    print(block)
    print(
        f"total wall time {total / 60:.1f} min; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
