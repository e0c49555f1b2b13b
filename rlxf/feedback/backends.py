"""LLM labeller backends: a local `transformers` causal LM, or any OpenAI-compatible server (RLAIF spec §2).

A backend answers two kinds of request, one prompt at a time or batched:

    generate_greedy(prompts, max_new_tokens) -> list[str]           # CoT rationales (spec §2.2)
    next_token_logprobs(prompts, k, labels) -> list[dict[str, float]]  # top-k {token text: log-prob} after the prompt

plus `generate` (sampling, for self-consistency) and the iterator forms `iter_generate` / `iter_next_token_logprobs`,
which yield `(index, result)` as each prompt finishes so a caller can store every result at once (`rlxf.feedback.cache`).
A result is a `PromptTooLongError` instance (not raised) when that prompt does not fit the model's context; the list
forms raise it.

Backends:
- `LocalBackend`: a Hugging Face causal LM in this process. Batched, left-padded, one forward pass per prompt for
  scoring. It sees the full vocabulary, so besides the top k it returns the exact log-prob of every single-token
  variant of the requested labels ("1" and " 1", `labels.label_token_ids`): label log-probs are never missing.
- `OpenAIBackend`: any server with the OpenAI completions or chat-completions API and log-probs (vLLM, SGLang, TGI,
  llama.cpp, `rlxf serve`). Requests run concurrently on a thread pool, time out, and are retried with exponential
  backoff on HTTP 5xx / 429 / 408, time-outs, connection errors and malformed bodies; other 4xx fail at once with the
  server's message. Only the top k come back, so a label may be missing (`labels.label_logprobs_from_topk` imputes).

A `Prompt` is the user text plus an optional assistant prefill. Completions backends see `user + prefill` as one
string; chat backends send `user` as the user turn and continue an assistant turn that starts with `prefill`
(spec §2.2 "chat labelers"; the server must support vLLM's `continue_final_message`, as `rlxf serve` does).

Shapes: B prompts in a batch, L prompt length (left-padded), V vocab.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import math
import os
import random
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from rlxf.errors import BackendError
from rlxf.feedback.labels import label_token_ids
from rlxf.tokenization import pad

logger = logging.getLogger(__name__)

TopK = dict[str, float]


class PromptTooLongError(ValueError):
    """The prompt (plus the tokens to generate) does not fit the model's context. Per prompt: the labeller skips
    and counts the pair (spec §3 "context limit")."""


@dataclass(frozen=True)
class Prompt:
    """A labeller prompt: the instruction text and the start of the answer.

    Completions see `text` = user + prefill. Chat sees `user` (trailing whitespace stripped) as the user message and,
    when `prefill` is not empty, an assistant message holding `prefill` that the model continues.
    """

    user: str
    prefill: str = ""

    @property
    def text(self) -> str:
        return self.user + self.prefill


def as_prompt(p: Prompt | str) -> Prompt:
    return p if isinstance(p, Prompt) else Prompt(p)


def split_prompt(text: str, prefill: str) -> Prompt:
    """`text` as a Prompt whose prefill is its last `len(prefill)` characters (which must equal `prefill`)."""
    if prefill and not text.endswith(prefill):
        raise ValueError(f"prompt does not end with the prefill {prefill[-40:]!r}")
    return Prompt(text[: len(text) - len(prefill)], prefill)


def chat_messages(prompt: Prompt) -> list[dict[str, str]]:
    """The chat messages of a Prompt: the user turn, then the assistant prefill when there is one."""
    messages = [{"role": "user", "content": prompt.user.rstrip()}]
    if prompt.prefill:
        messages.append({"role": "assistant", "content": prompt.prefill})
    return messages


def apply_chat(
    tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final: bool
) -> str:
    """Render chat messages with the tokenizer's chat template (shared by `LocalBackend(chat=True)` and `rlxf serve`,
    so both see the same text). `continue_final` leaves the final (assistant) message open for the model to continue."""
    if tokenizer.chat_template is None:
        raise ValueError("this tokenizer has no chat template; use the completions API (api=completions)")
    if add_generation_prompt and continue_final:
        raise ValueError("add_generation_prompt and continue_final_message cannot both be true")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, continue_final_message=continue_final
    )


def logaddexp_into(out: TopK, token: str, logprob: float) -> None:
    """out[token] = log(e^out[token] + e^logprob): distinct token ids that decode to the same text are one label."""
    old = out.get(token)
    if old is None:
        out[token] = logprob
    else:
        hi, lo = max(old, logprob), min(old, logprob)
        out[token] = hi + math.log1p(math.exp(lo - hi))


def topk_map(logp: Tensor, k: int, tokenizer: Any, extra_ids: Sequence[int] = ()) -> TopK:
    """{token text: log-prob} of the k most likely next tokens plus `extra_ids`, from one (V,) log-softmax row.

    Ids decoding to the same text are merged (log-sum-exp), as a text-keyed top-k map must.
    """
    k = min(k, logp.shape[-1])
    ids = logp.topk(k).indices.tolist() if k > 0 else []
    ids += [i for i in extra_ids if i not in ids]
    values = logp[ids].double().tolist()
    out: TopK = {}
    for i, v in zip(ids, values):
        logaddexp_into(out, tokenizer.decode([i]), v)
    return out


class BackendStats:
    """Cost counters, thread-safe. calls: requests sent (HTTP attempts, retries included; local: prompts run);
    retries: failed attempts that were retried; prompt/completion tokens: as the server's `usage` reports them
    (local: counted here, 1 completion token per scored prompt, as a max_tokens=1 request); forward_passes: local
    batches run (one scoring forward pass or one generate() call each)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls = self.retries = self.prompt_tokens = self.completion_tokens = self.forward_passes = 0

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "calls": self.calls,
                "retries": self.retries,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "forward_passes": self.forward_passes,
            }


