"""The FactWorld starting point the alignment experiments share: world, tokenizer + tiny Llama, SFT policy, pairs
sampled from it and labelled by the simulated human, and a Bradley–Terry reward model on them.

The settings are the demo's (`rlxf.demo.DemoConfig`), so the numbers connect to the README's demo table. Each stage
is skipped when its output exists, so experiments run one after another reuse one base (delete the directory to
rebuild it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any directory: import the rlxf of this checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rlxf.demo import DemoConfig  # noqa: E402
from rlxf.engine import TrainConfig  # noqa: E402
from rlxf.feedback.pairs import PairsConfig, run_pairs  # noqa: E402
from rlxf.models.tiny import TinyModelConfig, make_tiny_model  # noqa: E402
from rlxf.sampling import GenerationSettings  # noqa: E402
from rlxf.trainers.rm import RewardModelConfig, train_reward_model  # noqa: E402
from rlxf.trainers.sft import SFTConfig, train_sft  # noqa: E402
from rlxf.worlds.factworld import FactWorldConfig, write_factworld  # noqa: E402

logger = logging.getLogger(__name__)


def factworld_base(
    root: str | Path, seed: int = 0, progress: bool = True, world: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Build (or reuse) the base under `root`; returns the paths: world, sft, pairs, rm. `world` overrides
    FactWorldConfig fields (e.g. {"abstain_prob": 0.1}) for a variant base under another root."""
    root = Path(root)
    cfg = DemoConfig(seed=seed, progress=progress)
    paths = {
        "world": root / "world",
        "tiny": root / "tiny",
        "sft": root / "sft" / "final",
        "pairs": root / "pairs.jsonl",
        "rm": root / "rm" / "final",
    }

    def train(epochs: float, lr: float, **kw) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            lr=lr,
            batch_size=cfg.batch_size,
            per_device_batch_size=cfg.batch_size,
            warmup_steps=10,
            seed=seed,
            progress=progress,
            report_to="none",
            **kw,
        )

    if not (paths["world"] / "README.md").exists():
        logger.info("base: writing FactWorld")
        write_factworld(
            FactWorldConfig(
                seed=seed,
                num_train_prompts=cfg.num_train_prompts,
                num_test_prompts=cfg.num_test_prompts,
                **(world or {}),
            ),
            paths["world"],
        )
    if not (paths["tiny"] / "config.json").exists():
        make_tiny_model(
            TinyModelConfig(
                corpus=str(paths["world"] / "corpus.txt"),
                out=str(paths["tiny"]),
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size,
                intermediate_size=4 * cfg.hidden_size,
                layers=cfg.layers,
                seed=seed,
            )
        )
    if not (paths["sft"] / "config.json").exists():
        logger.info("base: SFT")
        train_sft(
            SFTConfig(
                model=str(paths["tiny"]),
                train_file=str(paths["world"] / "sft_train.jsonl"),
                eval_file=str(paths["world"] / "sft_test.jsonl"),
                out=str(root / "sft"),
                train=train(cfg.sft_epochs, cfg.sft_lr, eval_every=100),
            )
        )
    if not paths["pairs"].exists():
        logger.info("base: sampling and labelling pairs")
        run_pairs(
            PairsConfig(
                model=str(paths["sft"]),
                prompts_file=str(paths["world"] / "prompts_train.jsonl"),
                out=str(paths["pairs"]),
                world=str(paths["world"]),
                label_temperature=cfg.label_temperature,
                k=cfg.pairs_per_prompt,
                generation=GenerationSettings(max_new_tokens=cfg.max_new_tokens, temperature=1.0, batch_size=64),
                seed=seed,
            )
        )
    if not (paths["rm"] / "config.json").exists():
        logger.info("base: reward model")
        train_reward_model(
            RewardModelConfig(
                model=str(paths["sft"]),
                train_file=str(paths["pairs"]),
                eval_file=str(paths["world"] / "preferences_test.jsonl"),
                out=str(root / "rm"),
                train=train(cfg.rm_epochs, cfg.rm_lr, eval_every=50),
            )
        )
    return paths


IMPLICIT_RM_LR, IMPLICIT_RM_EPOCHS = 1e-4, 2.0
"""The likelihood-ratio reward model's recipe (`experiments/judges/implicit_rm.py`, its first setting)."""

