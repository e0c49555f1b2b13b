"""`rlxf serve`: an OpenAI-compatible HTTP server for any local Hugging Face causal LM directory.

    rlxf serve --model runs/judge --port 8000          # then: rlxf label --backend.kind openai \\
                                                        #   --backend.base_url http://127.0.0.1:8000/v1

Endpoints (the subset labelling and d-RLAIF need, in OpenAI's response formats; the official `openai` client works):
- `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`;
- `POST /v1/completions`: `prompt` (string or list of strings), `max_tokens` (16), `temperature` (1.0; 0 = greedy),
  `top_p`, `top_k` (vLLM extension), `seed`, `stop`, `n`, `stream` (+ `stream_options.include_usage`), `logprobs`
  (k top log-probs per generated token);
- `POST /v1/chat/completions`: `messages` (content a string, a list of text parts, or null in an assistant turn),
  `max_tokens` / `max_completion_tokens` (256), `temperature`, `top_p`, `top_k`, `seed`, `stop`, `n`, `stream`,
  `logprobs` + `top_logprobs`, and vLLM's `add_generation_prompt` / `continue_final_message` (continue a prefilled
  assistant turn, docs/methods/rlaif.md §2.2 "chat labelers").
Fields it does not implement (`tools`, `tool_choice`, `response_format`, `logit_bias`, non-zero `presence_penalty` /
`frequency_penalty`, `suffix`, `echo`, ...) are a 400 naming the field, never silently ignored.

Log-probs come from the untempered model distribution. Completions prompts are encoded with the tokenizer's special
tokens (BOS), chat prompts with the chat template and no special tokens, as vLLM does. A generated EOS is listed in
the tokens and log-probs but its text never is: text and content hold no special-token text and no stop string, and
`text_offset` indexes into the returned text. Choice j of a request with `n` > 1 samples with `seed + j`. Streaming
sends the finished generation as server-sent events, one chunk per token, then `data: [DONE]`. `max_tokens` beyond
the room left in the context is clipped (finish_reason "length"); a prompt longer than the context is a 400 error
naming the "maximum context length".

Batching: one model thread takes every sequence waiting (up to `batch_size`) and generates them in one left-padded
batch. Greedy and unseeded requests share batches; a seeded sampling request runs alone, so its tokens depend on its
prompt, parameters and seed only. This server is for tests, demos and small labellers on loopback; label at scale with
vLLM / SGLang / TGI / llama.cpp through the same client.

Limits (ServeConfig, all answered in the OpenAI error format): a listen backlog of `backlog` connections (many clients
connecting at once wait instead of being reset); a body over `max_body_bytes` is refused with 413 before it is read; a
Content-Length that is not a non-negative integer is a 400; a client that sends nothing for `read_timeout` seconds
(a stalled header or body) is dropped, a stalled body with a 408, so it holds its thread no longer than that; a
completions request with more than `max_prompts` prompts is a 400.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch
from torch import Tensor

from rlxf.backends.base import apply_chat, topk_map
from rlxf.backends.local import LocalBackend
from rlxf.data.tokenize import pad
from rlxf.errors import UserError
from rlxf.hf import forward_with_cache

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
    batch_size: int = 16
    """Most sequences the model generates together: requests waiting when the model frees up run as one batch."""


class RequestError(Exception):
    """A request the server answers with an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _pick(logits: Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """One token from a (V,) row: greedy at temperature 0, else softmax(logits / T) within top_k and the top_p nucleus
    (as `decode_one`), drawn with the row's own CPU generator."""
    if temperature <= 0:
        return int(logits.argmax())
    scores = logits / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
    return int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=gen))


