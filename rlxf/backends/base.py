"""LLM labeller backends: a local `transformers` causal LM, or any OpenAI-compatible server (docs/methods/rlaif.md §2).

A backend answers two kinds of request, one prompt at a time or batched:

    generate_greedy(prompts, max_new_tokens) -> list[str]           # CoT rationales (docs/methods/rlaif.md §2.2)
    next_token_logprobs(prompts, k, labels) -> list[dict[str, float]]  # top-k {token text: log-prob} after the prompt

plus `generate` (sampling, for self-consistency) and the iterator forms `iter_generate` / `iter_next_token_logprobs`,
which yield `(index, result)` as each prompt finishes so a caller can store every result at once (`rlxf.backends.cache`).
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
(docs/methods/rlaif.md §2.2 "chat labelers"; the server must support vLLM's `continue_final_message`, as `rlxf serve` does).

Shapes: B prompts in a batch, L prompt length (left-padded), V vocab.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

logger = logging.getLogger(__name__)

TopK = dict[str, float]


class PromptTooLongError(ValueError):
    """The prompt (plus the tokens to generate) does not fit the model's context. Per prompt: the labeller skips
    and counts the pair (docs/methods/rlaif.md §3 "context limit")."""


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