SEQ2SEQ_RM_LR, SEQ2SEQ_RM_EPOCHS = IMPLICIT_RM_LR, IMPLICIT_RM_EPOCHS
"""The seq2seq reward model's recipe: the likelihood-ratio RM's, fixed before any seq2seq number was seen."""


def judge_train_config(epochs: float, lr: float, seed: int = 0, progress: bool = False) -> TrainConfig:
    """How every FactWorld judge trains: batch 32, 10 warm-up steps, no reports; an unfinished run is replaced."""
    return TrainConfig(epochs=epochs, lr=lr, batch_size=32, per_device_batch_size=32, warmup_steps=10, seed=seed,
                       progress=progress, report_to="none", overwrite=True)  # fmt: skip


# The judges below start from the SFT policy and train on a file of simulated-human pairs with the human's sampled
# choices as targets, never gold. Each returns its final/ directory and is reused once finished (delete `out` to redo).


def scalar_rm(sft: str | Path, train_file: str | Path, out: Path, seed: int = 0, progress: bool = False) -> Path:
    """The demo's Bradley–Terry recipe (2 epochs, lr 1e-3) with hard labels (read as `rm:DIR`)."""
    if not (out / "final" / "config.json").exists():
        cfg = DemoConfig()
        train_reward_model(RewardModelConfig(model=str(sft), train_file=str(train_file), out=str(out),
                                             use_label_prob=False,
                                             train=judge_train_config(cfg.rm_epochs, cfg.rm_lr, seed, progress)))  # fmt: skip
    return out / "final"


def implicit_rm(sft: str | Path, train_file: str | Path, out: Path, seed: int = 0, progress: bool = False,
                lr: float = IMPLICIT_RM_LR, epochs: float = IMPLICIT_RM_EPOCHS, beta: float = 0.1) -> Path:  # fmt: skip
    """The likelihood-ratio reward model r = β·log π/π_sft: a BT model trained by `rlxf dpo` (read as `dpo:DIR:SFT`)."""
    from rlxf.trainers.dpo import DPOConfig, train_dpo

    if not (out / "final" / "config.json").exists():
        train_dpo(DPOConfig(model=str(sft), train_file=str(train_file), out=str(out), beta=beta,
                            train=judge_train_config(epochs, lr, seed, progress)))  # fmt: skip
    return out / "final"


def seq2seq_rm(sft: str | Path, train_file: str | Path, out: Path, seed: int = 0, progress: bool = False,
               lr: float = SEQ2SEQ_RM_LR, epochs: float = SEQ2SEQ_RM_EPOCHS) -> Path:  # fmt: skip
    """`rlxf seq2seq-rm` (arXiv 2409.00162; read as `seq2seq:DIR`), no held-out split (the test pairs stay unseen).

    `use_label_prob` is off: a FactWorld row's `label_prob` is the simulated human's P(chosen ≻ rejected) =
    σ(Δgold / T), and orienting pairs by it (the trainer's default for soft-labelled data) would hand the RM the gold
    order of every pair."""
    from rlxf.trainers.seq2seq_rm import Seq2SeqRMConfig, train_seq2seq_rm

    if not (out / "final" / "config.json").exists():
        train_seq2seq_rm(Seq2SeqRMConfig(model=str(sft), train_file=str(train_file), out=str(out),
                                         use_label_prob=False, early_stop_patience=0,
                                         train=judge_train_config(epochs, lr, seed, progress)))  # fmt: skip
    return out / "final"


def factworld_implicit_rm(base: dict[str, Path], seed: int = 0, progress: bool = False) -> Path:
    """The base's likelihood-ratio reward model, on the world's own training pairs. Built once under the base."""
    return implicit_rm(base["sft"], base["world"] / "preferences_train.jsonl", base["world"].parent / "implicit_rm",
                       seed, progress)  # fmt: skip


def factworld_seq2seq_rm(base: dict[str, Path], seed: int = 0, progress: bool = False) -> Path:
    """The base's seq2seq reward model, on the world's own training pairs. Built once under the base."""
    return seq2seq_rm(base["sft"], base["world"] / "preferences_train.jsonl", base["world"].parent / "seq2seq_rm",
                      seed, progress)  # fmt: skip


