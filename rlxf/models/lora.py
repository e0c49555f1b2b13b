"""LoRA adapters (Hu et al. 2021, through the `peft` library) instead of full fine-tuning, for the trainers.

A trainer with `lora.r > 0` wraps the model it loaded in fresh adapters: only the adapters train (and a reward
model's head, which is new). Its `final/` is then a PEFT adapter directory, the format users already know:
`peft.PeftModel.from_pretrained(base, final)` loads it, `rlxf merge` writes a plain `save_pretrained` model, and
every rlxf stage that reads a model directory (`hf.load_model`) accepts it as it is, merging on load.

DPO, PPO and RLOO with adapters need no second model in memory: their reference is the policy with the adapters
switched off (`AdaptersOff`), which is the model the run started from.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlxf.config import check_ranges


@dataclass
class LoraSettings:
    r: int = 0
    """Rank of the LoRA adapters; 0 trains every weight of the model (no adapters)."""
    alpha: float = 16.0
    """Scale of the adapters' update: it is multiplied by alpha / r."""
    dropout: float = 0.05
    """Dropout on the adapters' input during training (kept even when --train.dropout turns the model's off)."""
    target_modules: str = "all-linear"
    """Layers that get adapters: 'all-linear' (every linear layer but the output head) or module names separated by
    commas, e.g. 'q_proj,v_proj'."""

    def __post_init__(self) -> None:
        check_ranges(self, {"r": ">=0", "alpha": ">0", "dropout": "[0,1)"}, prefix="lora.")

    @property
    def enabled(self) -> bool:
        return self.r > 0


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """PEFT 0.2x calls a transformers name that 5.x deprecated (`is_gradient_checkpointing`): not the user's concern."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _targets(settings: LoraSettings) -> str | list[str]:
    if settings.target_modules.strip() == "all-linear":
        return "all-linear"
    return [name.strip() for name in settings.target_modules.split(",") if name.strip()]


def add_lora(model: torch.nn.Module, settings: LoraSettings, base: str | Path, seed: int = 0) -> torch.nn.Module:
    """`model` (loaded from the directory `base`) with fresh adapters, drawn from `seed` without touching the global
    random state; unchanged when `settings.r == 0`. A reward model (a module with its transformers model in `.hf`
    and a `score` head) gets adapters in its backbone and keeps its whole head trainable.

    adapter_config.json records `base` as an absolute path, so the saved adapters load from any working directory."""
    reward_model = hasattr(model, "hf") and hasattr(model.hf, "score")
    if not settings.enabled or hasattr(model.hf if reward_model else model, "peft_config"):
        return model  # no adapters asked for, or a model the caller already gave adapters (Python API)
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS if reward_model else TaskType.CAUSAL_LM,
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=_targets(settings),
        modules_to_save=["score"] if reward_model else None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            with _quiet_peft():
                peft_model = get_peft_model(model.hf if reward_model else model, config)
        except ValueError as e:  # e.g. "Target modules {...} not found in the base model"
            from rlxf.errors import UserError

            raise UserError(
                f"lora.target_modules={settings.target_modules!r} does not fit {base}: {str(e).splitlines()[0]}. "
                "Use 'all-linear' or names of its linear layers (e.g. q_proj,v_proj for Llama, c_attn for GPT-2)"
            ) from e
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    if reward_model:
        model.hf = peft_model
        return model
    return peft_model


def transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PeftModel, or `model` itself. The adapters stay in use: PEFT injects them
    into the transformers model's own layers, so calling its backbone (`.base_model`) directly runs them too."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class AdaptersOff(torch.nn.Module):
    """The LoRA policy with its adapters switched off: the model the run started from, as DPO's reference, without a
    second copy of the weights. Always in eval mode and without gradients; the policy's own mode is restored."""

    def __init__(self, policy: torch.nn.Module):
        super().__init__()
        self._policy = [policy]  # a list: not registered as a submodule, so .eval() / .to() here leave it alone

    @torch.no_grad()
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        policy = self._policy[0]
        was_training = policy.training
        policy.eval()
        try:
            with policy.disable_adapter():
                return policy(*args, **kwargs)
        finally:
            policy.train(was_training)


def is_adapter_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / "adapter_config.json").is_file() and not (p / "config.json").is_file()


def adapter_base(path: str | Path) -> str:
    """The model directory the adapters in `path` were trained on (from its adapter_config.json)."""
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def merge_adapters(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """`model` (the base the adapters were trained on, or a reward model around it) with the adapters of
    `adapter_dir` merged into its weights: a plain transformers model again."""
    from peft import PeftModel

    with _quiet_peft():
        if hasattr(model, "hf"):  # a reward model: adapters and the trained head go into its transformers model
            model.hf = PeftModel.from_pretrained(model.hf, str(adapter_dir)).merge_and_unload()
            return model
        return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
