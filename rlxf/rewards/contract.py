"""Adapters of the reward contract (design principle 3, "One reward contract").

Every reward source ends as token-level rewards aligned with the response tokens: a (B, T) float tensor of rewards
plus the (B, T) bool mask of response tokens, where column t is the position whose log-prob scores response token
y_t (the same columns as the policy's log-probs). Rewards are 0 outside the mask. PPO and REINFORCE never care where
the rewards came from:

- a scalar score per response -> `scalar_to_token_rewards` (all of it on the last response token);
- one reward per response token -> `list_to_token_rewards`;
- character spans `(start, end, reward)` of the response text -> `spans_to_token_rewards` per row (through the
  tokenizer's offsets), then `list_to_token_rewards` to place the rows in the batch;
- several sources -> `combine_rewards`;
- a user's reward function named in a config -> `load_callable("module:function")`.

Shapes: B batch (responses), T tokens (the padded response axis).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from rlxf.errors import SpecAttributeError, SpecImportError, SpecTypeError, UserError

Unmatched = Literal["raise", "drop"]


RewardOutput = tuple[Tensor, Tensor]
"""(rewards (B, T) float32, mask (B, T) bool): the reward contract."""


class RewardSource(Protocol):
    """Anything called once per batch of responses with the reward contract's arguments (see `rlxf.rewards.sources`)."""

    def __call__(
        self,
        prompt_rows: Sequence[Mapping[str, Any]],
        response_ids: Sequence[Sequence[int]],
        texts: Sequence[str],
        tokenizer: Any,
    ) -> RewardOutput: ...


def _empty_rows(mask: Tensor) -> list[int]:
    return (~mask.any(-1)).nonzero().flatten().tolist()


