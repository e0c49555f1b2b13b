"""`rlxf serve`: an OpenAI-compatible HTTP server for any local Hugging Face causal LM directory.

    rlxf serve --model runs/judge --port 8000          # then: rlxf label --backend.kind openai \\
                                                        #   --backend.base_url http://127.0.0.1:8000/v1

Endpoints (the subset labelling and d-RLAIF need, in OpenAI's response formats):
- `GET /v1/models`, `GET /health`;
- `POST /v1/completions`: `prompt` (string or list of strings), `max_tokens` (16), `temperature` (1.0; 0 = greedy),
  `top_p`, `top_k` (vLLM extension), `seed`, `stop`, `logprobs` (k top log-probs per generated token);
- `POST /v1/chat/completions`: `messages`, `max_tokens` / `max_completion_tokens` (256), `temperature`, `top_p`,
  `top_k`, `seed`, `stop`, `logprobs` + `top_logprobs`, and vLLM's `add_generation_prompt` / `continue_final_message`
  (continue a prefilled assistant turn, docs/methods/rlaif.md §2.2 "chat labelers").

Log-probs come from the untempered model distribution. Completions prompts are encoded with the tokenizer's special
tokens (BOS), chat prompts with the chat template and no special tokens, as vLLM does. `max_tokens` beyond the room
left in the context is clipped (finish_reason "length"); a prompt longer than the context is a 400 error naming the
"maximum context length". One request runs on the model at a time: this server is for tests, demos and small labellers
on loopback; label at scale with vLLM / SGLang / TGI / llama.cpp through the same client.

Limits (ServeConfig, all answered in the OpenAI error format): a listen backlog of `backlog` connections (many clients
connecting at once wait instead of being reset); a body over `max_body_bytes` is refused with 413 before it is read; a
Content-Length that is not a non-negative integer is a 400; a client that sends nothing for `read_timeout` seconds
(a stalled header or body) is dropped, a stalled body with a 408, so it holds its thread no longer than that; a
completions request with more than `max_prompts` prompts is a 400.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from rlxf.backends.base import apply_chat, topk_map
from rlxf.backends.local import LocalBackend, decode_one
from rlxf.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    model: str = ""
    """save_pretrained directory of the causal LM to serve. Required."""
    host: str = "127.0.0.1"
    """Interface to listen on (127.0.0.1 = this machine only; 0.0.0.0 = every interface, no authentication)."""
    port: int = 8000
    """TCP port; 0 picks a free one (logged, and written to ready_file)."""
    served_model_name: str = ""
    """The model name clients send (and /v1/models lists); empty = the --model path as given."""
    max_logprobs: int = 20
    """Largest `logprobs` / `top_logprobs` a request may ask for (vLLM's default is 20)."""
    max_context: int = 0
    """Longest prompt + completion in tokens; 0 = the model's max_position_embeddings."""
    device: str = ""
    """Torch device; empty = CUDA when available, else CPU."""
    ready_file: str = ""
    """When set, the base URL (http://host:port/v1) is written to this file once the server listens."""
    max_body_bytes: int = 8 << 20
    """Largest request body in bytes (default 8 MiB); a larger Content-Length is answered 413 without reading it."""
    read_timeout: float = 30.0
    """Seconds a client may send nothing (headers or body) before its connection is dropped (a body: 408)."""
    max_prompts: int = 64
    """Most prompts in one completions request (a list `prompt`); more is a 400 (send several requests)."""
    backlog: int = 128
    """Listen backlog: connections the kernel queues while the server accepts others (capped by net.core.somaxconn)."""


class RequestError(Exception):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


class ServeEngine:
    """The model behind the server: `LocalBackend` loading and chat rendering, one request on the model at a time."""

    def __init__(self, backend: LocalBackend, name: str, max_logprobs: int = 20):
        self.backend = backend
        self.model, self.tokenizer = backend.model, backend.tokenizer
        self.name = name
        self.max_logprobs = max_logprobs
        self.lock = threading.Lock()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        name: str = "",
        device: str | None = None,
        max_logprobs: int = 20,
        max_context: int = 0,
    ) -> ServeEngine:
        """Load a save_pretrained directory; `name` defaults to the path as given (as vLLM does)."""
        backend = LocalBackend(model_dir, device=device or None, max_context=max_context or None)
        return cls(backend, name or str(model_dir), max_logprobs)

    def complete(
        self,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        stop: list[str],
        keep_dists: bool = True,
    ) -> dict[str, Any]:
        """Generate after `ids`; returns text, new ids, their (V,) log-prob rows (when keep_dists), finish_reason.

        A generated EOS stays in the ids and log-prob rows (and counts as a completion token), as vLLM reports it: a
        scoring request whose most likely next token is EOS still gets its top log-probs. Only the text leaves it out.
        """
        limit = self.backend.max_context
        if len(ids) > limit:
            raise RequestError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested {len(ids)} tokens "
                "in the prompt. Please reduce the length of the prompt.",
                "prompt",
            )
        room = min(max_tokens, limit - len(ids) + 1)  # the last new token needs no position of its own
        gen = torch.Generator().manual_seed(seed if seed is not None else random.getrandbits(63))
        eos = self.tokenizer.eos_token_id

        def hit_stop(new: list[int]) -> bool:
            return bool(stop) and any(s in self.tokenizer.decode(new, skip_special_tokens=True) for s in stop)

        with self.lock:
            new, dists = decode_one(self.model, ids, room, eos, temperature, top_k, top_p, gen, hit_stop, keep_dists)
        finish = "stop" if (new and new[-1] == eos) else "length"
        text = self.tokenizer.decode(new[:-1] if finish == "stop" else new, skip_special_tokens=True)
        for s in stop:
            if s in text:
                text, finish = text[: text.index(s)], "stop"
        return {"text": text, "ids": new, "dists": dists, "finish_reason": finish, "prompt_tokens": len(ids)}

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


