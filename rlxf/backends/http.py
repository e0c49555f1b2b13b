"""Any OpenAI-compatible server as a labeller backend: concurrent requests, time-outs, retries with backoff."""

from __future__ import annotations

import http.client
import json
import logging
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

from rlxf.backends.base import (
    BackendStats,
    Prompt,
    PromptTooLongError,
    TopK,
    _ListCalls,
    as_prompt,
    chat_messages,
    logaddexp_into,
)
from rlxf.errors import BackendError

logger = logging.getLogger(__name__)


class _Transient(Exception):
    """A failed attempt worth retrying (5xx, 429, 408, time-out, connection error, malformed body)."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


def _error_message(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the body's start."""
    try:
        data = json.loads(body)
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message") if isinstance(err, dict) else None
        return str(msg or err)[:500]
    except (ValueError, AttributeError):
        return body[:500].decode("utf-8", errors="replace")


def _retry_after(headers: Any) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _merge_top(entries: Any) -> TopK:
    """[{token, logprob}, ...] (chat format) -> {token: logprob}, duplicates log-sum-exp'ed."""
    out: TopK = {}
    for e in entries:
        logaddexp_into(out, str(e["token"]), float(e["logprob"]))
    return out


def _first_top(choice: dict[str, Any], chat: bool) -> TopK:
    """The first generated token's top log-probs; {} (no label tokens: an invalid order, not a malformed reply) when
    the server lists no generated token, as some do when that token is EOS."""
    logprobs = choice["logprobs"]
    if chat:
        content = logprobs["content"] or []
        return _merge_top(content[0]["top_logprobs"]) if content else {}
    tops = logprobs["top_logprobs"] or []
    return _check_top(tops[0]) if tops else {}


def _check_top(top: Any) -> TopK:
    if not isinstance(top, dict) or not all(isinstance(v, (int, float)) for v in top.values()):
        raise TypeError(f"top_logprobs entry is not a {{token: logprob}} map: {str(top)[:200]}")
    return {str(t): float(v) for t, v in top.items()}


