"""`rlxf collapse diagnose` and `rlxf collapse predict`: configs and run functions (the CLI prints what they return).

- `run_diagnose(DiagnoseConfig)`: score every response of a rankings file with a reward model, sort each prompt's
  rewards into a profile, and check them against the profile predicted for the utility the model was trained with
  (docs/methods/reward_collapse.md §4.5): profile MAE, open-vs-closed gap, prompt independence, pairwise accuracy.
  Writes diagnose.json, profiles.jsonl and profiles.png.
- `run_predict(PredictConfig)`: the predicted n-point profile of a utility (pure and ε-smoothed optimum, limit law);
  writes predict.json and predict.png.

Rewards are r = σ(value at the last token): exactly the trained reward for loss=ranking; for a model trained with an
unbounded loss (Bradley–Terry, Plackett–Luce) σ bounds it so the profile can be compared at all
(docs/methods/reward_collapse.md §6).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from rlxf.collapse.diagnose import ALL, diagnose, plot_profiles, predict_plot, reward_profiles
from rlxf.collapse.ranking import (
    PROMPT_AWARE,
    diagnostic_groups,
    ranking_pairwise_accuracy,
    row_utilities,
    score_rankings,
    utility_from_options,
)
from rlxf.collapse.utilities import openness_utility
from rlxf.config import check_ranges
from rlxf.data.formats import load_rankings
from rlxf.data.tokenize import encode_rankings
from rlxf.errors import UserError
from rlxf.hf import load_model, load_tokenizer
from rlxf.models.reward_model import RewardModel

logger = logging.getLogger(__name__)


@dataclass
class DiagnoseConfig:
    rm: str = ""
    """Reward model: a `final/` directory written by `rlxf ranking-rm` (or `rlxf rm`), its run directory, or any saved
    reward model. Required."""
    data: str = ""
    """Rankings to score (`prompt`, `responses` best -> worst or + `scores`, optional `prompt_type` / `openness`).
    Required."""
    out: str = ""
    """Directory for diagnose.json, profiles.jsonl and profiles.png; empty: `<rm>/diagnose`."""
    utility: str = ""
    """Utility to predict the profile for: linear, log, inverse, power, neg_power, logsigmoid or prompt_aware. Empty:
    the utility of the training run (its config.json, next to `final/`)."""
    utility_gamma: float = 0.5
    """γ of power / neg_power, used with --utility."""
    utility_c: float = 4.0
    """c of logsigmoid, used with --utility."""
    utility_eps: float = 0.1
    """ε of the smoothed training form, used with --utility."""
    smoothed: bool = True
    """Compare with the optimum of the ε-smoothed utility (what training optimises) rather than the pure U."""
    held_out: bool = False
    """The prompts were not trained on: the profile-MAE check uses 0.08 instead of 0.05
    (docs/methods/reward_collapse.md §4.5)."""
    max_prompts: int = 0
    """Diagnose only the first N prompts of the file (0: all)."""
    max_length: int = 0
    """Longest prompt + response in tokens (prompts are cut from the left, responses never); 0: the training run's
    value, or no limit without a training config."""
    max_prompt_length: int = 0
    """Longest prompt in tokens; 0: the training run's value, or no limit without a training config."""
    batch_size: int = 64
    """Sequences per forward pass."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed or over-long row does: stop with an error, or be skipped and written to a side file."""
    device: str = "auto"
    """Torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ..."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "utility_gamma": ">0",
                "utility_c": ">0",
                "utility_eps": ">=0",
                "max_prompts": ">=0",
                "max_length": ">=0",
                "max_prompt_length": ">=0",
                "batch_size": ">=1",
            },
        )


@dataclass
class PredictConfig:
    utility: str = "log"
    """Utility U: linear, log, inverse, power, neg_power or logsigmoid."""
    utility_gamma: float = 0.5
    """γ of power (x^γ) / neg_power (−x^(−γ))."""
    utility_c: float = 4.0
    """c of logsigmoid (log σ(c·x))."""
    utility_eps: float = 0.1
    """ε of the smoothed training form (its optimum is drawn beside the pure one)."""
    openness: float | None = None
    """Openness o in [0, 1]: predict for the prompt-aware utility of a prompt with this openness (Box–Cox form,
    docs/methods/reward_collapse.md §2.4) instead of --utility."""
    n: int = 8
    """Completions per prompt."""
    out: str = "runs/collapse-predict"
    """Directory for predict.json and predict.png."""

    def __post_init__(self) -> None:
        check_ranges(self, {"utility_gamma": ">0", "utility_c": ">0", "utility_eps": ">=0", "n": ">=2"})


# ---- diagnose ------------------------------------------------------------------------------------------------------
def _model_dir(rm: str) -> Path:
    path = Path(rm)
    if not path.exists():
        raise FileNotFoundError(f"--rm {path} does not exist; train one with `rlxf ranking-rm`")
    return path / "final" if (path / "final").is_dir() else path


def training_config(model_dir: Path) -> dict[str, Any] | None:
    """The `rlxf ranking-rm` or `rlxf rm` config of the run that wrote `model_dir` (the engine's config.json in the
    run directory, the parent of `final/`), or None. Both configs record `loss` (the pairs trainer's is always
    bradley_terry), which a model's own config.json (a Hugging Face config) does not have."""
    for candidate in (model_dir.parent / "config.json", model_dir / "config.json"):
        if candidate.is_file():
            data = json.loads(candidate.read_text(encoding="utf-8"))
            if isinstance(data, dict) and "loss" in data and "train" in data:
                return data
    return None