# --- request parsing -------------------------------------------------------------------------------------------------


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise RequestError(400, f"{key} must be a number in [{lo}, {hi}], got {value!r}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise RequestError(400, f"{key} must be an integer in [{lo}, {hi}], got {value!r}", key)
    return value


def _sampling(body: dict[str, Any], max_tokens_default: int) -> dict[str, Any]:
    for key, bad in (("stream", True), ("echo", True)):
        if body.get(key) == bad:
            raise RequestError(400, f"{key}=true is not supported by rlxf serve", key)
    if body.get("n", 1) != 1:
        raise RequestError(400, "n must be 1 in rlxf serve (send one request per sample)", "n")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "stop must be a string or a list of non-empty strings", "stop")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return {
        "max_tokens": _integer({"max_tokens": max_tokens}, "max_tokens", max_tokens_default, 1, 1 << 20),
        "temperature": _number(body, "temperature", 1.0, 0.0, 100.0),
        "top_p": _number(body, "top_p", 1.0, 1e-9, 1.0),
        "top_k": max(0, _integer(body, "top_k", 0, -1, 1 << 30) or 0),  # vLLM: -1 = all
        "seed": _integer(body, "seed", None, -(1 << 63), (1 << 63) - 1),
        "stop": stop,
    }


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise RequestError(400, f"messages[{i}] must be an object with string 'role' and 'content'", "messages")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# --- HTTP ------------------------------------------------------------------------------------------------------------


class OpenAIServer(ThreadingHTTPServer):
    """A threading HTTP server that carries the engine its handlers use and the request limits (ServeConfig)."""

    daemon_threads = True  # a stuck client never blocks shutdown

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        engine: ServeEngine,
        *,
        max_body_bytes: int = ServeConfig.max_body_bytes,
        read_timeout: float = ServeConfig.read_timeout,
        max_prompts: int = ServeConfig.max_prompts,
        backlog: int = ServeConfig.backlog,
    ):
        if max_body_bytes < 1 or read_timeout <= 0 or max_prompts < 1 or backlog < 1:
            raise ValueError(
                f"need max_body_bytes >= 1, read_timeout > 0, max_prompts >= 1, backlog >= 1; got {max_body_bytes}, "
                f"{read_timeout}, {max_prompts}, {backlog}"
            )
        self.request_queue_size = backlog  # read by server_activate (listen) inside super().__init__
        self.max_body_bytes, self.read_timeout, self.max_prompts = max_body_bytes, read_timeout, max_prompts
        super().__init__(address, handler)
        self.engine = engine


