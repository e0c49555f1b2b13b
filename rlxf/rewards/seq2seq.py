"""Seq2seq reward model (arXiv 2409.00162): token rewards from a causal LM trained to correct responses.

The RM reads `P(x) ++ D1 ++ y ++ D2` and was trained (`rlxf seq2seq-rm`) to write the chosen response + EOS after
it. To score a policy response y it is teacher-forced on y itself in ONE forward pass: ŷ_t = argmax p(· | x, y, y_<t)
for t = 1..T+1 (y_{T+1} = EOS), m_t = 1[ŷ_t == y_t], and the rule `rewards_from_matches` turns the matches into
rewards (docs/methods/seq2seq_rm.md §2.4). Greedy decoding until the first mismatch, then teacher forcing, gives the
same ŷ_t, so no generation is needed.

- `Seq2SeqTemplate`: the delimiters (as text and as ids), T_ref, α, β and the tokenizer's fingerprint, saved in the
  RM's config.json and checked when the RM is loaded (docs/methods/seq2seq_rm.md §6, template drift);
- `rewards_from_matches`: the pure rule (variants A, B, soft);
- `teacher_forced_matches`: the one pass over a batch (left or right padding), giving m_t, p(y_t) and p(ŷ_t);
- `sanity_metrics`: pairwise accuracy, copy rate on chosen, flag rate on rejected (docs/methods/seq2seq_rm.md §2.6);
- `Seq2SeqRewardSource`: the reward source of the spec `seq2seq:DIR[:variant=B][:match_topk=3][:c=5]...`.

Shapes: B batch (responses), T response positions (the padded response axis), L sequence length, V vocab.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from rlxf.errors import UserError

logger = logging.getLogger(__name__)

Variant = Literal["A", "B", "soft"]
VARIANTS = ("A", "B", "soft")

REVIEW_DELIMITER = "\n[RESPONSE TO REVIEW]\n"
"""D1: between the prompt and the response the RM reads (docs/methods/seq2seq_rm.md §2.2)."""
REVISED_DELIMITER = "\n[REVISED RESPONSE]\n"
"""D2: between the response read and the revision the RM writes."""
CONFIG_KEY = "rlxf_seq2seq_rm"
"""The key of the template in the RM's config.json (saved by `save_pretrained` with the weights, so the two never
part)."""


class Seq2SeqTemplateError(UserError):
    """A seq2seq RM whose saved template does not fit the tokenizer or the delimiters it is used with."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the ids of the template: the vocabulary, the special tokens and the chat template."""
    data = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reference_length(chosen_lengths: Sequence[int]) -> float:
    """T_ref: the median token length (EOS excluded) of the chosen responses (docs/methods/seq2seq_rm.md §2.4)."""
    if not chosen_lengths:
        raise UserError("T_ref needs at least one chosen response")
    return float(statistics.median(chosen_lengths))


