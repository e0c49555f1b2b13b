"""On-disk SQLite cache of finished LLM judgements, so a labelling job killed at any point loses nothing.

One row per finished backend request, keyed by sha256 of (backend kind, model id, endpoint, request kind, request
params, prompt as the model reads it). The endpoint is the base URL of an HTTP backend (two servers that serve models
under the same name are two labellers); a local backend has none, its model id already names the weights (resolved
path + fingerprint). Each result is committed as soon as it arrives (WAL journal): a process killed with SIGKILL keeps
every committed row, and a re-run asks the backend only for the requests that are not there.

Only valid answers are stored (`check_result`): a log-prob map with a NaN / inf entry, a positive log-prob or more
than all of the probability mass is a broken server, not a judgement. Such an answer is asked again (at most
`invalid_retries` times) and then reported as {"error": "invalid_answer", "message": ...}, never cached; a cached row
that fails the check (written by an older version) is treated as missing.

`cached_requests` is the loop both the pairwise labeller and the d-RLAIF source use: look every request up, send the
missing ones (deduplicated) through the backend's iterator, store each valid result the moment it comes back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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


LOGPROB_EPS = 1e-6
"""Largest log-prob accepted above 0 (rounding of a probability-1 token)."""
MASS_EPS = 1e-3
"""Largest amount by which the probabilities of a top-k map may sum above 1 (rounding, merged token variants)."""
INVALID_RETRIES = 2
"""How many times `cached_requests` asks again for an answer that fails `check_result`."""


def cache_key(backend: str, model: str, kind: str, params: dict[str, Any], prompt: str, endpoint: str = "") -> str:
    """sha256 hex of the request's identity; `params` are JSON-encoded with sorted keys. `endpoint` (an HTTP backend's
    base URL) is part of it when given; without one the key is the one earlier versions wrote (local caches stay valid)."""
    ident_parts: list[Any] = [backend, model, kind, params, prompt]
    if endpoint:
        ident_parts.insert(2, {"endpoint": endpoint})
    ident = json.dumps(ident_parts, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(ident.encode()).hexdigest()


def backend_endpoint(backend: Backend) -> str:
    """Where the backend's answers come from, beyond its model id: the base URL of an HTTP backend, else ""."""
    url = getattr(backend, "base_url", None)
    return str(url).rstrip("/") if url else ""


def check_topk(top: Any) -> str | None:
    """Why a {token: log-prob} map is not a possible next-token distribution, or None when it is one.

    Every value must be a finite number <= LOGPROB_EPS and the probabilities must sum to <= 1 + MASS_EPS. An empty
    map is valid (the server listed no token: an invalid order downstream, not a broken answer).
    """
    if not isinstance(top, dict):
        return f"log-probs are not a {{token: log-prob}} map: {str(top)[:100]}"
    mass = 0.0
    for token, value in top.items():
        if not isinstance(token, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"entry {token!r}: {value!r} is not a token and a number"
        if not math.isfinite(value):
            return f"log-prob of {token!r} is {value} (not finite)"
        if value > LOGPROB_EPS:
            return f"log-prob of {token!r} is {value} > 0 (a probability above 1)"
        mass += math.exp(value)
    if mass > 1.0 + MASS_EPS:
        return f"the probabilities of the top {len(top)} tokens sum to {mass:.4g} > 1"
    return None


def check_result(kind: str, result: Any) -> str | None:
    """Why a result of request `kind` must not be used or cached, or None when it is a valid answer."""
    if not isinstance(result, dict):
        return f"result is not an object: {str(result)[:100]}"
    if "error" in result:
        return None if result.get("error") == "too_long" else f"stored error {result.get('error')!r}"
    if kind == "generate":
        return None if isinstance(result.get("text"), str) else "generated text is not a string"
    return check_topk(result.get("top"))


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


def invalid_result(reason: str) -> dict[str, str]:
    return {"error": "invalid_answer", "message": reason}


def _stream(backend: Backend, kind: str, params: dict[str, Any], prompts: Sequence[Prompt]):
    if kind == "generate":
        return backend.iter_generate(
            prompts,
            params["max_new_tokens"],
            params.get("temperature", 0.0),
            params.get("top_k", 0),
            params.get("seed", 0),
        )
    if kind == "logprobs":
        return backend.iter_next_token_logprobs(prompts, params["k"], params.get("labels", ()))
    raise ValueError(f"request kind must be 'generate' or 'logprobs', got {kind!r}")


def cached_requests(
    backend: Backend,
    cache: JudgementCache | None,
    kind: str,
    params: dict[str, Any],
    prompts: Sequence[Prompt],
    on_result: Callable[[], None] | None = None,
    invalid_retries: int = INVALID_RETRIES,
) -> tuple[list[Any], int]:
    """Results of `prompts` for one request kind, from the cache where present, else from the backend.

    kind: "generate" (params: max_new_tokens, temperature, top_k, seed; result: {"text": str}) or "logprobs"
    (params: k, labels; result: {"top": {token: logprob}}). A prompt too long for the model gives
    {"error": "too_long", "message": ...}, cached too. An answer that fails `check_result` (NaN / inf / positive
    log-probs, more than all the mass) is asked again up to `invalid_retries` times (each counted in
    `backend.stats.retries`) and then gives {"error": "invalid_answer", "message": ...}, which is never cached.
    Identical requests are sent once. `on_result` is called once per request answered from the backend (e.g. to
    advance a progress bar).

    Returns (results in prompt order, number of requests sent to the backend).
    """
    endpoint = backend_endpoint(backend)
    keys = [cache_key(backend.kind, backend.model_id, kind, params, backend.prompt_key(p), endpoint) for p in prompts]
    found = cache.get_many(keys) if cache is not None else {}
    for key in [k for k, v in found.items() if check_result(kind, v) is not None]:
        logger.warning("ignoring an invalid cached answer (%s); asking again", check_result(kind, found[key]))
        del found[key]
    todo: dict[str, Prompt] = {}
    for key, prompt in zip(keys, prompts):
        if key not in found and key not in todo:
            todo[key] = prompt
    pending = list(todo)
    for attempt in range(invalid_retries + 1):
        if not pending:
            break
        if attempt:
            stats = getattr(backend, "stats", None)
            if stats is not None:
                stats.add(retries=len(pending))
            logger.warning(
                "%d invalid %s answer(s) from %s (%s); asking again (%d of %d)",
                len(pending),
                kind,
                endpoint or backend.model_id,
                found[pending[0]]["message"],
                attempt,
                invalid_retries,
            )
        bad: list[str] = []
        for i, value in _stream(backend, kind, params, [todo[k] for k in pending]):
            key = pending[i]
            if isinstance(value, PromptTooLongError):
                result: Any = too_long_result(value)
            else:
                result = {"text": value} if kind == "generate" else {"top": value}
            reason = check_result(kind, result)
            if reason is not None:
                found[key] = invalid_result(reason)
                bad.append(key)
                continue
            found[key] = result
            if cache is not None:
                cache.put(key, backend.kind, backend.model_id, kind, params, backend.prompt_key(todo[key]), result)
            if on_result is not None:
                on_result()
        pending = bad
    if pending:
        logger.warning(
            "%d %s request(s) got no valid answer from %s after %d attempts (%s); not cached, reported as "
            "invalid_answer",
            len(pending),
            kind,
            endpoint or backend.model_id,
            invalid_retries + 1,
            found[pending[0]]["message"],
        )
        if on_result is not None:
            for _ in pending:
                on_result()
    return [found[k] for k in keys], len(todo)
