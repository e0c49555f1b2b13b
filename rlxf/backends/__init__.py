"""LLM access: backends that answer labelling prompts (`base`, `local`, `http`), a SQLite cache of finished answers
(`cache`), and an OpenAI-compatible server for local models (`serve`)."""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rlxf.backends.base import (
    Backend,
    BackendStats,
    Prompt,
    PromptTooLongError,
    TopK,
    apply_chat,
    as_prompt,
    chat_messages,
    logaddexp_into,
    model_fingerprint,
    split_prompt,
    topk_map,
)
from rlxf.backends.http import OpenAIBackend
from rlxf.backends.local import LocalBackend
from rlxf.config import check_ranges
from rlxf.errors import BackendError, UserError

__all__ = [
    "BackendError",
    "BACKEND_SPEC_HELP",
    "Backend",
    "BackendConfig",
    "BackendStats",
    "LocalBackend",
    "OpenAIBackend",
    "Prompt",
    "PromptTooLongError",
    "TopK",
    "apply_chat",
    "as_prompt",
    "build_backend",
    "chat_messages",
    "logaddexp_into",
    "model_fingerprint",
    "parse_backend_spec",
    "split_prompt",
    "topk_map",
]

# --- configuration ---------------------------------------------------------------------------------------------------


@dataclass
class BackendConfig:
    kind: Literal["local", "openai"] = "local"
    """'local': a transformers causal LM loaded in this process; 'openai': any OpenAI-compatible server (vLLM,
    SGLang, TGI, llama.cpp, `rlxf serve`)."""
    model: str = ""
    """local: save_pretrained directory of the labeller LLM. openai: the served model name (empty = the only model
    GET /v1/models lists)."""
    base_url: str = ""
    """openai: the API root, e.g. http://127.0.0.1:8000/v1."""
    api: Literal["completions", "chat"] = "completions"
    """'completions': the labelling prompt as raw text. 'chat': the prompt is the user turn and the assistant turn is
    prefilled (local: the tokenizer's chat template; openai: needs `continue_final_message`, as in vLLM)."""
    api_key_env: str = "OPENAI_API_KEY"
    """openai: environment variable holding the API key (sent as a Bearer token when set)."""
    batch_size: int = 8
    """local: prompts per forward pass."""
    device: str = ""
    """local: torch device; empty = CUDA when available, else CPU."""
    max_concurrency: int = 8
    """openai: requests in flight at once."""
    timeout: float = 120.0
    """openai: seconds without a response before an attempt counts as failed and is retried."""
    max_retries: int = 6
    """openai: retries per request (5xx, 429, time-outs, connection errors, malformed bodies); then the run stops
    with an error, and finished judgements stay cached."""
    backoff: float = 1.0
    """openai: delay before the first retry in seconds; doubled each retry (with jitter), capped at backoff_max."""
    backoff_max: float = 30.0
    """openai: longest delay between retries, in seconds."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "batch_size": ">=1",
                "max_concurrency": ">=1",
                "timeout": ">0",
                "max_retries": ">=0",
                "backoff": ">=0",
                "backoff_max": ">=0",
            },
        )


def build_backend(cfg: BackendConfig, max_context: int | None = None) -> LocalBackend | OpenAIBackend:
    """A backend from its config. `max_context` caps the local model's context (docs/methods/rlaif.md §3: 4,096 tokens)."""
    if cfg.kind == "local":
        if not cfg.model:
            raise UserError("backend.kind=local needs --backend.model DIR (a save_pretrained directory)")
        return LocalBackend(
            cfg.model,
            chat=cfg.api == "chat",
            batch_size=cfg.batch_size,
            device=cfg.device or None,
            max_context=max_context,
        )
    if cfg.kind == "openai":
        if not cfg.base_url:
            raise UserError("backend.kind=openai needs --backend.base_url, e.g. http://127.0.0.1:8000/v1")
        return OpenAIBackend(
            cfg.base_url,
            cfg.model,
            api=cfg.api,
            api_key=os.environ.get(cfg.api_key_env) if cfg.api_key_env else None,
            max_concurrency=cfg.max_concurrency,
            timeout=cfg.timeout,
            max_retries=cfg.max_retries,
            backoff=cfg.backoff,
            backoff_max=cfg.backoff_max,
        )
    raise UserError(f"backend.kind must be 'local' or 'openai', got {cfg.kind!r}")


BACKEND_SPEC_HELP = (
    "a backend spec is a model directory (local) or a server URL (openai), optionally followed by '?key=value&...' "
    "with BackendConfig fields, e.g. 'runs/judge?batch_size=16' or 'http://127.0.0.1:8000/v1?model=judge&api=chat'"
)


def parse_backend_spec(spec: str, extra_keys: Sequence[str] = ()) -> tuple[BackendConfig, dict[str, str]]:
    """'TARGET[?key=value&...]' -> (BackendConfig, the options named in `extra_keys`).

    TARGET starting with http:// or https:// is an OpenAI-compatible server (kind=openai, base_url=TARGET); anything
    else is a local model directory. Other keys are BackendConfig fields, type-checked as config files are.
    """
    from rlxf.config import from_dict

    target, _, query = spec.partition("?")
    if not target:
        raise UserError(f"empty backend in {spec!r}; {BACKEND_SPEC_HELP}")
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    extras = {k: options.pop(k) for k in list(options) if k in extra_keys}
    data: dict[str, Any] = dict(options)
    if target.startswith(("http://", "https://")):
        data |= {"kind": "openai", "base_url": target}
    else:
        data |= {"kind": "local", "model": target}
    return from_dict(BackendConfig, data, where=f"backend spec {spec!r}"), extras
