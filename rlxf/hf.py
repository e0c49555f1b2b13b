"""Models and tokenizers from disk (Hugging Face `save_pretrained` directories), and the device they run on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (a missing pad token becomes EOS, as most chat models do)."""
    if not path:
        raise ValueError("--model is required: a save_pretrained directory (e.g. from `rlxf tiny-model`)")
    if not Path(path).exists():
        raise FileNotFoundError(f"model directory {path} does not exist; build one with `rlxf tiny-model` first")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str) -> tuple[torch.nn.Module, Any]:
    """A causal LM (eval mode) and its tokenizer from a save_pretrained directory, on the GPU in bf16 when there is
    one."""
    tokenizer = load_tokenizer(path)
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer
