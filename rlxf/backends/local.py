"""A local Hugging Face causal LM as a labeller backend (batched, exact label log-probs)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rlxf.backends.base import (
    BackendStats,
    Prompt,
    PromptTooLongError,
    TopK,
    _ListCalls,
    apply_chat,
    as_prompt,
    chat_messages,
    model_fingerprint,
    topk_map,
)
from rlxf.data.tokenize import pad
from rlxf.feedback.label_math import label_token_ids
from rlxf.hf import forward_with_cache

logger = logging.getLogger(__name__)


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
        out, past = forward_with_cache(model, past, input_ids=inp, logits_to_keep=1)
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
        from rlxf.hf import load_model, load_tokenizer

        if isinstance(model, (str, Path)):
            path = Path(model)
            if not path.is_dir():
                raise FileNotFoundError(f"labeller model directory {path} does not exist (a save_pretrained dir)")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = torch.bfloat16 if str(device).startswith("cuda") and torch.cuda.is_bf16_supported() else None
            # load_model also takes a LoRA adapter directory (merged on load)
            self.model = load_model(path, what="labeller model", dtype=dtype or torch.float32).to(device).eval()
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
