"""Batched sampling from a causal LM: left padding, the KV cache, EOS and length limits, n samples per prompt.

Shapes: B prompts in a batch, L prompt length (left-padded), N new tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from rlxf.tokenization import pad

logger = logging.getLogger(__name__)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    """Longest response in tokens; a response that reaches it without EOS is marked unfinished."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    batch_size: int = 32
    """Prompts per generate() call (each expanded to n samples)."""


@dataclass
class Sample:
    prompt_index: int
    response_ids: list[int]
    """Generated ids up to and including EOS when finished; no padding."""
    finished: bool
    """True when the response ended with EOS, False when it hit max_new_tokens."""


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    *,
    eos_token_id: int,
    pad_token_id: int,
    n: int = 1,
    settings: GenerationSettings | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[list[Sample]]:
    """Sample `n` responses for each prompt; returns one list of `n` samples per prompt, in order.

    Each batch is seeded with (seed, batch index), so the same call gives the same samples on the same device.
    """
    settings = settings or GenerationSettings()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    results: list[list[Sample]] = [[] for _ in prompt_ids]
    batches = range(0, len(prompt_ids), settings.batch_size)
    for batch_index, start in enumerate(tqdm(batches, desc="sampling", disable=not progress, dynamic_ncols=True)):
        chunk = prompt_ids[start : start + settings.batch_size]
        ids, attention_mask = pad(chunk, pad_token_id, side="left")  # (B, L): generation needs left padding
        torch.manual_seed(seed * 1_000_003 + batch_index)
        greedy = settings.temperature == 0
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=not greedy,
            temperature=None if greedy else settings.temperature,
            top_p=None if greedy else settings.top_p,
            top_k=None if greedy else 0,
            num_return_sequences=n,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            use_cache=True,
        )  # (B * n, L + N), samples of one prompt adjacent
        new_tokens = out[:, ids.shape[1] :].tolist()
        for row, tokens in enumerate(new_tokens):
            response, finished = [], False
            for t in tokens:
                response.append(t)
                if t == eos_token_id:
                    finished = True
                    break
            results[start + row // n].append(Sample(start + row // n, response, finished))
    model.train(was_training)
    return results


def strip_eos(ids: list[int], eos_token_id: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos_token_id else ids


def decode_samples(tokenizer: Any, samples: list[list[Sample]]) -> list[list[str]]:
    """Texts of the samples, without the EOS token."""
    return [
        [tokenizer.decode(strip_eos(s.response_ids, tokenizer.eos_token_id), skip_special_tokens=True) for s in group]
        for group in samples
    ]