class OpenAIBackend(_ListCalls):
    """Any OpenAI-compatible server (completions or chat completions, with log-probs).

    Scoring sends `max_tokens=1, temperature=0` and `logprobs=k` (completions; reads `choices[0].logprobs.
    top_logprobs[0]`) or `logprobs=true, top_logprobs=k` (chat; reads `choices[0].logprobs.content[0].top_logprobs`).
    Chat prompts with a prefill add vLLM's `continue_final_message=true, add_generation_prompt=false`.

    Each prompt is one HTTP request; up to `max_concurrency` run at once. An attempt that fails with HTTP 5xx, 429 or
    408, a time-out (`timeout` seconds without a response), a connection error or a malformed body is retried after
    min(backoff_max, backoff · 2^attempt) seconds (× a jitter in [0.5, 1], or the server's Retry-After), at most
    `max_retries` times; then BackendError. Any other 4xx raises BackendError at once with the server's message, except
    a 400 about the context length, which becomes a per-prompt PromptTooLongError.
    """

    def __init__(
        self,
        base_url: str,
        model: str = "",
        *,
        api: Literal["completions", "chat"] = "completions",
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
    ):
        if api not in ("completions", "chat"):
            raise ValueError(f"api must be 'completions' or 'chat', got {api!r}")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise ValueError(
                f"need max_concurrency >= 1, max_retries >= 0, timeout > 0; got {max_concurrency}, {max_retries}, "
                f"{timeout}"
            )
        self.base_url = base_url.rstrip("/")
        self.api = api
        self.kind = f"openai-{api}"
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.stats = BackendStats()
        self._closed = threading.Event()
        self.model = model or self._only_model()
        # The cache key names the model and the endpoint (`rlxf.backends.cache.cache_key`): answers of another server
        # with the same model name are not reused.
        self.model_id = self.model

    # -- HTTP with retries

    def _url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _attempt(self, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self._url(path), data=data, headers=headers, method="GET" if body is None else "POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw_err = e.read() if e.fp is not None else b""
            message = _error_message(raw_err)
            if e.code in (408, 429) or e.code >= 500:
                raise _Transient(f"HTTP {e.code}: {message}", _retry_after(e.headers)) from None
            if e.code == 400 and ("context length" in message.lower() or "context_length" in message.lower()):
                raise PromptTooLongError(message) from None
            raise BackendError(
                f"HTTP {e.code} from {self._url(path)}: {message}. This is not retried: check base_url, the model "
                f"name ({self.model!r} here; GET {self._url('models')} lists them) and the request settings"
            ) from None
        except (OSError, http.client.HTTPException) as e:  # time-outs, refused/reset/dropped connections, bad status
            raise _Transient(f"{type(e).__name__}: {e}") from None
        try:
            out = json.loads(raw)
        except ValueError:
            raise _Transient(f"malformed JSON body: {raw[:200]!r}") from None
        if not isinstance(out, dict):
            raise _Transient(f"malformed body (not a JSON object): {raw[:200]!r}")
        return out

    def request(self, path: str, body: dict[str, Any] | None, parse: Callable[[dict[str, Any]], Any]) -> Any:
        """POST `body` (GET when None) to `path` and return `parse(response)`, retrying transient failures.

        A `parse` that raises KeyError / IndexError / TypeError / ValueError marks the body malformed (retried).
        """
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if self._closed.is_set():
                raise BackendError("backend closed")
            self.stats.add(calls=1)
            try:
                out = self._attempt(path, body)
                try:
                    result = parse(out)
                except (KeyError, IndexError, TypeError, ValueError) as e:
                    raise _Transient(
                        f"malformed response ({type(e).__name__}: {e}): {json.dumps(out)[:200]}"
                    ) from None
                usage = out.get("usage") or {}
                self.stats.add(
                    prompt_tokens=int(usage.get("prompt_tokens") or 0),
                    completion_tokens=int(usage.get("completion_tokens") or 0),
                )
                return result
            except _Transient as e:
                last = e
                if attempt == self.max_retries:
                    break
                self.stats.add(retries=1)
                delay = min(self.backoff_max, self.backoff * 2**attempt) * random.uniform(0.5, 1.0)
                if e.retry_after is not None:
                    delay = min(self.backoff_max, max(delay, e.retry_after))
                logger.debug("%s: %s; retry %d in %.2fs", self._url(path), e, attempt + 1, delay)
                self._closed.wait(delay)
        raise BackendError(
            f"{self._url(path)}: gave up after {self.max_retries + 1} attempts; last error: {last}. Finished "
            "judgements are cached: fix the server and re-run to continue"
        )

    def _only_model(self) -> str:
        models = self.request("models", None, lambda out: [m["id"] for m in out["data"]])
        if len(models) != 1:
            raise ValueError(f"{self._url('models')} serves {models}; name one with model=")
        return models[0]

    def _imap(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[tuple[int, Any]]:
        """(index, fn(item)) as each finishes, with at most max_concurrency in flight and 2× that queued."""
        pool = ThreadPoolExecutor(self.max_concurrency, thread_name_prefix="rlxf-http")
        pending: dict[Future, int] = {}
        todo = iter(enumerate(items))

        def fill() -> None:
            for i, item in todo:
                pending[pool.submit(fn, item)] = i
                if len(pending) >= 2 * self.max_concurrency:
                    return

        try:
            fill()
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    try:
                        yield i, fut.result()
                    except PromptTooLongError as e:
                        yield i, e
                fill()
        finally:
            if pending:  # stopped early (error or interrupt): drop queued requests, stop retry loops
                self._closed.set()
            pool.shutdown(wait=True, cancel_futures=True)
            self._closed.clear()

    # -- request bodies

    def _body(self, prompt: Prompt, max_tokens: int, temperature: float) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": max_tokens, "temperature": temperature}
        if self.api == "completions":
            body["prompt"] = prompt.text
        else:
            body["messages"] = chat_messages(prompt)
            if prompt.prefill:  # vLLM extension, also served by `rlxf serve`
                body |= {"continue_final_message": True, "add_generation_prompt": False}
        return body

    def _path(self) -> str:
        return "completions" if self.api == "completions" else "chat/completions"

    def prompt_key(self, prompt: Prompt | str) -> str:
        prompt = as_prompt(prompt)
        return prompt.text if self.api == "completions" else json.dumps(chat_messages(prompt), ensure_ascii=False)

    def single_token(self, text: str) -> None:
        return None

    # -- requests

    def _logprobs_one(self, prompt: Prompt | str, k: int) -> TopK:
        body = self._body(as_prompt(prompt), 1, 0.0)
        if self.api == "completions":
            body["logprobs"] = k
            return self.request(self._path(), body, lambda o: _first_top(o["choices"][0], chat=False))
        body |= {"logprobs": True, "top_logprobs": k}
        return self.request(self._path(), body, lambda o: _first_top(o["choices"][0], chat=True))

    def iter_next_token_logprobs(
        self, prompts: Sequence[Prompt | str], k: int, labels: Sequence[str] = ()
    ) -> Iterator[tuple[int, TopK | PromptTooLongError]]:
        """Top-k maps only: `labels` cannot be asked of a server (missing labels are imputed downstream)."""
        return self._imap(lambda p: self._logprobs_one(p, k), prompts)

    def _generate_one(
        self, prompt: Prompt | str, max_new_tokens: int, temperature: float, top_k: int, seed: int
    ) -> str:
        body = self._body(as_prompt(prompt), max_new_tokens, temperature)
        if temperature > 0:
            body["seed"] = seed  # per request, so a resumed job draws the same sample
            if top_k > 0:
                body["top_k"] = top_k  # vLLM / SGLang / TGI / llama.cpp extension
        if self.api == "completions":
            return self.request(self._path(), body, lambda o: str(o["choices"][0]["text"]))
        return self.request(self._path(), body, lambda o: str(o["choices"][0]["message"]["content"] or ""))

    def iter_generate(
        self,
        prompts: Sequence[Prompt | str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> Iterator[tuple[int, str | PromptTooLongError]]:
        return self._imap(lambda p: self._generate_one(p, max_new_tokens, temperature, top_k, seed), prompts)

    def close(self) -> None:
        self._closed.set()