def _utility_options(cfg: DiagnoseConfig, trained: dict[str, Any] | None, model_dir: Path) -> tuple[str, dict]:
    """(utility name, options) to predict with, and log where they came from."""
    if cfg.utility:
        opts = {"gamma": cfg.utility_gamma, "c": cfg.utility_c, "eps": cfg.utility_eps}
        if trained is not None and (trained.get("loss") != "ranking" or trained.get("utility") != cfg.utility):
            logger.warning(
                "predicting for --utility %s, but the model was trained with loss=%s, utility=%s",
                cfg.utility,
                trained.get("loss"),
                trained.get("utility"),
            )
        return cfg.utility, opts
    if trained is None:
        raise UserError(
            f"no training config found next to {model_dir} (expected the run's config.json beside final/); "
            "pass --utility to say which utility to predict for"
        )
    if trained.get("loss") != "ranking":
        raise UserError(
            f"{model_dir} was trained with loss={trained.get('loss')!r}: its rewards are unbounded and no utility "
            "predicts their profile; pass --utility to compare σ(reward) with one anyway"
        )
    opts = {"gamma": trained["utility_gamma"], "c": trained["utility_c"], "eps": trained["utility_eps"]}
    logger.info("utility from the training config: %s %s", trained["utility"], opts)
    return trained["utility"], opts


