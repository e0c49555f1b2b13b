"""`rlxf merge`: LoRA adapters written into their base model, as a plain `save_pretrained` directory."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoModelForCausalLM

from rlxf.errors import UserError
from rlxf.hf import load_model, load_tokenizer, readable_files
from rlxf.models.lora import is_adapter_dir, merge_adapters
from rlxf.models.reward_model import RewardModel


@dataclass
class MergeConfig:
    adapters: str = ""
    """A LoRA adapter directory (a trainer's final/ with lora.r > 0, or any PEFT adapter directory). Required."""
    out: str = ""
    """Where to write the merged model: a plain `save_pretrained` directory with the tokenizer. Required."""
    base: str = ""
    """The model the adapters were trained on, when it moved since (default: the path in adapter_config.json)."""


def merge_to_directory(cfg: MergeConfig) -> Path:
    """Write the adapters of `cfg.adapters` merged into their base model as a plain `save_pretrained` directory (a
    reward model stays a sequence-classification model with its trained head), with the tokenizer; returns it."""
    if not cfg.adapters or not cfg.out:
        raise UserError("--adapters and --out are required (see `rlxf merge --help`)")
    adapters = Path(cfg.adapters)
    if not is_adapter_dir(adapters):
        raise UserError(
            f"{adapters} is not a LoRA adapter directory (it needs adapter_config.json and no config.json); a "
            "trainer writes one to OUT/final when run with --lora.r > 0"
        )
    config = json.loads((adapters / "adapter_config.json").read_text())
    base = cfg.base or config["base_model_name_or_path"]
    reward_model = config.get("task_type") == "SEQ_CLS"
    loader = RewardModel.from_pretrained if reward_model else AutoModelForCausalLM.from_pretrained
    model = merge_adapters(load_model(base, loader, f"base model of the adapters in {adapters}"), adapters)
    out = Path(cfg.out)
    model.save_pretrained(out)
    load_tokenizer(adapters if (adapters / "tokenizer_config.json").is_file() else base).save_pretrained(out)
    readable_files(out)
    return out