@dataclass
class _Job:
    """One sequence to generate (a request with n choices or several prompts is several jobs)."""

    ids: list[int]
    room: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stops: list[str]
    keep_dists: bool
    done: threading.Event = field(default_factory=threading.Event)
    new: list[int] = field(default_factory=list)
    dists: list[Tensor] = field(default_factory=list)
    error: BaseException | None = None

    @property
    def exact(self) -> bool:
        """A seeded sampling job runs alone (no padding), so its tokens depend on (prompt, params, seed) only."""
        return self.temperature > 0 and self.seed is not None


class ServeEngine:
    """The model behind the server: `LocalBackend` loading and chat rendering, and a worker thread that runs every
    request waiting (up to `batch_size` sequences) in one left-padded batch with the KV cache.

    Greedy and unseeded sampling jobs are batched together (each row samples with its own generator); a seeded
    sampling job runs on its own, so a seed gives the same tokens whatever else the server is doing.
    """

    def __init__(self, backend: LocalBackend, name: str, max_logprobs: int = 20, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.backend = backend
        self.model, self.tokenizer = backend.model, backend.tokenizer
        self.name = name
        self.max_logprobs = max_logprobs
        self.batch_size = batch_size
        self.lock = threading.Lock()  # held while the model runs
        self.batches = 0  # forward batches run (a counter for tests and logs)
        # text of special tokens: never part of a reply's text (a model may spell one out byte by byte)
        self.special_texts = sorted({t for t in self.tokenizer.all_special_tokens if t}, key=len, reverse=True)
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="rlxf-serve-model", daemon=True)
        self._worker.start()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        name: str = "",
        device: str | None = None,
        max_logprobs: int = 20,
        max_context: int = 0,
        batch_size: int = 16,
    ) -> ServeEngine:
        """Load a save_pretrained directory; `name` defaults to the path as given (as vLLM does)."""
        backend = LocalBackend(model_dir, device=device or None, max_context=max_context or None)
        return cls(backend, name or str(model_dir), max_logprobs, batch_size)

    # -- the model thread

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            jobs = [first]
            while len(jobs) < self.batch_size:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            shared = [j for j in jobs if not j.exact]
            groups = [[j] for j in jobs if j.exact]
            if shared:
                groups.insert(0, shared)
            for group in groups:
                try:
                    with self.lock:
                        self._decode(group)
                except BaseException as e:  # noqa: BLE001 (handed to the waiting request thread)
                    for j in group:
                        j.error = e
                finally:
                    for j in group:
                        j.done.set()

    def _stopped(self, job: _Job) -> bool:
        if not job.stops:
            return False
        longest = max(len(s) for s in job.stops)  # a token spells at least one character (or part of one)
        text = self.tokenizer.decode(job.new[-(longest + 4) :], skip_special_tokens=True)
        return any(s in text for s in job.stops)

    @torch.no_grad()
    def _decode(self, jobs: list[_Job]) -> None:
        """Generate every job in one left-padded batch (position ids count real tokens only), one step per token."""
        device = next(self.model.parameters()).device
        eos, pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        gens = [torch.Generator().manual_seed(j.seed if j.seed is not None else random.getrandbits(63)) for j in jobs]
        batch, attn = pad([j.ids for j in jobs], pad_id, side="left")  # (B, L)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        inp, attn, pos = batch.to(device), attn.to(device), pos.to(device)
        past, active = None, [True] * len(jobs)
        self.batches += 1
        for _ in range(max(j.room for j in jobs)):
            out, past = forward_with_cache(
                self.model, past, input_ids=inp, attention_mask=attn, position_ids=pos, logits_to_keep=1
            )
            logits = out.logits[:, -1].float()  # (B, V)
            logp = logits.log_softmax(-1).cpu() if any(j.keep_dists for j in jobs) else None
            toks = []
            for b, job in enumerate(jobs):
                if not active[b]:
                    toks.append(pad_id)
                    continue
                if job.keep_dists:
                    job.dists.append(logp[b])
                tok = _pick(logits[b], job.temperature, job.top_k, job.top_p, gens[b])
                job.new.append(tok)
                if tok == eos or len(job.new) >= job.room or self._stopped(job):
                    active[b] = False
                toks.append(tok)
            if not any(active):
                break
            inp = torch.tensor(toks, device=device)[:, None]
            attn = torch.cat([attn, attn.new_ones(len(jobs), 1)], dim=1)
            pos = pos[:, -1:] + 1

    # -- requests

    def generate(self, jobs: list[_Job]) -> list[dict[str, Any]]:
        """Queue the jobs for the model thread, wait for them, and return their results (see `finish`)."""
        for job in jobs:
            self._queue.put(job)
        for job in jobs:
            job.done.wait()
        for job in jobs:
            if job.error is not None:
                raise job.error
        return [self.finish(job) for job in jobs]

    def job(
        self,
        ids: list[int],
        max_tokens: int,
        temperature: float,
        top_p: float,
        top_k: int,
        seed: int | None,
        stop: list[str],
        keep_dists: bool = True,
    ) -> _Job:
        limit = self.backend.max_context
        if len(ids) > limit:
            raise RequestError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested {len(ids)} tokens "
                "in the prompt. Please reduce the length of the prompt.",
                "prompt",
            )
        room = min(max_tokens, limit - len(ids) + 1)  # the last new token needs no position of its own
        stops = list(stop) + [s for s in self.special_texts if s not in stop]
        return _Job(list(ids), room, temperature, top_k, top_p, seed, stops, keep_dists)

    def complete(self, ids: list[int], max_tokens: int, temperature: float, top_p: float, top_k: int,
                 seed: int | None, stop: list[str], keep_dists: bool = True) -> dict[str, Any]:  # fmt: skip
        """Generate after `ids` (one sequence); see `finish` for the result."""
        return self.generate([self.job(ids, max_tokens, temperature, top_p, top_k, seed, stop, keep_dists)])[0]

    def finish(self, job: _Job) -> dict[str, Any]:
        """text, ids, their (V,) log-prob rows (when keep_dists), text offsets, finish_reason, prompt_tokens.

        A generated EOS stays in the ids and log-prob rows (and counts as a completion token), as vLLM reports it: a
        scoring request whose most likely next token is EOS still gets its top log-probs. The text never holds special
        tokens (nor their text spelled out) nor a stop string: it ends before the first one, and the ids end with the
        last token whose text lies wholly before it. offsets[i] is where token i's text starts in the text.
        """
        new, dists = list(job.new), list(job.dists)
        eos = self.tokenizer.eos_token_id
        ended = bool(new) and new[-1] == eos
        body = new[:-1] if ended else new

        def decoded(n: int) -> str:
            return self.tokenizer.decode(body[:n], skip_special_tokens=True)

        text = decoded(len(body))
        finish = "stop" if ended else "length"
        cuts = [text.index(s) for s in job.stops if s in text]
        if cuts:
            cut = min(cuts)
            text, finish = text[:cut], "stop"
            keep = len(body)
            while keep > 0 and len(decoded(keep)) > cut:
                keep -= 1
            new = body[:keep]
        dists = dists[: len(new)] if job.keep_dists else []
        offsets = [min(len(decoded(i)), len(text)) for i in range(len(new))]
        return {
            "text": text,
            "ids": new,
            "dists": dists,
            "offsets": offsets,
            "finish_reason": finish,
            "prompt_tokens": len(job.ids),
            "completion_tokens": len(job.new),
        }

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


