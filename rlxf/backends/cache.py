"""On-disk SQLite cache of finished LLM judgements, so a labelling job killed at any point loses nothing.

One row per finished backend request, keyed by sha256 of (backend kind, model id, request kind, request params,
prompt as the model reads it). Each result is committed as soon as it arrives (WAL journal): a process killed with
SIGKILL keeps every committed row, and a re-run asks the backend only for the requests that are not there.

`cached_requests` is the loop both the pairwise labeller and the d-RLAIF source use: look every request up, send the
missing ones (deduplicated) through the backend's iterator, store each result the moment it comes back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlxf.backends.base import Backend, Prompt, PromptTooLongError

logger = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    prompt TEXT NOT NULL,
    result TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(backend: str, model: str, kind: str, params: dict[str, Any], prompt: str) -> str:
    """sha256 hex of the request's identity; `params` are JSON-encoded with sorted keys."""
    ident = json.dumps([backend, model, kind, params, prompt], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(ident.encode()).hexdigest()


class JudgementCache:
    """SQLite store of request results (JSON values). Use from one thread; `path=":memory:"` for a throwaway one."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=WAL")  # readers (progress pollers) never block the writer
        self.db.execute("PRAGMA synchronous=NORMAL")  # durable against a killed process (not a power cut)
        self.db.execute(SCHEMA)
        self.db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite's bound-parameter limit
            chunk = unique[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for key, result in self.db.execute(f"SELECT key, result FROM judgements WHERE key IN ({marks})", chunk):
                out[key] = json.loads(result)
        return out

    def put(self, key: str, backend: str, model: str, kind: str, params: dict[str, Any], prompt: str, result: Any):
        """Store one result and commit it."""
        self.db.execute(
            "INSERT OR REPLACE INTO judgements VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, backend, model, kind, json.dumps(params, sort_keys=True), prompt, json.dumps(result), time.time()),
        )
        self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def too_long_result(error: PromptTooLongError) -> dict[str, str]:
    return {"error": "too_long", "message": str(error)}


def cached_requests(
    backend: Backend,
    cache: JudgementCache | None,
    kind: str,
    params: dict[str, Any],
    prompts: Sequence[Prompt],
    on_result: Callable[[], None] | None = None,
) -> tuple[list[Any], int]:
    """Results of `prompts` for one request kind, from the cache where present, else from the backend.

    kind: "generate" (params: max_new_tokens, temperature, top_k, seed; result: {"text": str}) or "logprobs"
    (params: k, labels; result: {"top": {token: logprob}}). A prompt too long for the model gives
    {"error": "too_long", "message": ...}, cached too. Identical requests are sent once. `on_result` is called once
    per request answered from the backend (e.g. to advance a progress bar).

    Returns (results in prompt order, number of requests sent to the backend).
    """
    keys = [cache_key(backend.kind, backend.model_id, kind, params, backend.prompt_key(p)) for p in prompts]
    found = cache.get_many(keys) if cache is not None else {}
    todo: dict[str, Prompt] = {}
    for key, prompt in zip(keys, prompts):
        if key not in found and key not in todo:
            todo[key] = prompt
    todo_keys, todo_prompts = list(todo), list(todo.values())
    if kind == "generate":
        stream = backend.iter_generate(
            todo_prompts,
            params["max_new_tokens"],
            params.get("temperature", 0.0),
            params.get("top_k", 0),
            params.get("seed", 0),
        )
    elif kind == "logprobs":
        stream = backend.iter_next_token_logprobs(todo_prompts, params["k"], params.get("labels", ()))
    else:
        raise ValueError(f"request kind must be 'generate' or 'logprobs', got {kind!r}")
    for i, value in stream:
        if isinstance(value, PromptTooLongError):
            result: Any = too_long_result(value)
        else:
            result = {"text": value} if kind == "generate" else {"top": value}
        found[todo_keys[i]] = result
        if cache is not None:
            cache.put(
                todo_keys[i], backend.kind, backend.model_id, kind, params, backend.prompt_key(todo_prompts[i]), result
            )
        if on_result is not None:
            on_result()
    return [found[k] for k in keys], len(todo_keys)