def _common_n(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the rows with the most common number of responses (profiles are compared index by index)."""
    counts = Counter(len(r["responses_ids"]) for r in rows)
    n = counts.most_common(1)[0][0]
    kept = [r for r in rows if len(r["responses_ids"]) == n]
    if len(kept) < len(rows):
        logger.warning(
            "profiles need one n: kept the %d prompts with %d responses, left out %d (counts %s)",
            len(kept),
            n,
            len(rows) - len(kept),
            dict(counts),
        )
    return kept


def _device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def run_diagnose(cfg: DiagnoseConfig) -> dict[str, Any]:
    """Score `cfg.data` with the reward model `cfg.rm`, run the collapse checks, write diagnose.json (the summary
    returned), profiles.jsonl (one line per prompt) and profiles.png (mean profile per prompt type with a 10–90%
    band, against the prediction)."""
    if not cfg.rm or not cfg.data:
        raise UserError("collapse diagnose needs --rm (a reward model directory) and --data (a rankings file)")
    model_dir = _model_dir(cfg.rm)
    trained = training_config(model_dir)
    name, opts = _utility_options(cfg, trained, model_dir)
    out = Path(cfg.out) if cfg.out else Path(cfg.rm) / "diagnose"
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(model_dir)
    max_length = cfg.max_length or (trained or {}).get("max_length") or None
    max_prompt_length = cfg.max_prompt_length or (trained or {}).get("max_prompt_length") or None
    rows = load_rankings(cfg.data, on_bad_row=cfg.on_bad_row, rejected_path=out / "rejected.jsonl")
    if cfg.max_prompts:
        rows = rows[: cfg.max_prompts]
    enc = encode_rankings(
        rows,
        tokenizer,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        on_bad_row=cfg.on_bad_row,
        rejected_path=out / "rejected_tokenized.jsonl",
    )
    enc = _common_n(enc)
    utilities = row_utilities(enc, name, opts["gamma"], opts["c"], opts["eps"])
    labels, target = diagnostic_groups(enc, utilities)

    device = _device(cfg.device)
    model = load_model(model_dir, RewardModel.from_pretrained, "reward model").to(device)
    values = score_rankings(model, enc, tokenizer.pad_token_id, cfg.batch_size, device)  # P × (n,), best first
    rewards = 1.0 / (1.0 + np.exp(-np.stack(values)))  # (P, n) r = σ(value)
    profiles = reward_profiles(rewards)  # (P, n) ascending

    summary = diagnose(profiles, labels, target, smoothed=cfg.smoothed, held_out=cfg.held_out)
    summary |= {
        "rm": str(model_dir),
        "data": str(cfg.data),
        "trained_loss": None if trained is None else trained.get("loss"),
        "utility_rule": name,
        "utility_source": "--utility" if cfg.utility else "training config",
        "pairwise_accuracy": ranking_pairwise_accuracy(values, enc),
    }
    shown = summary["prediction"]
    predictions = shown.get(ALL) if not summary["prompt_aware"] else {g: p for g, p in shown.items() if g != ALL}
    title = f"{model_dir.parent.name if model_dir.name == 'final' else model_dir.name}: U = {name}"
    plot = plot_profiles(
        profiles, labels, out / "profiles.png", None if predictions is None else predictions, title=title
    )
    with open(out / "profiles.jsonl", "w", encoding="utf-8") as f:
        for i, (r, row, prof) in enumerate(zip(rewards, enc, profiles)):
            line = {
                "index": i,
                "prompt_type": row.get("prompt_type"),
                "openness": row.get("openness"),
                "rewards": r.tolist(),  # best -> worst, as in the data
                "profile": prof.tolist(),  # ascending
            }
            f.write(json.dumps(line) + "\n")
    summary |= {"plot": str(plot), "profiles_file": str(out / "profiles.jsonl")}
    (out / "diagnose.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    logger.info(
        "%d prompts: profile MAE %s, gap %s (predicted %s), checks %s",
        summary["prompts"],
        {g: round(v, 4) for g, v in summary["profile_mae"].items()},
        summary["gap"],
        summary["predicted_gap"],
        summary["checks"],
    )
    return summary


# ---- predict -------------------------------------------------------------------------------------------------------
def run_predict(cfg: PredictConfig) -> dict[str, Any]:
    """The predicted profile of the utility at n completions (see `rlxf.collapse.predict`); writes predict.json and
    predict.png into cfg.out and returns the prediction (with "plot")."""
    if cfg.openness is not None:
        u = openness_utility(cfg.openness, eps=cfg.utility_eps)
    elif cfg.utility == PROMPT_AWARE:
        raise UserError("prompt_aware chooses U per prompt; give --openness in [0, 1] to predict one prompt's profile")
    else:
        u = utility_from_options(cfg.utility, cfg.utility_gamma, cfg.utility_c, cfg.utility_eps)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    result = predict_plot(u, cfg.n, out / "predict.png")
    (out / "predict.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
