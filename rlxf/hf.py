"""Models and tokenizers from disk (Hugging Face `save_pretrained` directories), and the device they run on."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from rlxf.errors import UserError

# What a damaged or foreign model directory raises inside `from_pretrained`: a missing or truncated weight file, a
# config.json that is not JSON or names an unknown architecture, weights of another shape.
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, SafetensorError)

# transformers 5.2x renamed the forward pass's KV-cache argument and output from `past_key_values` to `cache` (the old
# name is deprecated for removal in 5.40); the older versions that pyproject.toml allows know only `past_key_values`.
KV_CACHE_NAME = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def forward_with_cache(model: torch.nn.Module, cache: Any, **inputs: Any) -> tuple[Any, Any]:
    """One forward pass that reads the KV cache `cache` (None: start one) and returns (output, the extended cache),
    under whichever name the installed transformers uses."""
    out = model(**inputs, use_cache=True, **{KV_CACHE_NAME: cache})
    return out, out[KV_CACHE_NAME]


def default_device(device: str | torch.device | None = None) -> torch.device:
    """`device` if given, else the GPU when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _check_model_dir(path: str | Path, what: str) -> Path:
    if not str(path):
        raise UserError(f"--model is required: the {what}'s save_pretrained directory (e.g. from `rlxf tiny-model`)")
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} directory {p} does not exist; build one with `rlxf tiny-model` or a trainer first")
    if not p.is_dir():
        raise UserError(f"{what} {p} is a file; give the save_pretrained directory that holds config.json")
    return p


def _check_config_json(p: Path) -> None:
    config = p / "config.json"
    if not config.is_file():
        return
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config} is not valid JSON ({e}); restore it from the run that wrote {p}") from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (a missing pad token becomes EOS, as most chat models do)."""
    p = _check_model_dir(path, "model")
    _check_config_json(p)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except LOAD_ERRORS as e:
        raise UserError(
            f"cannot load a tokenizer from {p} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the directory needs tokenizer.json / tokenizer_config.json as `save_pretrained` writes them"
        ) from e
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    path: str | Path,
    loader: Callable[..., torch.nn.Module] = AutoModelForCausalLM.from_pretrained,
    what: str = "model",
    tokenizer: PreTrainedTokenizerBase | None = None,
    **kwargs: Any,
) -> torch.nn.Module:
    """`loader(path, **kwargs)` (a causal LM by default; `RewardModel.from_pretrained` for reward models) with the
    mistakes of a model directory reported in one line naming it: missing, a file, no or broken config.json,
    truncated weights. With `tokenizer`, also checks that every token id has an embedding row."""
    p = _check_model_dir(path, what)
    from rlxf.models.lora import adapter_base, is_adapter_dir, merge_adapters

    if is_adapter_dir(p):
        # LoRA adapters (a trainer's final/ with lora.r > 0): the model they were trained on, with them merged in

        base = load_model(adapter_base(p), loader, f"base model of the adapters in {p}", tokenizer, **kwargs)
        return merge_adapters(base, p)
    config = p / "config.json"
    if not config.is_file():
        raise UserError(
            f"{what} directory {p} has no config.json: is it a save_pretrained directory (e.g. OUT/final)?"
        )
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{config} is not valid JSON ({e}); restore it from the run that wrote {p}") from None
    try:
        model = loader(str(p), **kwargs)
    except LOAD_ERRORS as e:
        reason = str(e).splitlines()[0] if str(e) else ""
        raise UserError(
            f"cannot load the {what} in {p}: {type(e).__name__}: {reason}. A truncated model.safetensors or a "
            "partial copy gives this: copy the directory again or use an earlier checkpoint"
        ) from e
    if tokenizer is not None:
        check_vocabulary_fits(tokenizer, model, p)
    return model


def check_vocabulary_fits(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module, where: str | Path) -> None:
    """Every id the tokenizer can produce must have an embedding row (otherwise the first such token fails deep in
    the forward pass with an IndexError)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is None and hasattr(model, "hf"):  # a RewardModel wraps the transformers model
        embeddings = model.hf.get_input_embeddings()
    if embeddings is None:
        return
    rows, size = embeddings.num_embeddings, len(tokenizer)
    if size > rows:
        raise UserError(
            f"the tokenizer in {where} has {size} tokens but the model's embeddings have {rows} rows: ids >= {rows} "
            "would fail. Use the tokenizer the model was trained with, or resize the embeddings "
            "(model.resize_token_embeddings) and save the model again"
        )


def load_policy(path: str) -> tuple[torch.nn.Module, Any]:
    """A causal LM (eval mode) and its tokenizer from a save_pretrained directory, on the GPU in bf16 when there is
    one."""
    tokenizer = load_tokenizer(path)
    device = default_device()
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    model = load_model(path, tokenizer=tokenizer, dtype=dtype).to(device).eval()
    return model, tokenizer


def readable_files(directory: str | Path) -> None:
    """Give every file under `directory` the permissions the user's umask gives a new file (usually 0644).

    transformers writes model.safetensors through a private temporary file (mode 0600), so a model saved by root or
    in a shared directory would be unreadable to the other users that serve or evaluate it."""
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(directory).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