def scalar_to_token_rewards(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Put each response's scalar score on its last response token (Ziegler et al. 2019, §2; Ouyang et al. 2022).

    Args:
        scores: (B,) one score per response.
        mask: (B, T) bool, True on response tokens. Any layout works (right or left padding, a prompt region before
            the response): the last True of a row receives the score.
    Returns:
        rewards (B, T) in the scores' dtype (float32 for integer scores), 0 everywhere but the last response token;
        and `mask` itself (as bool), so the pair is the reward contract.
    Raises:
        ValueError if a row has no response token (its score would be lost). Checking it reads one bool per row from
        the device, once per rollout.
    """
    mask = mask.bool()
    if scores.shape != mask.shape[:1] or mask.dim() != 2:
        raise ValueError(f"scores must be (B,) and mask (B, T); got {tuple(scores.shape)} and {tuple(mask.shape)}")
    empty = _empty_rows(mask)
    if empty:
        raise ValueError(f"rows {empty} have no response token, so their score has no token to go on")
    dtype = scores.dtype if scores.is_floating_point() else torch.float32
    t = mask.shape[1]
    last = t - 1 - mask.flip(-1).to(torch.uint8).argmax(-1)  # (B,) index of the last True (argmax takes the first max)
    rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    rewards[torch.arange(mask.shape[0], device=mask.device), last] = scores.to(dtype)
    return rewards, mask


def list_to_token_rewards(
    per_token: Sequence[Sequence[float] | Tensor], mask: Tensor, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Place per-token reward lists on the response tokens of a padded batch.

    Args:
        per_token: B lists (or 1-D tensors); row b holds one reward per response token of row b, in order, so its
            length must equal `mask[b].sum()`.
        mask: (B, T) bool, True on response tokens; the i-th reward of row b goes on the i-th True of row b, whatever
            the padding side or prompt region.
        dtype: of the returned rewards.
    Returns:
        rewards (B, T), 0 outside the mask, and `mask` (as bool).
    Raises:
        ValueError naming the rows whose list length differs from their number of response tokens.
    """
    mask = mask.bool()
    if mask.dim() != 2 or len(per_token) != mask.shape[0]:
        raise ValueError(
            f"got {len(per_token)} reward lists for a mask of shape {tuple(mask.shape)}; need one per row"
        )
    counts = mask.sum(-1).tolist()
    rows = [torch.as_tensor(r, dtype=dtype).flatten() for r in per_token]
    bad = [
        f"row {b}: {len(r)} rewards for {n} response tokens"
        for b, (r, n) in enumerate(zip(rows, counts))
        if len(r) != n
    ]
    if bad:
        raise ValueError("reward lists do not match the response tokens: " + "; ".join(bad))
    rewards = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    if rows:
        rewards[mask] = torch.cat(rows).to(mask.device)  # boolean indexing walks row by row, left to right
    return rewards, mask


def spans_to_token_rewards(
    spans: Sequence[tuple[int, int, float]],
    offsets: Sequence[tuple[int, int]] | Tensor,
    length: int,
    unmatched: Unmatched = "raise",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Map character-span rewards of one text to its tokens: each span's reward goes on the LAST token overlapping it.

    That is the token where the segment ends, where fine-grained RLHF puts a segment's reward (Wu et al. 2023,
    "Fine-Grained Human Feedback Gives Better Rewards for Language Model Training", §2.1).

    Args:
        spans: (char_start, char_end, reward) triples; end exclusive, like a Python slice of the text.
        offsets: (n, 2) the tokenizer's (start, end) character offsets per token of the SAME text
            (`return_offsets_mapping=True`), n <= length.
        length: size of the output, e.g. the padded response length; tokens n..length-1 get 0.
        unmatched: what to do with a span that overlaps no token (an empty span, a span past the tokenized text,
            offsets of another text): "raise" (default: a misaligned reward should not vanish silently) or "drop"
            (e.g. when the tokens were truncated and the text was not).
        dtype: of the returned rewards.
    Returns:
        (length,) rewards, on the CPU (the inputs are Python lists or CPU tensors).

    Rules: token i overlaps span [s, e) when start_i < e and end_i > s, so a span that cuts a token in two still lands
    on that token. Tokens with empty offsets (start == end, e.g. special tokens at (0, 0)) never match. Rewards of
    spans ending on the same token add up.
    """
    if unmatched not in ("raise", "drop"):
        raise ValueError(f"unmatched must be 'raise' or 'drop', got {unmatched!r}")
    offs = torch.as_tensor(offsets, dtype=torch.long).reshape(-1, 2)  # (n, 2)
    if offs.shape[0] > length:
        raise ValueError(f"{offs.shape[0]} token offsets do not fit in length={length}")
    rewards = torch.zeros(length, dtype=dtype)
    if not spans:
        return rewards
    bad = [s for s in spans if s[0] > s[1]]
    if bad:
        raise ValueError(f"spans must have start <= end (end exclusive); got {bad}")
    span_t = torch.tensor([(s, e) for s, e, _ in spans], dtype=torch.long)  # (S, 2)
    values = torch.tensor([r for _, _, r in spans], dtype=dtype)  # (S,)
    tok_start, tok_end = offs[:, 0], offs[:, 1]  # (n,)
    overlap = (
        (tok_start[None, :] < span_t[:, 1:2]) & (tok_end[None, :] > span_t[:, 0:1]) & (tok_end > tok_start)[None, :]
    )  # (S, n)
    matched = overlap.any(-1)  # (S,)
    if unmatched == "raise" and not matched.all():
        lost = [spans[i] for i in (~matched).nonzero().flatten().tolist()]
        covered = f"[{int(tok_start.min())}, {int(tok_end.max())})" if offs.numel() else "nothing"
        raise ValueError(
            f"spans {lost} overlap no token (tokens cover characters {covered}); check that spans and offsets refer "
            "to the same text, or pass unmatched='drop' to skip them"
        )
    position = torch.arange(offs.shape[0])  # (n,)
    last = torch.where(overlap, position, -1).amax(-1) if offs.numel() else torch.full((len(spans),), -1)  # (S,)
    rewards.index_add_(0, last[matched], values[matched])  # spans ending on the same token add up
    return rewards


def combine_rewards(weighted: Sequence[tuple[float, Tensor]]) -> Tensor:
    """Weighted sum of reward sources that share one response mask: [(w_1, r_1), ...] -> Σ w_i r_i, each (B, T)."""
    if not weighted:
        raise ValueError("combine_rewards needs at least one (weight, rewards) pair")
    shapes = {tuple(r.shape) for _, r in weighted}
    if len(shapes) != 1:
        raise ValueError(f"reward sources must share one (B, T) shape to be combined; got {sorted(shapes)}")
    total = weighted[0][0] * weighted[0][1]
    for w, r in weighted[1:]:
        total = total + w * r
    return total


def load_callable(spec: str) -> Callable:
    """Import a user's function from "package.module:function" (or "module:Class.method"), as a config names it.

    Raises (all `rlxf.errors.UserError`s, reported by the CLI in one line) a plain UserError for a malformed spec, an
    ImportError if the module or one of its own imports cannot be found, an AttributeError (listing the module's
    public names) if the attribute is missing, a TypeError if it is not callable. Other errors raised while the
    module runs propagate unchanged.
    """
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise UserError(f"expected 'module:function' (e.g. 'my_rewards:score'), got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        missing_is_ours = e.name is not None and (module_name == e.name or module_name.startswith(e.name + "."))
        if missing_is_ours:
            raise SpecImportError(
                f"cannot import module {module_name!r} for {spec!r}: no module named {e.name!r}. Is it installed, or "
                "its directory on PYTHONPATH (run from that directory or `export PYTHONPATH=...`)?"
            ) from e
        # the user's module imports something that is missing: that is the useful part of the error
        raise SpecImportError(f"importing {module_name!r} for {spec!r} failed: {e}") from e
    obj = module
    for i, part in enumerate(attr_path.split(".")):
        if not hasattr(obj, part):
            where = ".".join([module_name, *attr_path.split(".")[:i]])
            public = sorted(n for n in dir(obj) if not n.startswith("_"))
            raise SpecAttributeError(f"{where!r} has no attribute {part!r} (from {spec!r}); it defines: {public}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecTypeError(f"{spec!r} is a {type(obj).__name__}, not a callable")
    return obj


# ---- the contract for sampled responses: masks, character offsets, checks -------------------------------------------


def response_mask(response_ids: Sequence[Sequence[int]]) -> Tensor:
    """(B, T) bool, True on the first len(response_ids[b]) columns of row b; T = the longest response."""
    lengths = torch.tensor([len(r) for r in response_ids], dtype=torch.long)  # (B,)
    t = int(lengths.max()) if len(lengths) else 0
    return torch.arange(t)[None, :] < lengths[:, None]  # (B, T)


def check_batch(prompt_rows: Sequence[Any], response_ids: Sequence[Any], texts: Sequence[Any]) -> None:
    if not (len(prompt_rows) == len(response_ids) == len(texts)):
        raise ValueError(
            f"a reward source needs one prompt row, id list and text per response; got {len(prompt_rows)} rows, "
            f"{len(response_ids)} id lists and {len(texts)} texts"
        )
    empty = [b for b, r in enumerate(response_ids) if len(r) == 0]
    if empty:
        raise ValueError(f"responses {empty} have no token, so their reward has no token to go on")


def scalar_rewards(scores: Sequence[float] | Tensor, response_ids: Sequence[Sequence[int]]) -> RewardOutput:
    """B scores -> the contract: each score on its response's last token."""
    return scalar_to_token_rewards(torch.as_tensor(scores, dtype=torch.float32), response_mask(response_ids))


def token_char_offsets(response_ids: Sequence[int], text: str, tokenizer: Any) -> list[tuple[int, int]]:
    """Character offsets in `text` of each response token, found by decoding growing prefixes of the ids.

    Re-encoding the text with `return_offsets_mapping` is not used: a sampled id sequence need not be the tokenizer's
    own segmentation of its text (the policy may spell "red" as "r"+"ed"), so the re-encoded tokens would not be the
    response tokens. Here token i covers [len(decode(ids[:i])), len(decode(ids[:i+1]))), with decode the one that made
    `text` (`skip_special_tokens=True`), so EOS and other special tokens get an empty span and never match a reward
    span. A token that ends inside a multi-byte character (its prefix decodes to a prefix of `text` followed by U+FFFD)
    covers the complete characters it ends, and the token that completes the character covers that character, so a
    token such as ". " + the first byte of "…" still ends its sentence. O(n) decodes per response.

    Raises ValueError if the ids do not decode to `text`.
    """
    full = tokenizer.decode(list(response_ids), skip_special_tokens=True)
    if full != text:
        raise ValueError(
            f"response ids decode to {full!r}, not to the text {text!r}; pass the texts decoded from these ids "
            "(skip_special_tokens=True)"
        )
    offsets, prev = [], 0
    for i in range(len(response_ids)):
        prefix = tokenizer.decode(list(response_ids[: i + 1]), skip_special_tokens=True)
        if not text.startswith(prefix):
            # The prefix ends inside a multi-byte character, which decodes to U+FFFD: the token covers the complete
            # characters before it, and the token that completes the character covers the character.
            prefix = prefix.rstrip("\ufffd")
        end = len(prefix) if text.startswith(prefix) and len(prefix) >= prev else prev
        offsets.append((prev, end))
        prev = end
    return offsets


def span_rewards(
    spans: Sequence[Sequence[tuple[int, int, float]]],
    response_ids: Sequence[Sequence[int]],
    texts: Sequence[str],
    tokenizer: Any,
) -> RewardOutput:
    """Per-response character spans -> the contract, through `token_char_offsets` and `spans_to_token_rewards`."""
    mask = response_mask(response_ids)
    rows = [
        spans_to_token_rewards([tuple(s) for s in row_spans], token_char_offsets(ids, text, tokenizer), len(ids))
        for row_spans, ids, text in zip(spans, response_ids, texts)
    ]
    return list_to_token_rewards(rows, mask)


def prompt_ids_of(row: Mapping[str, Any], tokenizer: Any) -> list[int]:
    """The ids a scoring model reads before the response: the row's `prompt_ids` when present, else BOS + the
    encoded prompt text (string prompts only)."""
    if "prompt_ids" in row:
        return list(row["prompt_ids"])
    if not isinstance(row["prompt"], str):
        raise ValueError("conversational prompt rows need `prompt_ids` (encode them with encode_prompts)")
    ids = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def check_same_vocab(own_tokenizer: Any, tokenizer: Any, what: str) -> None:
    if own_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"{what} has another tokenizer than the policy; train it from the policy's tokenizer (e.g. from the SFT "
            "model)"
        )