class Backend(Protocol):
    """What the labeller and the d-RLAIF source need from an LLM."""

    kind: str
    """"local", "local-chat", "openai-completions" or "openai-chat": part of every cache key."""
    model_id: str
    """Names the weights (local: resolved path + fingerprint; openai: the served model name): part of cache keys."""
    stats: BackendStats

    def iter_generate(
        self,
        prompts: Sequence[Prompt | str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> Iterator[tuple[int, str | PromptTooLongError]]: ...

    def iter_next_token_logprobs(
        self, prompts: Sequence[Prompt | str], k: int, labels: Sequence[str] = ()
    ) -> Iterator[tuple[int, TopK | PromptTooLongError]]: ...

    def generate_greedy(self, prompts: Sequence[Prompt | str], max_new_tokens: int) -> list[str]: ...

    def next_token_logprobs(
        self, prompts: Sequence[Prompt | str], k: int, labels: Sequence[str] = ()
    ) -> list[TopK]: ...

    def single_token(self, text: str) -> bool | None:
        """True/False when the vocabulary is known (local), None when not (remote)."""
        ...

    def prompt_key(self, prompt: Prompt | str) -> str:
        """What the model actually reads, as a cache-key string."""
        ...

    def close(self) -> None: ...


def _collect(items: Iterator[tuple[int, Any]], n: int) -> list[Any]:
    out: list[Any] = [None] * n
    for i, value in items:
        if isinstance(value, PromptTooLongError):
            raise value
        out[i] = value
    return out


class _ListCalls:
    """A backend's list-returning calls, built on its `iter_*` methods (a prompt too long for the model raises)."""

    def next_token_logprobs(self, prompts: Sequence[Prompt | str], k: int, labels: Sequence[str] = ()) -> list[TopK]:
        return _collect(self.iter_next_token_logprobs(prompts, k, labels), len(prompts))

    def generate(
        self,
        prompts: Sequence[Prompt | str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> list[str]:
        return _collect(self.iter_generate(prompts, max_new_tokens, temperature, top_k, seed), len(prompts))

    def generate_greedy(self, prompts: Sequence[Prompt | str], max_new_tokens: int) -> list[str]:
        return self.generate(prompts, max_new_tokens)


# --- local transformers model ----------------------------------------------------------------------------------------


def model_fingerprint(path: str | Path) -> str:
    """A short hash of a save_pretrained directory's config and weight files (name, size, mtime), so a cache never
    mixes judgements of two different checkpoints written to the same path."""
    path = Path(path)
    h = hashlib.sha1()
    for f in sorted(path.iterdir()):
        if f.name == "config.json":
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


@torch.no_grad()
def decode_one(
    model: torch.nn.Module,
    ids: Sequence[int],
    max_new_tokens: int,
    eos_token_id: int | None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    keep_dists: bool = True,
) -> tuple[list[int], list[Tensor]]:
    """Decode one sequence with the KV cache: greedy when temperature is 0, else sampling from softmax(logits / T)
    restricted to the top_k tokens (0 = all) and the top_p nucleus. Stops after EOS (kept), after max_new_tokens, or
    when `stop(new_ids)` is true.

    Returns the new ids and, per new token, the (V,) float32 log-softmax of the *untempered* logits it was drawn from
    (the distribution OpenAI-style servers report log-probs from; an empty list with keep_dists=False, which saves
    new tokens × V floats).
    """
    device = next(model.parameters()).device
    inp = torch.tensor([list(ids)], device=device)  # (1, L)
    past, new_ids, dists = None, [], []
    for _ in range(max_new_tokens):
        out = model(input_ids=inp, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        logits = out.logits[0, -1].float()  # (V,)
        if keep_dists:
            dists.append(logits.log_softmax(-1).cpu())
        if temperature <= 0:
            tok = int(logits.argmax())
        else:
            scores = logits / temperature
            if 0 < top_k < scores.shape[-1]:
                kth = scores.topk(top_k).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if top_p < 1.0:
                sorted_scores, order = scores.sort(descending=True)
                cum = sorted_scores.softmax(-1).cumsum(-1)
                drop = cum - sorted_scores.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
                scores = scores.scatter(0, order, sorted_scores.masked_fill(drop, float("-inf")))
            tok = int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator))
        new_ids.append(tok)
        if tok == eos_token_id or (stop is not None and stop(new_ids)):
            break
        inp = torch.tensor([[tok]], device=device)
    return new_ids, dists


class LocalBackend(_ListCalls):
    """A `transformers` causal LM in this process (batched, left padding, full vocabulary).

    Completions mode encodes `prompt.text` with the tokenizer's special tokens (BOS), as vLLM does for completions;
    chat mode renders `chat_messages(prompt)` with the chat template (`apply_chat`) and adds no special tokens.
    `max_context` caps prompt + new tokens (default and upper bound: the model's max_position_embeddings).
    """

    def __init__(
        self,
        model: str | Path | torch.nn.Module,
        tokenizer: Any = None,
        *,
        chat: bool = False,
        batch_size: int = 8,
        device: str | None = None,
        max_context: int | None = None,
        model_id: str | None = None,
    ):
        from rlxf.trainers.common import load_tokenizer

        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_dir():
                raise FileNotFoundError(f"labeller model directory {path} does not exist (a save_pretrained dir)")
            from transformers import AutoModelForCausalLM

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else None
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
            self.tokenizer = tokenizer or load_tokenizer(path)
            self.model_id = model_id or f"{path.resolve()}#{model_fingerprint(path)}:{self.model.dtype}"
        else:
            if tokenizer is None:
                raise ValueError("LocalBackend(model=<nn.Module>) needs its tokenizer")
            self.model, self.tokenizer = model.eval(), tokenizer
            self.model_id = model_id or f"{getattr(model.config, '_name_or_path', '') or type(model).__name__}"
        self.model.requires_grad_(False)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.chat = chat
        self.kind = "local-chat" if chat else "local"
        self.batch_size = batch_size
        positions = getattr(self.model.config, "max_position_embeddings", None) or 1 << 30
        self.max_context = min(max_context or positions, positions)
        self.device = next(self.model.parameters()).device
        self.stats = BackendStats()

    # -- prompts -> ids

    def render(self, prompt: Prompt | str) -> str:
        prompt = as_prompt(prompt)
        if not self.chat:
            return prompt.text
        return apply_chat(self.tokenizer, chat_messages(prompt), not prompt.prefill, bool(prompt.prefill))

    def encode(self, prompt: Prompt | str) -> list[int]:
        return self.tokenizer.encode(self.render(prompt), add_special_tokens=not self.chat)

    def prompt_key(self, prompt: Prompt | str) -> str:
        return self.render(prompt)

    def single_token(self, text: str) -> bool:
        return len(self.tokenizer.encode(text, add_special_tokens=False)) == 1

    def _too_long(self, n: int, extra: int) -> PromptTooLongError:
        return PromptTooLongError(
            f"prompt is {n} tokens (+{extra} to generate); the labeller's context is {self.max_context} tokens"
        )

    # -- scoring

    @torch.no_grad()
    def next_token_logprobs_tensor(self, ids: Sequence[Sequence[int]]) -> Tensor:
        """(B, V) float32 log-softmax of the next token after each id list, in one left-padded forward pass.

        Position ids count real tokens only (left padding shifts nothing), as `generate` does.
        """
        batch, attn = pad(ids, self.tokenizer.pad_token_id, side="left")  # (B, L)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, L)
        out = self.model(
            input_ids=batch.to(self.device),
            attention_mask=attn.to(self.device),
            position_ids=positions.to(self.device),
            logits_to_keep=1,
        )
        self.stats.add(forward_passes=1)
        return out.logits[:, -1].float().log_softmax(-1).cpu()  # (B, V)

    def iter_next_token_logprobs(
        self, prompts: Sequence[Prompt | str], k: int, labels: Sequence[str] = ()
    ) -> Iterator[tuple[int, TopK | PromptTooLongError]]:
        """Top-k maps plus the exact log-prob of every single-token variant of each label ("1", " 1", ...)."""
        extra = [i for ids in label_token_ids(self.tokenizer, labels, allow_missing=True).values() for i in ids]
        encoded = [self.encode(p) for p in prompts]
        fits = []
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_context:
                yield i, self._too_long(len(ids), 0)
            else:
                fits.append(i)
        for start in range(0, len(fits), self.batch_size):
            chunk = fits[start : start + self.batch_size]
            logp = self.next_token_logprobs_tensor([encoded[i] for i in chunk])  # (B, V)
            self.stats.add(
                calls=len(chunk), prompt_tokens=sum(len(encoded[i]) for i in chunk), completion_tokens=len(chunk)
            )
            for row, i in enumerate(chunk):
                yield i, topk_map(logp[row], k, self.tokenizer, extra)

    # -- generation

    def iter_generate(
        self,
        prompts: Sequence[Prompt | str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> Iterator[tuple[int, str | PromptTooLongError]]:
        """Greedy (temperature 0): batched through `rlxf.sampling.generate`. Sampling: one prompt at a time, each
        seeded with `seed`, so a prompt's sample depends on (prompt, seed) only, not on what else is in the call."""
        from rlxf.sampling import GenerationSettings, generate

        encoded = [self.encode(p) for p in prompts]
        fits = []
        for i, ids in enumerate(encoded):
            if len(ids) >= self.max_context:
                yield i, self._too_long(len(ids), max_new_tokens)
            else:
                fits.append(i)
        eos, pad_id = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        step = self.batch_size if temperature <= 0 else 1
        for start in range(0, len(fits), step):
            chunk = fits[start : start + step]
            # never past the context: new tokens are capped by the longest prompt of the batch
            room = min(max_new_tokens, self.max_context - max(len(encoded[i]) for i in chunk))
            if temperature <= 0:
                settings = GenerationSettings(max_new_tokens=room, temperature=0.0, batch_size=len(chunk))
                samples = generate(
                    self.model, [encoded[i] for i in chunk], eos_token_id=eos, pad_token_id=pad_id, settings=settings
                )
                new = [s[0].response_ids for s in samples]
            else:
                gen = torch.Generator().manual_seed(seed)
                new = [
                    decode_one(
                        self.model, encoded[chunk[0]], room, eos, temperature, top_k, 1.0, gen, keep_dists=False
                    )[0]
                ]
            self.stats.add(
                calls=len(chunk),
                forward_passes=1,
                prompt_tokens=sum(len(encoded[i]) for i in chunk),
                completion_tokens=sum(len(n) for n in new),
            )
            for i, ids in zip(chunk, new):
                yield i, self.tokenizer.decode(ids, skip_special_tokens=True)

    def close(self) -> None:
        pass


# --- OpenAI-compatible server ----------------------------------------------------------------------------------------


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
        # The cache key names the model, not the URL: a job can resume against a restarted server elsewhere.
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


def build_backend(cfg: BackendConfig, max_context: int | None = None) -> LocalBackend | OpenAIBackend:
    """A backend from its config. `max_context` caps the local model's context (spec §3: 4,096 tokens)."""
    if cfg.kind == "local":
        if not cfg.model:
            raise ValueError("backend.kind=local needs --backend.model DIR (a save_pretrained directory)")
        return LocalBackend(
            cfg.model,
            chat=cfg.api == "chat",
            batch_size=cfg.batch_size,
            device=cfg.device or None,
            max_context=max_context,
        )
    if cfg.kind == "openai":
        if not cfg.base_url:
            raise ValueError("backend.kind=openai needs --backend.base_url, e.g. http://127.0.0.1:8000/v1")
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
    raise ValueError(f"backend.kind must be 'local' or 'openai', got {cfg.kind!r}")


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
        raise ValueError(f"empty backend in {spec!r}; {BACKEND_SPEC_HELP}")
    options = dict(urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    extras = {k: options.pop(k) for k in list(options) if k in extra_keys}
    data: dict[str, Any] = dict(options)
    if target.startswith(("http://", "https://")):
        data |= {"kind": "openai", "base_url": target}
    else:
        data |= {"kind": "local", "model": target}
    return from_dict(BackendConfig, data, where=f"backend spec {spec!r}"), extras