@dataclass
class Seq2SeqTemplate:
    """The layout `P(x) ++ D1 ++ y_in ++ D2 ++ y_out ++ [eos]` and the reward scale, as saved with the RM."""

    review_delimiter: str
    revised_delimiter: str
    review_ids: list[int]
    """D1 tokenised once (never re-tokenised joined with its neighbours)."""
    revised_ids: list[int]
    eos_id: int
    tokenizer_fingerprint: str
    t_ref: float
    """Median chosen length in the RM's training set; α = 1/T_ref by default."""
    alpha: float
    beta: float
    max_length: int
    """The longest row the RM was trained on; extraction cuts the prompt from the left to fit it."""

    @classmethod
    def for_tokenizer(
        cls,
        tokenizer: Any,
        t_ref: float,
        alpha: float | None = None,
        beta: float = 1.0,
        max_length: int = 1024,
        review_delimiter: str = REVIEW_DELIMITER,
        revised_delimiter: str = REVISED_DELIMITER,
    ) -> Seq2SeqTemplate:
        if tokenizer.eos_token_id is None:
            raise UserError("the seq2seq RM needs a tokenizer with an EOS token (the end of every revision)")
        if not t_ref > 0:
            raise UserError(f"T_ref must be > 0, got {t_ref}")
        return cls(
            review_delimiter=review_delimiter,
            revised_delimiter=revised_delimiter,
            review_ids=tokenizer(review_delimiter, add_special_tokens=False)["input_ids"],
            revised_ids=tokenizer(revised_delimiter, add_special_tokens=False)["input_ids"],
            eos_id=int(tokenizer.eos_token_id),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            t_ref=float(t_ref),
            alpha=float(alpha) if alpha is not None else 1.0 / float(t_ref),
            beta=float(beta),
            max_length=int(max_length),
        )

    def context(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[int]:
        """`P(x) ++ D1 ++ y ++ D2`: what the RM reads before its revision. `response_ids` must hold no EOS."""
        return [*prompt_ids, *self.review_ids, *response_ids, *self.revised_ids]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_config(cls, config: Any, where: str) -> Seq2SeqTemplate:
        saved = getattr(config, CONFIG_KEY, None)
        if not isinstance(saved, dict):
            raise Seq2SeqTemplateError(
                f"{where} is not a seq2seq reward model: its config.json has no {CONFIG_KEY!r} (train one with "
                "`rlxf seq2seq-rm`)"
            )
        try:
            return cls(**saved)
        except TypeError as e:
            raise Seq2SeqTemplateError(f"{where}: the saved {CONFIG_KEY!r} is damaged ({e})") from None

    def check(self, tokenizer: Any, where: str) -> None:
        """The template must tokenise as it did in training: same tokenizer, same delimiter ids, same EOS."""
        if tokenizer_fingerprint(tokenizer) != self.tokenizer_fingerprint:
            raise Seq2SeqTemplateError(
                f"{where} was trained with another tokenizer (fingerprint {self.tokenizer_fingerprint}, this one "
                f"{tokenizer_fingerprint(tokenizer)}): vocabulary, special tokens or chat template differ, so its "
                "predictions would not line up with these ids; train the RM from the policy's SFT checkpoint"
            )
        for name, text, ids in (
            ("review_delimiter", self.review_delimiter, self.review_ids),
            ("revised_delimiter", self.revised_delimiter, self.revised_ids),
        ):
            now = tokenizer(text, add_special_tokens=False)["input_ids"]
            if now != list(ids):
                raise Seq2SeqTemplateError(
                    f"{where}: the {name} {text!r} now tokenises to {now}, but the RM was trained with {list(ids)}; "
                    "the template must not change between training and reward extraction"
                )
        if tokenizer.eos_token_id != self.eos_id:
            raise Seq2SeqTemplateError(
                f"{where}: EOS is {tokenizer.eos_token_id}, the RM was trained with {self.eos_id}"
            )


# ---- the rule (pure) -------------------------------------------------------------------------------------------------


def rewards_from_matches(
    match: Tensor,
    mask: Tensor,
    alpha: float,
    beta: float,
    variant: Variant = "A",
    p_token: Tensor | None = None,
    p_pred: Tensor | None = None,
    c: float = 5.0,
) -> Tensor:
    """Per-token rewards from the RM's agreement with the response (docs/methods/seq2seq_rm.md §2.4).

    Args:
        match: (B, T) bool, m_t = 1[ŷ_t == y_t] (or y_t in the RM's top k) at each scored position.
        mask: (B, T) bool, True on the scored positions (response tokens, EOS included when the policy emitted it).
        alpha, beta: the reward of an agreeing token and the penalty of a diverging one.
        variant: "A" +α before the first divergence k, −β at every mismatch from k on, 0 for a token after k that
            agrees again; "B" +α at every match, −β at every mismatch; "soft" the B layout weighted by confidence,
            +α·p(y_t) at a match and −β·min(1, (log p(ŷ_t) − log p(y_t)) / c) at a mismatch.
        p_token, p_pred: (B, T) the RM's probabilities of y_t and of ŷ_t ("soft" only).
        c: the log-odds gap that earns the full penalty β ("soft").
    Returns:
        (B, T) float32 rewards, 0 outside the mask.
    """
    if variant not in VARIANTS:
        raise UserError(f"seq2seq reward variant {variant!r}: choose one of {list(VARIANTS)}")
    if match.shape != mask.shape:
        raise ValueError(f"match {tuple(match.shape)} and mask {tuple(mask.shape)} must have the same shape")
    mask = mask.bool()
    hit = match.bool() & mask
    miss = ~match.bool() & mask
    if variant == "A":
        before_first_miss = (miss.long().cumsum(-1) == 0) & mask  # t < k
        return alpha * before_first_miss.float() - beta * miss.float()
    if variant == "B":
        return alpha * hit.float() - beta * miss.float()
    if p_token is None or p_pred is None:
        raise ValueError("the soft variant needs p_token and p_pred")
    if not c > 0:
        raise UserError(f"the soft variant's c must be > 0, got {c}")
    tiny = torch.finfo(torch.float32).tiny  # log of a probability that underflowed to 0 stays finite
    gap = (p_pred.float().clamp_min(tiny).log() - p_token.float().clamp_min(tiny).log()) / c
    # The cap at 1 keeps a soft penalty no larger than the hard one (rlxf); a gap is ≥ 0 since ŷ_t is the argmax.
    penalty = gap.clamp(min=0.0, max=1.0)
    return alpha * p_token.float() * hit.float() - beta * penalty * miss.float()


# ---- the one teacher-forced pass -------------------------------------------------------------------------------------


@dataclass
class Matches:
    """What the pass reads at each response position: (B, T) tensors, right-aligned with the response tokens."""

    match: Tensor
    """bool: the response token is the RM's prediction (or in its top k)."""
    mask: Tensor
    """bool: the position is scored."""
    p_token: Tensor
    """float: p(y_t | x, y, y_<t)."""
    p_pred: Tensor
    """float: p(ŷ_t | x, y, y_<t)."""
    prediction: Tensor
    """long: ŷ_t, the argmax."""


def _position_ids(attention_mask: Tensor) -> Tensor:
    # Left padding must not shift positions: each row counts from its first real token.
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.no_grad()
def teacher_forced_matches(
    model: torch.nn.Module,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    pad_id: int,
    match_topk: int = 1,
    padding_side: Literal["left", "right"] = "left",
    need_probs: bool = True,
) -> Matches:
    """One forward pass of `context ++ target[:-1]` per row; position len(context) − 1 + t predicts target[t].

    `targets[b]` are the scored tokens: the response content, plus EOS when the response finished. The input never
    needs the last target (nothing is predicted after it). With left padding every row's targets are its last
    len(target) positions, so only the last max(len(target)) positions go through the LM head (`logits_to_keep`),
    which is what keeps extraction close to a scalar RM's cost (docs/methods/seq2seq_rm.md §6, compute).
    `need_probs=False` skips p(y_t) and p(ŷ_t) (a softmax over the vocabulary; only the soft variant reads them) and
    leaves them 0.
    """
    if match_topk < 1:
        raise UserError(f"match_topk must be ≥ 1, got {match_topk}")
    device = next(model.parameters()).device
    b = len(contexts)
    lengths = [len(t) for t in targets]
    t_max = max(lengths)
    inputs = [list(ctx) + list(tgt[:-1]) for ctx, tgt in zip(contexts, targets)]
    width = max(len(s) for s in inputs)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    for i, seq in enumerate(inputs):
        if padding_side == "left":
            ids[i, width - len(seq) :], attn[i, width - len(seq) :] = torch.tensor(seq), 1
        else:
            ids[i, : len(seq)], attn[i, : len(seq)] = torch.tensor(seq), 1
    ids, attn = ids.to(device), attn.to(device)
    kwargs = {"input_ids": ids, "attention_mask": attn, "position_ids": _position_ids(attn)}
    if padding_side == "left":
        logits = model(**kwargs, logits_to_keep=t_max).logits  # (B, t_max, V): the last t_max positions
        # row i's target t sits at column t_max − len(target_i) + t of the kept positions
        cols = torch.arange(t_max)[None, :] + (t_max - torch.tensor(lengths))[:, None]  # (B, t_max)
    else:
        logits = model(**kwargs).logits  # (B, width, V)
        cols = torch.arange(t_max)[None, :] + torch.tensor([len(c) - 1 for c in contexts])[:, None]  # (B, t_max)
    mask = torch.arange(t_max)[None, :] < torch.tensor(lengths)[:, None]  # (B, t_max)
    cols = torch.where(mask, cols, 0).clamp(0, logits.shape[1] - 1).to(device)
    target = torch.zeros((b, t_max), dtype=torch.long)
    for i, tgt in enumerate(targets):
        target[i, : len(tgt)] = torch.tensor(list(tgt))
    target = target.to(device)
    # Reductions over V run on the kept logits (B, K, V) in place; only their (B, K) results are re-indexed to the
    # targets' columns, never the (B, K, V) logits themselves (a copy of them cost as much as the LM head on CPU).
    target_on_kept = torch.zeros(logits.shape[:2], dtype=torch.long, device=device).scatter(1, cols, target)
    prediction = logits.argmax(-1).gather(1, cols)  # (B, t_max); argmax, as greedy decoding picks, also for ties
    if match_topk == 1:
        match = prediction == target
    else:
        top = logits.topk(min(match_topk, logits.shape[-1]), dim=-1).indices  # (B, K, k)
        match = (top.gather(1, cols[:, :, None].expand(-1, -1, top.shape[-1])) == target[:, :, None]).any(-1)
    p_token = p_pred = torch.zeros((b, t_max))
    if need_probs:
        log_z = logits.float().logsumexp(-1)  # (B, K)
        target_logit = logits.gather(-1, target_on_kept[:, :, None]).squeeze(-1).float()  # (B, K)
        best_logit = logits.amax(-1).float()  # (B, K)
        p_token = (target_logit - log_z).exp().gather(1, cols).cpu() * mask
        p_pred = (best_logit - log_z).exp().gather(1, cols).cpu() * mask
    return Matches(
        match=(match.cpu() & mask),
        mask=mask,
        p_token=p_token,
        p_pred=p_pred,
        prediction=torch.where(mask, prediction.cpu(), -1),
    )


# ---- the frozen RM as a reward source --------------------------------------------------------------------------------


def load_seq2seq_rm(rm_dir: str | Path, device: Any = None) -> tuple[torch.nn.Module, Any, Seq2SeqTemplate]:
    """The RM, its tokenizer and its template, checked against each other (a changed tokenizer or delimiter fails)."""
    from rlxf.hf import default_device, load_model, load_tokenizer

    where = f"seq2seq RM {rm_dir}"
    tokenizer = load_tokenizer(rm_dir)
    model = load_model(rm_dir, what="seq2seq reward model", tokenizer=tokenizer)
    template = Seq2SeqTemplate.from_config(model.config, where)
    template.check(tokenizer, where)
    model = model.to(default_device(device)).eval()
    model.requires_grad_(False)
    return model, tokenizer, template


def strip_eos(response_ids: Sequence[int], eos_id: int) -> tuple[list[int], bool]:
    """(the content ids, whether the response finished with EOS)."""
    ids = list(response_ids)
    return (ids[:-1], True) if ids and ids[-1] == eos_id else (ids, False)


class Seq2SeqRewardSource:
    """Token rewards of a frozen seq2seq RM (`rlxf seq2seq-rm` output), on the policy's own token ids.

    The RM reads the prompt's ids (`prompt_ids` of the row, else BOS + the encoded prompt text), D1, the response's
    content ids, D2, and is teacher-forced on the response again: column t of the reward is response token t, EOS
    included when the response finished (EOS is always scored). A response cut at max_new_tokens has no EOS action:
    its tokens 1..T are scored and `truncated_frac` counts such responses (`pop_stats`). α and β default to the
    RM's saved α = 1/T_ref and β = 1. The policy's tokenizer must be the RM's (checked on the first call).
    """

    def __init__(
        self,
        rm_dir: str | Path,
        variant: Variant = "A",
        match_topk: int = 1,
        c: float = 5.0,
        alpha: float | None = None,
        beta: float | None = None,
        device: Any = None,
        batch_size: int = 32,
        padding_side: Literal["left", "right"] = "left",
    ):
        if variant not in VARIANTS:
            raise UserError(f"seq2seq reward variant {variant!r}: choose one of {list(VARIANTS)}")
        if match_topk < 1:
            raise UserError(f"match_topk must be ≥ 1, got {match_topk}")
        self.rm_dir = str(rm_dir)
        self.model, self.rm_tokenizer, self.template = load_seq2seq_rm(rm_dir, device)
        self.variant, self.match_topk, self.c = variant, match_topk, c
        self.alpha = self.template.alpha if alpha is None else alpha
        self.beta = self.template.beta if beta is None else beta
        self.batch_size, self.padding_side = batch_size, padding_side
        self._checked_tokenizer = False
        self._stats: dict[str, float] = {}
        logger.info(
            "seq2seq token rewards: %s, variant %s, α=%.4g β=%.4g, top-%d", rm_dir, variant, self.alpha, self.beta,
            match_topk,
        )  # fmt: skip

    def matches(self, prompt_rows, response_ids, tokenizer) -> Matches:
        """The one pass over the batch (in chunks of batch_size), on the (B, T) grid of the reward contract."""
        from rlxf.data.tokenize import truncate_prompt
        from rlxf.rewards.contract import prompt_ids_of

        if not self._checked_tokenizer:
            self.template.check(tokenizer, f"the policy's tokenizer against seq2seq RM {self.rm_dir}")
            self._checked_tokenizer = True
        t = max(len(r) for r in response_ids)
        parts: list[Matches] = []
        for start in range(0, len(response_ids), self.batch_size):
            contexts, targets = [], []
            for row, ids in zip(
                prompt_rows[start : start + self.batch_size], response_ids[start : start + self.batch_size]
            ):
                content, _ = strip_eos(ids, self.template.eos_id)
                prompt = prompt_ids_of(row, tokenizer)
                rest = len(self.template.context([], content)) + len(content)
                keep_first = 1 if prompt[:1] == [tokenizer.bos_token_id] else 0
                # the prompt is cut from the left, as in training; a response too long for the RM keeps BOS only
                prompt = truncate_prompt(prompt, rest, max_length=self.template.max_length, keep_first=keep_first)
                prompt = prompt if prompt is not None else list(prompt_ids_of(row, tokenizer))[:keep_first]
                contexts.append(self.template.context(prompt, content))
                targets.append(list(ids))  # content + EOS when finished: exactly the scored tokens
            m = teacher_forced_matches(
                self.model, contexts, targets, tokenizer.pad_token_id, self.match_topk, self.padding_side,
                need_probs=self.variant == "soft",
            )  # fmt: skip
            parts.append(m)
        grid = {}
        for name in ("match", "mask", "p_token", "p_pred", "prediction"):
            tensors = [getattr(p, name) for p in parts]
            fill = -1 if name == "prediction" else 0
            grid[name] = torch.cat([torch.nn.functional.pad(x, (0, t - x.shape[1]), value=fill) for x in tensors])
        return Matches(**grid)

    def __call__(self, prompt_rows, response_ids, texts, tokenizer) -> tuple[Tensor, Tensor]:
        from rlxf.rewards.contract import check_batch

        check_batch(prompt_rows, response_ids, texts)
        m = self.matches(prompt_rows, response_ids, tokenizer)
        rewards = rewards_from_matches(
            m.match, m.mask, self.alpha, self.beta, self.variant, m.p_token, m.p_pred, self.c
        )
        truncated = [not strip_eos(ids, self.template.eos_id)[1] for ids in response_ids]
        n = float(len(response_ids))
        self._add_stats(
            {
                "seq2seq/truncated_frac": sum(truncated) / n,
                "seq2seq/match_rate": float(m.match.sum() / m.mask.sum()),
                "seq2seq/reward_sum": float(rewards.sum() / n),
            },
            n,
        )
        return rewards, m.mask

    def _add_stats(self, stats: Mapping[str, float], weight: float) -> None:
        self._stats["_n"] = self._stats.get("_n", 0.0) + weight
        for k, v in stats.items():
            self._stats[k] = self._stats.get(k, 0.0) + v * weight

    def pop_stats(self) -> dict[str, float]:
        """Means over the responses scored since the last call (e.g. one rollout), then reset."""
        n = self._stats.pop("_n", 0.0)
        out = {k: v / n for k, v in self._stats.items()} if n else {}
        self._stats = {}
        return out


# ---- sanity metrics (docs/methods/seq2seq_rm.md §2.6) --------------------------------------------------------------


@torch.no_grad()
def sanity_metrics(
    model: torch.nn.Module,
    template: Seq2SeqTemplate,
    pairs: Sequence[Mapping[str, Any]],
    pad_id: int,
    batch_size: int = 16,
    variant: Variant = "A",
    match_topk: int = 1,
) -> dict[str, float]:
    """Pairwise accuracy with R(y) = Σ_t r_t, copy rate on chosen, flag rate on rejected and the flag-rate gap.

    `pairs` are encoded preference rows (`prompt_ids`, `chosen_ids`, `rejected_ids`, each response ending with EOS).
    A tie R(y_w) == R(y_l) counts as half a correct pair.
    """
    was_training = model.training
    model.eval()
    correct = copied = flagged_chosen = flagged_rejected = chosen_n = rejected_n = 0.0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        contexts, targets = [], []
        for side in ("chosen_ids", "rejected_ids"):
            for row in chunk:
                content, _ = strip_eos(row[side], template.eos_id)
                contexts.append(template.context(row["prompt_ids"], content))
                targets.append([*content, template.eos_id])
        m = teacher_forced_matches(model, contexts, targets, pad_id, match_topk, need_probs=variant == "soft")
        r = rewards_from_matches(m.match, m.mask, template.alpha, template.beta, variant, m.p_token, m.p_pred)
        totals = r.sum(-1)
        n = len(chunk)
        correct += float((totals[:n] > totals[n:]).sum() + 0.5 * (totals[:n] == totals[n:]).sum())
        copied += float(m.match[:n].sum())
        chosen_n += float(m.mask[:n].sum())
        flagged_chosen += float((m.mask[:n] & ~m.match[:n]).sum())
        flagged_rejected += float((m.mask[n:] & ~m.match[n:]).sum())
        rejected_n += float(m.mask[n:].sum())
    model.train(was_training)
    flag_chosen = flagged_chosen / max(chosen_n, 1.0)
    flag_rejected = flagged_rejected / max(rejected_n, 1.0)
    return {
        "pairwise_accuracy": correct / max(len(pairs), 1),
        "copy_rate_chosen": copied / max(chosen_n, 1.0),
        "flag_rate_chosen": flag_chosen,
        "flag_rate_rejected": flag_rejected,
        "flag_rate_gap": flag_rejected - flag_chosen,
    }


def oriented_pairs(rows: list[dict[str, Any]], eos_id: int, use_label_prob: bool) -> tuple[list[dict], dict]:
    """Encoded preference rows -> {prompt_ids, chosen, rejected} (content ids, no EOS), the preferred one as
    `chosen`; counts of swapped rows and of skipped rows (identical responses, label_prob == 0.5)."""
    out, counts = [], {"swapped": 0, "identical": 0, "no_preference": 0}
    for row in rows:
        chosen, _ = strip_eos(row["chosen_ids"], eos_id)
        rejected, _ = strip_eos(row["rejected_ids"], eos_id)
        p = row.get("label_prob") if use_label_prob else None
        if p is not None and p == 0.5:
            counts["no_preference"] += 1
            continue
        if p is not None and p < 0.5:
            chosen, rejected = rejected, chosen
            counts["swapped"] += 1
        if chosen == rejected:  # no correction to learn (compared as ids, after tokenisation)
            counts["identical"] += 1
            continue
        out.append({"prompt_ids": list(row["prompt_ids"]), "chosen": chosen, "rejected": rejected})
    return out, counts


def as_encoded_pairs(pairs: list[dict[str, Any]], eos_id: int) -> list[dict[str, Any]]:
    """Oriented pairs in the layout `sanity_metrics` reads (responses ending with EOS)."""
    return [
        {"prompt_ids": p["prompt_ids"], "chosen_ids": [*p["chosen"], eos_id], "rejected_ids": [*p["rejected"], eos_id]}
        for p in pairs
    ]


def parse_seq2seq_spec(args: str, term: str) -> tuple[str, dict[str, Any]]:
    """'DIR[:variant=B][:match_topk=3][:c=5][:alpha=A][:beta=B]' -> (DIR, keyword options)."""
    path_parts, options = [], {}
    casts = {"variant": str, "match_topk": int, "c": float, "alpha": float, "beta": float, "batch_size": int}
    for part in args.split(":"):
        name, eq, value = part.partition("=")
        if eq and name in casts:
            try:
                options[name] = casts[name](value)
            except ValueError:
                raise UserError(f"{part!r} in reward term {term!r} is not a {casts[name].__name__}") from None
        elif eq:
            raise UserError(f"unknown option {name!r} in reward term {term!r}; options: {sorted(casts)}")
        else:
            path_parts.append(part)
    if not path_parts or not "".join(path_parts):
        raise UserError(f"reward term {term!r}: expected 'seq2seq:DIR[:variant=A|B|soft][:match_topk=K]'")
    return ":".join(path_parts), options