class OpenAIHandler(BaseHTTPRequestHandler):
    """OpenAI-compatible routes over `self.server.engine`. Subclass and override `do_POST` to inject faults."""

    server: OpenAIServer
    server_version = "rlxf-serve"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's signature)
        logger.debug("%s %s", self.address_string(), format % args)

    def send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def send_error_json(
        self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"
    ):
        self.send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def setup(self) -> None:
        self.timeout = self.server.read_timeout  # StreamRequestHandler: a socket time-out on every read and write
        super().setup()

    def read_body(self) -> bytes:
        """The request body, within the server's limits; raises RequestError (400 / 413 / 408) and marks the
        connection to be closed when it cannot be read."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            return b""
        value = raw.strip()
        if not value.isdigit() or not value.isascii():
            self.close_connection = True  # the body's end is unknown: this connection cannot carry another request
            raise RequestError(400, f"Content-Length must be a non-negative integer, got {raw[:40]!r}")
        length = int(value)
        limit = self.server.max_body_bytes
        if length > limit:
            self.close_connection = True  # the body is not read
            raise RequestError(
                413,
                f"request body of {length} bytes is larger than this server's limit of {limit} bytes "
                "(rlxf serve --max_body_bytes)",
                kind="request_too_large",
            )
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            self.close_connection = True
            raise RequestError(
                408, f"no data for {self.server.read_timeout:g}s while reading the request body", kind="timeout"
            ) from None
        if len(data) < length:
            self.close_connection = True
            raise RequestError(400, f"request body ended after {len(data)} of {length} bytes")
        return data

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?")[0].rstrip("/")
        if path in ("/health", "/v1/health"):
            self.send_json(200, {"status": "ok"})
        elif path == "/v1/models":
            engine = self.server.engine
            model = {"id": engine.name, "object": "model", "created": 0, "owned_by": "rlxf"}
            self.send_json(200, {"object": "list", "data": [model]})
        else:
            self.send_error_json(404, f"no route GET {path}; try /v1/models", kind="not_found_error")

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?")[0].rstrip("/")
        try:
            raw = self.read_body()
            try:
                body = json.loads(raw)
            except ValueError as e:
                raise RequestError(400, f"request body is not valid JSON ({e})") from None
            if not isinstance(body, dict):
                raise RequestError(400, "request body must be a JSON object")
            model = body.get("model")
            if model not in (None, self.server.engine.name):
                raise RequestError(
                    404,
                    f"The model `{model}` does not exist; this server serves {self.server.engine.name!r}",
                    "model",
                    "not_found_error",
                )
            if path == "/v1/completions":
                self.send_json(200, self.completions(body))
            elif path == "/v1/chat/completions":
                self.send_json(200, self.chat_completions(body))
            else:
                raise RequestError(404, f"no route POST {path}; use /v1/completions or /v1/chat/completions")
        except RequestError as e:
            self.send_error_json(e.status, e.message, e.param, e.kind)
        except (ValueError, TypeError) as e:  # e.g. a chat template that rejects the messages
            self.send_error_json(400, f"{type(e).__name__}: {e}")
        except RuntimeError as e:  # the model failed (e.g. out of memory): a 5xx, which clients retry
            logger.exception("rlxf serve: %s failed", path)
            self.send_error_json(500, f"{type(e).__name__}: {e}", kind="server_error")

    # -- routes

    def completions(self, body: dict[str, Any]) -> dict[str, Any]:
        engine = self.server.engine
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "prompt must be a string or a non-empty list of strings", "prompt")
        if len(prompts) > self.server.max_prompts:
            raise RequestError(
                400,
                f"at most {self.server.max_prompts} prompts per request, got {len(prompts)}: send several requests "
                "(rlxf serve --max_prompts)",
                "prompt",
            )
        params = _sampling(body, 16)
        k = _integer(body, "logprobs", None, 0, engine.max_logprobs)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0}
        for index, text in enumerate(prompts):
            out = engine.complete(
                engine.tokenizer.encode(text, add_special_tokens=True), **params, keep_dists=k is not None
            )
            logprobs = None
            if k is not None:
                tokens = [engine.token_text(t) for t in out["ids"]]
                offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
                tops = []
                for t, dist in zip(out["ids"], out["dists"]):
                    top = topk_map(dist, k, engine.tokenizer, [t])  # the sampled token is always listed
                    tops.append(top)
                logprobs = {
                    "tokens": tokens,
                    "token_logprobs": [float(d[t]) for t, d in zip(out["ids"], out["dists"])],
                    "top_logprobs": tops,
                    "text_offset": offsets,
                }
            choices.append(
                {"index": index, "text": out["text"], "logprobs": logprobs, "finish_reason": out["finish_reason"]}
            )
            usage["prompt_tokens"] += out["prompt_tokens"]
            usage["completion_tokens"] += len(out["ids"])
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": engine.name,
            "choices": choices,
            "usage": usage,
        }

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any]:
        engine = self.server.engine
        messages = _messages(body)
        params = _sampling(body, 256)
        cont = bool(body.get("continue_final_message", False))
        add_gen = bool(body.get("add_generation_prompt", not cont))
        if cont and messages[-1]["role"] != "assistant":
            raise RequestError(400, "continue_final_message needs a final assistant message", "messages")
        want = bool(body.get("logprobs", False))
        k = _integer(body, "top_logprobs", 0, 0, engine.max_logprobs) if want else 0
        try:
            text = apply_chat(engine.tokenizer, messages, add_gen, cont)
        except ValueError as e:
            raise RequestError(400, str(e), "messages") from None
        out = engine.complete(engine.tokenizer.encode(text, add_special_tokens=False), **params, keep_dists=want)
        logprobs = None
        if want:
            content = []
            for t, dist in zip(out["ids"], out["dists"]):
                top_ids = dist.topk(min(k, dist.shape[-1])).indices.tolist() if k else []
                tops = [self._entry(i, float(dist[i])) for i in top_ids]
                content.append({**self._entry(t, float(dist[t])), "top_logprobs": tops})
            logprobs = {"content": content}
        usage = {"prompt_tokens": out["prompt_tokens"], "completion_tokens": len(out["ids"])}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": out["text"]},
            "logprobs": logprobs,
            "finish_reason": out["finish_reason"],
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": engine.name,
            "choices": [choice],
            "usage": usage,
        }

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.server.engine.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def start_server(
    model_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    engine: ServeEngine | None = None,
    handler: type[BaseHTTPRequestHandler] = OpenAIHandler,
    limits: dict[str, Any] | None = None,
    **engine_kwargs: Any,
) -> tuple[OpenAIServer, threading.Thread, str]:
    """Serve `model_dir` (or a ready `engine`) on a background thread; returns (server, thread, base URL ".../v1").

    Stop it with `server.shutdown(); server.server_close()`. `handler` lets tests wrap the routes (fault injection);
    `limits` sets OpenAIServer's max_body_bytes / read_timeout / max_prompts / backlog (default: ServeConfig's).
    """
    if engine is None:
        if model_dir is None:
            raise ValueError("start_server needs model_dir or engine")
        engine = ServeEngine.load(model_dir, **engine_kwargs)
    server = OpenAIServer((host, port), handler, engine, **(limits or {}))
    thread = threading.Thread(target=server.serve_forever, name="rlxf-serve", daemon=True)
    thread.start()
    return server, thread, f"http://{host}:{server.server_address[1]}/v1"


def run_serve(cfg: ServeConfig) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    if not cfg.model:
        raise UserError("serve needs --model DIR (a save_pretrained directory)")
    if cfg.max_body_bytes < 1 or cfg.read_timeout <= 0 or cfg.max_prompts < 1 or cfg.backlog < 1:
        raise UserError(
            f"serve needs --max_body_bytes >= 1, --read_timeout > 0, --max_prompts >= 1, --backlog >= 1; got "
            f"{cfg.max_body_bytes}, {cfg.read_timeout}, {cfg.max_prompts}, {cfg.backlog}"
        )
    engine = ServeEngine.load(cfg.model, cfg.served_model_name, cfg.device or None, cfg.max_logprobs, cfg.max_context)
    server = OpenAIServer(
        (cfg.host, cfg.port),
        OpenAIHandler,
        engine,
        max_body_bytes=cfg.max_body_bytes,
        read_timeout=cfg.read_timeout,
        max_prompts=cfg.max_prompts,
        backlog=cfg.backlog,
    )
    url = f"http://{cfg.host}:{server.server_address[1]}/v1"
    if cfg.ready_file:
        tmp = Path(cfg.ready_file).with_name(Path(cfg.ready_file).name + ".tmp")
        tmp.write_text(url + "\n")
        tmp.replace(cfg.ready_file)  # readers never see half a URL
    logger.info("rlxf serve: %s serving model %r at %s", cfg.model, engine.name, url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        logger.info("rlxf serve: stopped")
    finally:
        server.server_close()