# --- request parsing -------------------------------------------------------------------------------------------------

# Fields this server does not implement: a request that sets one (to anything but its no-op value) is a 400 naming the
# field, instead of an answer that silently ignores it.
_UNSUPPORTED: dict[str, Any] = {
    "tools": None, "tool_choice": None, "functions": None, "function_call": None, "parallel_tool_calls": None,
    "response_format": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
    "repetition_penalty": 1, "suffix": None, "best_of": 1, "echo": False, "audio": None, "modalities": None,
    "prediction": None, "web_search_options": None, "reasoning_effort": None, "guided_json": None,
    "guided_regex": None, "guided_choice": None, "guided_grammar": None, "min_tokens": 0, "prompt_logprobs": None,
    "use_beam_search": False, "length_penalty": 1, "min_p": 0,
}  # fmt: skip


def _no_op(value: Any, default: Any) -> bool:
    return value is None or value == default or (default is None and value in ({}, [], ""))


def _reject_unsupported(body: dict[str, Any]) -> None:
    for key, default in _UNSUPPORTED.items():
        if key in body and not _no_op(body[key], default):
            raise RequestError(400, f"{key} is not supported by rlxf serve (got {body[key]!r}); leave it out", key)


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
    _reject_unsupported(body)
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


def _seed(seed: int | None, j: int) -> int | None:
    """Choice j of a seeded request samples with seed + j (wrapped to 64 bits): n choices differ, and each repeats."""
    return None if seed is None else (seed + j + (1 << 63)) % (1 << 64) - (1 << 63)