def pair_outcomes(source: Any, pairs: list[dict[str, Any]], tokenizer: Any) -> list[float]:
    """Per preference pair, whether a reward source's summed reward R(y) = Σ_t r_t prefers the pair's `chosen`:
    1, 0, or ½ on a tie (`rlxf.losses.pairwise_accuracy`)."""
    import torch

    from rlxf.data.tokenize import encode_preferences
    from rlxf.losses import pairwise_accuracy

    encoded = encode_preferences(pairs, tokenizer)
    prompts = [{"prompt_ids": e["prompt_ids"]} for e in encoded]

    @torch.no_grad()
    def total(side: str) -> torch.Tensor:
        rewards, mask = source(prompts, [e[side] for e in encoded], [""] * len(encoded), tokenizer)
        return (rewards * mask).sum(-1)

    return pairwise_accuracy(total("chosen_ids"), total("rejected_ids"), reduction="none").tolist()


def ppo_arm(sft: str | Path, world: str | Path, spec: str, seed: int, out: Path, *, steps: int = 30,
            prompts_per_step: int = 32, k: int = 2, lr: float = 1e-4, value_lr: float = 1e-3, kl_coef: float = 0.05,
            progress: bool = False) -> dict:  # fmt: skip
    """One PPO run from the SFT policy on the world's training prompts with reward `spec`, in the settings every
    FactWorld experiment shares (shared value head, 48 new tokens, constant lr); the world's gold score of the
    rollouts is logged, never trained on. A finished run is reused (delete `out` to redo it).
    Returns {"history": engine metrics per rollout, "seconds": wall time}."""
    from rlxf.trainers.ppo import PPOConfig, train_ppo

    done = out / "run.json"
    if done.exists() and (out / "final" / "config.json").exists():
        return json.loads(done.read_text())
    cfg = PPOConfig(
        model=str(sft), prompts_file=str(Path(world) / "prompts_train.jsonl"), reward=spec, out=str(out),
        gold_world=str(world), shared_value_head=True, value_lr=value_lr, k=k, kl_coef=kl_coef,
        generation=GenerationSettings(max_new_tokens=48, temperature=1.0, batch_size=64),
        train=TrainConfig(lr=lr, batch_size=prompts_per_step, per_device_batch_size=min(16, prompts_per_step),
                          max_steps=steps, lr_schedule="constant", seed=seed, progress=progress, report_to="none"),
    )  # fmt: skip
    start = time.perf_counter()
    result = train_ppo(cfg)
    record = {"history": result["history"], "seconds": time.perf_counter() - start}
    done.write_text(json.dumps(record))
    return record


def greedy_answers(
    model_dir: str | Path, prompts: Any, max_new_tokens: int = 63, batch_size: int = 32
) -> dict[str, str]:
    """The greedy answer (text, stripped) of the causal LM at `model_dir` to each distinct prompt string."""
    from rlxf.data.tokenize import encode_prompts
    from rlxf.hf import load_policy
    from rlxf.sampling import decode_samples, generate

    unique = sorted(set(prompts))
    model, tokenizer = load_policy(str(model_dir))
    rows = encode_prompts([{"prompt": p} for p in unique], tokenizer)
    settings = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    samples = generate(model, [r["prompt_ids"] for r in rows], eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, settings=settings)  # fmt: skip
    return {p: t[0].strip() for p, t in zip(unique, decode_samples(tokenizer, samples))}


def update_judges_json(path: Path, figures: dict[str, tuple[Any, str]]) -> dict[str, Any]:
    """Set each figure of experiments/judges.json to its value, with the command that measured it in `commands`;
    the other figures stay. `figures`: {key: (value, command)}. Returns the whole file's content."""
    judges = json.loads(path.read_text()) if path.exists() else {"commands": {}}
    for key, (value, command) in figures.items():
        judges[key] = value
        judges["commands"][key] = command
    path.write_text(json.dumps(judges, indent=2, sort_keys=True) + "\n")
    return judges


def write_results_block(readme: Path, marker: str, block: str) -> None:
    """Replace what stands between `<!-- marker -->` and `<!-- /marker -->` in `readme` with `block`."""
    head, _, rest = readme.read_text().partition(f"<!-- {marker} -->")
    _, _, tail = rest.partition(f"<!-- /{marker} -->")
    readme.write_text(f"{head}<!-- {marker} -->\n{block}\n<!-- /{marker} -->{tail}")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of per-seed results."""
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / max(len(xs) - 1, 1))
