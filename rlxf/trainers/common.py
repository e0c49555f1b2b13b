"""Small pieces every stage needs: loading a tokenizer, picking a device dtype, reporting the run."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


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