def _content(m: dict[str, Any], i: int) -> str:
    """A message's text: a string, a list of text parts, or null (an assistant turn only)."""
    content = m.get("content")
    if isinstance(content, str):
        return content
    if content is None and m.get("role") == "assistant":
        if m.get("tool_calls") or m.get("function_call"):
            raise RequestError(400, f"messages[{i}].tool_calls are not supported by rlxf serve", "messages")
        return ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise RequestError(
                    400,
                    f"messages[{i}].content[{j}] must be a text part {{'type': 'text', 'text': ...}}; rlxf serve "
                    f"does not support {kind!r} parts",
                    "messages",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(
        400, f"messages[{i}].content must be a string, a list of text parts, or null (assistant)", "messages"
    )


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with string 'role' and 'content'", "messages")
        if m["role"] == "tool" or m.get("tool_calls"):
            raise RequestError(400, f"messages[{i}]: tool messages and tool_calls are not supported", "messages")
        out.append({"role": m["role"], "content": _content(m, i)})
    return out


def _sse(payload: Any) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


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
    disable_nagle_algorithm = True  # TCP_NODELAY: headers and body go out at once, no ~40-200 ms delayed-ACK stall

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
            self.send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/"):
            name = unquote(path.removeprefix("/v1/models/"))
            if name == self.server.engine.name:
                self.send_json(200, self._model_card())
            else:
                self.send_error_json(
                    404,
                    f"The model `{name}` does not exist; this server serves {self.server.engine.name!r}",
                    "model",
                    kind="not_found_error",
                )
        else:
            self.send_error_json(404, f"no route GET {path}; try /v1/models", kind="not_found_error")

    def _model_card(self) -> dict[str, Any]:
        engine = self.server.engine
        return {"id": engine.name, "object": "model", "created": 0, "owned_by": "rlxf",
                "max_model_len": engine.backend.max_context}  # fmt: skip

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
                reply = self.completions(body)
            elif path == "/v1/chat/completions":
                reply = self.chat_completions(body)
            else:
                raise RequestError(404, f"no route POST {path}; use /v1/completions or /v1/chat/completions")
            if reply is not None:  # None: streamed
                self.send_json(200, reply)
        except RequestError as e:
            self.send_error_json(e.status, e.message, e.param, e.kind)
        except (ValueError, TypeError) as e:  # e.g. a chat template that rejects the messages
            self.send_error_json(400, f"{type(e).__name__}: {e}")
        except RuntimeError as e:  # the model failed (e.g. out of memory): a 5xx, which clients retry
            logger.exception("rlxf serve: %s failed", path)
            self.send_error_json(500, f"{type(e).__name__}: {e}", kind="server_error")

    # -- routes

    def _stream(self, body: dict[str, Any]) -> tuple[bool, bool]:
        """(stream, include_usage) from `stream` / `stream_options`."""
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise RequestError(400, f"stream must be a boolean, got {stream!r}", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise RequestError(400, "stream_options must be an object", "stream_options")
        return stream, bool(options.get("include_usage")) and stream

    def send_stream(self, events: Any) -> None:
        """Server-sent events, one `data:` line per chunk, ending with `data: [DONE]`; the connection closes after."""
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        for event in events:
            self.wfile.write(_sse(event))
            self.wfile.flush()
        self.wfile.write(_sse("[DONE]"))
        self.wfile.flush()

    @staticmethod
    def _pieces(out: dict[str, Any]) -> list[tuple[int, str]]:
        """(token position, the text it adds) for each returned token; the text joins to out["text"]."""
        text, offsets, pos, pieces = out["text"], out["offsets"], 0, []
        for i in range(len(out["ids"])):
            end = offsets[i + 1] if i + 1 < len(offsets) else len(text)
            end = max(pos, end)
            pieces.append((i, text[pos:end]))
            pos = end
        if pos < len(text):  # never for well-formed offsets
            pieces.append((-1, text[pos:]))
        return pieces

    def _usage(self, outs: list[dict[str, Any]], prompts: int | None = None) -> dict[str, int]:
        # n choices of one prompt share it: the prompt counts once per prompt, as OpenAI and vLLM count it
        n = max(1, len(outs) // (prompts or 1))
        prompt_tokens = sum(o["prompt_tokens"] for o in outs[::n])
        completion = sum(o["completion_tokens"] for o in outs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}  # fmt: skip

    def _completion_logprobs(self, out: dict[str, Any], k: int, tokens: list[int]) -> dict[str, Any]:
        engine = self.server.engine
        return {
            "tokens": [engine.token_text(out["ids"][i]) for i in tokens],
            "token_logprobs": [float(out["dists"][i][out["ids"][i]]) for i in tokens],
            # the sampled token is always listed
            "top_logprobs": [topk_map(out["dists"][i], k, engine.tokenizer, [out["ids"][i]]) for i in tokens],
            "text_offset": [out["offsets"][i] for i in tokens],
        }

    def _chat_logprobs(self, out: dict[str, Any], k: int, tokens: list[int]) -> list[dict[str, Any]]:
        content = []
        for i in tokens:
            t, dist = out["ids"][i], out["dists"][i]
            top_ids = dist.topk(min(k, dist.shape[-1])).indices.tolist() if k else []
            tops = [self._entry(j, float(dist[j])) for j in top_ids]
            content.append({**self._entry(t, float(dist[t])), "top_logprobs": tops})
        return content

    def completions(self, body: dict[str, Any]) -> dict[str, Any] | None:
        engine = self.server.engine
        prompt = body.get("prompt")
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise RequestError(400, "prompt must be a string or a non-empty list of strings", "prompt")
        limit = self.server.max_prompts
        if len(prompts) > limit:
            raise RequestError(
                400,
                f"at most {limit} prompts per request, got {len(prompts)}: send several requests "
                "(rlxf serve --max_prompts)",
                "prompt",
            )
        params = _sampling(body, 16)
        n = _integer(body, "n", 1, 1, limit)
        if n * len(prompts) > limit:
            raise RequestError(
                400, f"n × prompts is at most {limit} sequences per request, got {n} × {len(prompts)}", "n"
            )
        k = _integer(body, "logprobs", None, 0, engine.max_logprobs)
        stream, include_usage = self._stream(body)
        jobs = []
        for text in prompts:
            ids = engine.tokenizer.encode(text, add_special_tokens=True)
            for j in range(n):
                jobs.append(engine.job(ids, **{**params, "seed": _seed(params["seed"], j)}, keep_dists=k is not None))
        outs = engine.generate(jobs)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": engine.name}  # fmt: skip
        usage = self._usage(outs, len(prompts))
        if stream:

            def events() -> Any:
                for index, out in enumerate(outs):
                    for i, piece in self._pieces(out):
                        if not piece and (k is None or i < 0):
                            continue
                        lp = self._completion_logprobs(out, k, [i]) if k is not None and i >= 0 else None
                        yield {**head, "choices": [{"index": index, "text": piece, "logprobs": lp,
                                                    "finish_reason": None}]}  # fmt: skip
                    yield {**head, "choices": [{"index": index, "text": "", "logprobs": None,
                                                "finish_reason": out["finish_reason"]}]}  # fmt: skip
                if include_usage:
                    yield {**head, "choices": [], "usage": usage}

            self.send_stream(events())
            return None
        choices = [
            {
                "index": index,
                "text": out["text"],
                "logprobs": None if k is None else self._completion_logprobs(out, k, list(range(len(out["ids"])))),
                "finish_reason": out["finish_reason"],
            }
            for index, out in enumerate(outs)
        ]
        return {**head, "choices": choices, "usage": usage}

    def chat_completions(self, body: dict[str, Any]) -> dict[str, Any] | None:
        engine = self.server.engine
        messages = _messages(body)
        params = _sampling(body, 256)
        n = _integer(body, "n", 1, 1, self.server.max_prompts)
        cont = bool(body.get("continue_final_message", False))
        add_gen = bool(body.get("add_generation_prompt", not cont))
        if cont and messages[-1]["role"] != "assistant":
            raise RequestError(400, "continue_final_message needs a final assistant message", "messages")
        want = body.get("logprobs") or False
        if not isinstance(want, bool):
            raise RequestError(400, f"logprobs must be a boolean in chat completions, got {want!r}", "logprobs")
        k = _integer(body, "top_logprobs", 0, 0, engine.max_logprobs) if want else 0
        stream, include_usage = self._stream(body)
        try:
            text = apply_chat(engine.tokenizer, messages, add_gen, cont)
        except ValueError as e:
            raise RequestError(400, str(e), "messages") from None
        ids = engine.tokenizer.encode(text, add_special_tokens=False)
        jobs = [engine.job(ids, **{**params, "seed": _seed(params["seed"], j)}, keep_dists=want) for j in range(n)]
        outs = engine.generate(jobs)
        usage = self._usage(outs)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name}
        if stream:
            head["object"] = "chat.completion.chunk"

            def chunk(index: int, delta: dict[str, Any], lp: Any = None, finish: str | None = None) -> dict:
                return {**head, "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

            def events() -> Any:
                for index, out in enumerate(outs):
                    yield chunk(index, {"role": "assistant", "content": ""})
                    for i, piece in self._pieces(out):
                        if not piece and (not want or i < 0):
                            continue
                        lp = {"content": self._chat_logprobs(out, k, [i])} if want and i >= 0 else None
                        yield chunk(index, {"content": piece}, lp)
                    yield chunk(index, {}, None, out["finish_reason"])
                if include_usage:
                    yield {**head, "choices": [], "usage": usage}

            self.send_stream(events())
            return None
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": out["text"]},
                "logprobs": {"content": self._chat_logprobs(out, k, list(range(len(out["ids"]))))} if want else None,
                "finish_reason": out["finish_reason"],
            }
            for index, out in enumerate(outs)
        ]
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage}

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
    if cfg.max_body_bytes < 1 or cfg.read_timeout <= 0 or cfg.max_prompts < 1 or cfg.backlog < 1 or cfg.batch_size < 1:
        raise UserError(
            f"serve needs --max_body_bytes >= 1, --read_timeout > 0, --max_prompts >= 1, --backlog >= 1, "
            f"--batch_size >= 1; got {cfg.max_body_bytes}, {cfg.read_timeout}, {cfg.max_prompts}, {cfg.backlog}, "
            f"{cfg.batch_size}"
        )
    engine = ServeEngine.load(
        cfg.model, cfg.served_model_name, cfg.device or None, cfg.max_logprobs, cfg.max_context, cfg.batch_size
    )
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
