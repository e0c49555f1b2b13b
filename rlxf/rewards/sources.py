"""Reward sources: the one reward contract (design principle 3) as objects an RL trainer calls once per rollout.

A reward source is called as

    rewards, mask = source(prompt_rows, response_ids, texts, tokenizer)

with B responses: `prompt_rows` the B prompt rows (dicts with `prompt` + metadata such as `gold`; a prompt sampled K
times appears K times; `prompt_ids` is used when present), `response_ids` the B sampled id lists (EOS included when
the response finished), `texts` the B decoded responses (EOS stripped, `skip_special_tokens=True`), `tokenizer` the
policy's tokenizer. It returns `rewards` (B, T) float32 and `mask` (B, T) bool, True on the first
len(response_ids[b]) columns: column t is response token t, T the longest response (right padding). Rewards are 0
outside the mask. A scalar reward sits on the last response token (the EOS when the response finished).

Sources:
- `RewardModelSource(rm_dir)`: a trained reward model (`rlxf.models.reward_model.RewardModel`);
- `DPOImplicitRewardSource(dpo_dir, ref_dir, beta)`: per-token implicit rewards β·(log π_dpo − log π_ref) of a DPO model;
- `FactWorldGoldSource(world_dir, level)`: FactWorld's gold scorer, per sequence or per fact span;
- `CallableSource("module:function")`: a user's function;
- `Seq2SeqRewardSource(rm_dir, variant)` (in `rlxf.rewards.seq2seq`): +α / −β where a seq2seq RM agrees with / diverges
  from the response (`seq2seq:DIR`, docs/methods/seq2seq_rm.md §2.4);
- `WeightedSum([(w, source), ...])`: Σ w_i · rewards_i.
`build_reward_source("0.5*rm:DIR+factworld:DIR:token")` builds them from a config string.

Token alignment (docs/methods/adaptive_segment_reward.md §2.1): every source puts the reward FOR response token y_t in column
t, the column of log π(y_t | x, y_<t): `rm:DIR:token` gives v_t − v_(t−1) with v_t the head after reading y_t,
`dpo:DIR` the log-ratio of y_t itself, `factworld:DIR:token` a fact's reward on the last token of its value.

Shapes: B batch (responses), T tokens (the padded response axis).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from rlxf.data.tokenize import pad
from rlxf.errors import UserError
from rlxf.hf import default_device, load_model, load_tokenizer
from rlxf.rewards.contract import (
    RewardOutput,
    RewardSource,
    check_batch,
    check_same_vocab,
    combine_rewards,
    list_to_token_rewards,
    load_callable,
    prompt_ids_of,
    response_mask,
    scalar_rewards,
    scalar_to_token_rewards,
    span_rewards,
    spans_to_token_rewards,
    token_char_offsets,
)

logger = logging.getLogger(__name__)


class RewardModelSource:
    """Scores prompt + response with a trained reward model (`rlxf rm` output).

    The model reads the prompt's ids (`prompt_ids` of the row, else BOS + the encoded prompt text) followed by the
    response ids exactly as sampled, so it must share the policy's tokenizer (checked on the first call).

    per_token=False: the head at the last response token (the EOS when finished, as the RM was trained) is the reward,
    on that token. per_token=True: the head is read at every response position and token t gets v_t − v_(t−1), with
    v_(−1) the value at the prompt's last token. The increments telescope: they sum to the final reward minus the
    value at the prompt's end, so the sequence total differs from per_token=False by a prompt-only term (which RLOO's
    leave-one-out baseline cancels, since the K samples of a prompt share it).
    """

    def __init__(
        self,
        rm_dir: str | Path,
        per_token: bool = False,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):
        from rlxf.models.reward_model import RewardModel

        self.rm_dir = str(rm_dir)
        self.per_token = per_token
        self.batch_size = batch_size
        self.device = default_device(device)
        self.model = load_model(rm_dir, RewardModel.from_pretrained, "reward model").to(self.device).eval()
        self.model.requires_grad_(False)
        self.rm_tokenizer = load_tokenizer(rm_dir)
        self._checked_tokenizer = False

    def _prompt_ids(self, row: Mapping[str, Any], tokenizer: Any) -> list[int]:
        return prompt_ids_of(row, tokenizer)

    @torch.no_grad()
    def __call__(self, prompt_rows, response_ids, texts, tokenizer) -> RewardOutput:
        check_batch(prompt_rows, response_ids, texts)
        if not self._checked_tokenizer:
            if self.rm_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise UserError(
                    f"the reward model {self.rm_dir} has another tokenizer than the policy; train the RM from the "
                    "policy's tokenizer (e.g. from the SFT model)"
                )
            self._checked_tokenizer = True
        mask = response_mask(response_ids)  # (B, T)
        rewards = torch.zeros(mask.shape, dtype=torch.float32)
        for start in range(0, len(response_ids), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(response_ids)))
            prompts = [self._prompt_ids(prompt_rows[b], tokenizer) for b in rows]
            seqs = [p + list(response_ids[b]) for p, b in zip(prompts, rows)]
            ids, attn = pad(seqs, tokenizer.pad_token_id, side="right")  # (b, L)
            values = self.model(ids.to(self.device), attn.to(self.device)).float().cpu()  # (b, L)
            for i, (b, p) in enumerate(zip(rows, prompts)):
                n = len(response_ids[b])
                if self.per_token:
                    v = values[i, len(p) - 1 : len(p) + n]  # (n + 1,) prompt end, then each response token
                    rewards[b, :n] = v[1:] - v[:-1]
                else:
                    rewards[b, n - 1] = values[i, len(p) + n - 1]
        return rewards, mask


DPO_DEFAULT_BETA = 0.1
"""β of `dpo:DIR` when neither the spec nor the DPO run's config.json gives one (docs/methods/adaptive_segment_reward.md §2.2 (b))."""


def _dpo_run_config(dpo_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """The `rlxf dpo` run config written beside a `final/` model: DIR/../config.json when it holds a `beta`."""
    import json

    path = dpo_dir.resolve().parent / "config.json"
    if not path.is_file():
        return {}, None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}, None
    return (data, path) if isinstance(data, dict) and "beta" in data else ({}, None)


class DPOImplicitRewardSource:
    """Per-token implicit rewards of a DPO model: r_t = β·(log π_dpo(y_t | x, y_<t) − log π_ref(y_t | x, y_<t)).

    DPO's implicit reward of a sequence is β·log π_dpo(y|x)/π_ref(y|x) (Rafailov et al. 2023, eq. 5); its per-token
    terms are the token-level rewards of Rafailov et al. 2024, "From r to Q*" (arXiv 2404.12358, §4), and source (b)
    of rlxf-ASR (docs/methods/adaptive_segment_reward.md §2.2). They sum to the sequence's implicit reward. Column t is token
    y_t (the reward contract).

    `ref_dir` and `beta` default to the DPO run that wrote `dpo_dir`: `rlxf dpo` saves the model in OUT/final and its
    config in OUT/config.json, whose `ref_model` (or else `model`) and `beta` are used. Without that file `beta` is
    0.1 (`DPO_DEFAULT_BETA`) and `ref_dir` must be given. Both models read the prompt's ids (`prompt_ids` of the row,
    else BOS + the encoded prompt text) followed by the response ids, so they must share the policy's tokenizer.
    """

    def __init__(
        self,
        dpo_dir: str | Path,
        ref_dir: str | Path | None = None,
        beta: float | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
    ):

        self.dpo_dir = Path(dpo_dir)
        if not self.dpo_dir.is_dir():
            raise FileNotFoundError(
                f"DPO model directory {dpo_dir} does not exist (dpo:DIR wants `rlxf dpo`'s OUT/final)"
            )
        run, run_path = _dpo_run_config(self.dpo_dir)
        if ref_dir is None:
            named = run.get("ref_model") or run.get("model")
            if not named:
                raise UserError(
                    f"dpo:{dpo_dir} needs its reference model: give it as 'dpo:{dpo_dir}:REF_DIR' (no `rlxf dpo` "
                    f"config.json with `model` / `ref_model` beside {dpo_dir})"
                )
            if not Path(named).is_dir():
                raise FileNotFoundError(
                    f"the reference {named!r} named by {run_path} does not exist from here; give it as "
                    f"'dpo:{dpo_dir}:REF_DIR'"
                )
            ref_dir = named
        self.ref_dir = Path(ref_dir)
        beta_from = "given"
        if beta is None:
            beta, beta_from = float(run.get("beta", DPO_DEFAULT_BETA)), str(run_path or "default")
        if not beta > 0:
            raise UserError(f"the β of dpo:{dpo_dir} must be > 0, got {beta}")
        self.beta = beta
        self.batch_size = batch_size
        self.device = default_device(device)
        self.policy = load_model(self.dpo_dir, what="DPO model").to(self.device).eval()
        self.ref = load_model(self.ref_dir, what="reference model").to(self.device).eval()
        self.policy.requires_grad_(False)
        self.ref.requires_grad_(False)
        self.own_tokenizer = load_tokenizer(self.dpo_dir)
        self._checked_tokenizer = False
        logger.info("dpo token rewards: %s against %s, β=%g (%s)", self.dpo_dir, self.ref_dir, beta, beta_from)

    @torch.no_grad()
    def __call__(self, prompt_rows, response_ids, texts, tokenizer) -> RewardOutput:
        from rlxf.logprobs import token_logprobs

        check_batch(prompt_rows, response_ids, texts)
        if not self._checked_tokenizer:
            check_same_vocab(self.own_tokenizer, tokenizer, f"the DPO model {self.dpo_dir}")
            self._checked_tokenizer = True
        mask = response_mask(response_ids)  # (B, T)
        rewards = torch.zeros(mask.shape, dtype=torch.float32)
        for start in range(0, len(response_ids), self.batch_size):
            rows = range(start, min(start + self.batch_size, len(response_ids)))
            prompts = [prompt_ids_of(prompt_rows[b], tokenizer) for b in rows]
            seqs = [p + list(response_ids[b]) for p, b in zip(prompts, rows)]
            ids, attn = pad(seqs, tokenizer.pad_token_id, side="right")  # (b, L)
            ids, attn = ids.to(self.device), attn.to(self.device)
            labels = ids[:, 1:]  # (b, L-1): position j predicts token j + 1
            logps = [
                token_logprobs(model(input_ids=ids, attention_mask=attn).logits[:, :-1], labels).cpu()
                for model in (self.policy, self.ref)
            ]  # 2 × (b, L-1)
            log_ratio = logps[0] - logps[1]  # (b, L-1)
            for i, (b, p) in enumerate(zip(rows, prompts)):
                n = len(response_ids[b])
                rewards[b, :n] = self.beta * log_ratio[i, len(p) - 1 : len(p) - 1 + n]  # y_t predicted at p + t − 1
        return rewards, mask


class FactWorldGoldSource:
    """FactWorld's gold scorer as a reward (`world.score(prompt_row, text)`).

    level="sequence": the gold score (raw / k) on the last response token. level="token": each judged piece's reward
    (+1 right, −1 wrong, −penalty unrequested; `GoldScore.spans`, the character span of each fact's VALUE) on the
    token where the span ends (`spans_to_token_rewards`), with character offsets from decoding the response ids token
    by token (`token_char_offsets`, not re-encoding the text). The token level omits the score's missing-fact
    penalties (they belong to no token) and the division by k, so its sequence total is `raw + penalty · n_missing`;
    set `missing_on_last=True` to put −MISSING_PENALTY · n_missing on the last token so the total is `raw`.
    """

    def __init__(
        self, world_dir: str | Path, level: Literal["sequence", "token"] = "sequence", missing_on_last: bool = False
    ):
        from rlxf.worlds.factworld import load_factworld

        if level not in ("sequence", "token"):
            raise UserError(f"FactWorld reward level must be 'sequence' or 'token', got {level!r}")
        self.factworld = load_factworld(world_dir)
        self.level = level
        self.missing_on_last = missing_on_last

    def __call__(self, prompt_rows, response_ids, texts, tokenizer) -> RewardOutput:
        from rlxf.worlds.factworld import MISSING_PENALTY

        check_batch(prompt_rows, response_ids, texts)
        golds = [self.factworld.score(row, text) for row, text in zip(prompt_rows, texts)]
        if self.level == "sequence":
            return scalar_rewards([g.score for g in golds], response_ids)
        rewards, mask = span_rewards([g.spans for g in golds], response_ids, texts, tokenizer)
        if self.missing_on_last:
            missing = torch.tensor([-MISSING_PENALTY * g.n_missing for g in golds], dtype=torch.float32)
            rewards = rewards + scalar_to_token_rewards(missing, mask)[0]
        return rewards, mask


def _is_span(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) == 3


class CallableSource:
    """A user's reward function named "module:function", called as `fn(prompt_rows, texts)` once per rollout.

    It returns one item per response, each either
    - a number: the response's reward, on its last token;
    - a list of numbers, one per response TOKEN (len(response_ids[b]), EOS included when finished);
    - a list of (char_start, char_end, reward) spans of the text, end exclusive, each put on the token where its
      span ends (offsets as in `token_char_offsets`). An empty list means no reward.
    Items of one batch may mix these forms.
    """

    def __init__(self, spec: str | Callable[..., Sequence[Any]]):
        self.fn = load_callable(spec) if isinstance(spec, str) else spec
        self.name = spec if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))

    def __call__(self, prompt_rows, response_ids, texts, tokenizer) -> RewardOutput:
        check_batch(prompt_rows, response_ids, texts)
        items = list(self.fn(list(prompt_rows), list(texts)))
        if len(items) != len(texts):
            raise UserError(f"reward function {self.name} returned {len(items)} items for {len(texts)} responses")
        mask = response_mask(response_ids)
        rows = []
        for b, (item, ids, text) in enumerate(zip(items, response_ids, texts)):
            if isinstance(item, (int, float)) or (torch.is_tensor(item) and item.dim() == 0):
                row = torch.zeros(len(ids))
                row[-1] = float(item)
            elif isinstance(item, (list, tuple)) and all(_is_span(s) for s in item):
                row = spans_to_token_rewards(
                    [tuple(s) for s in item], token_char_offsets(ids, text, tokenizer), len(ids)
                )
            elif isinstance(item, (list, tuple)) or torch.is_tensor(item):
                row = torch.as_tensor(item, dtype=torch.float32).flatten()
                if len(row) != len(ids):
                    raise UserError(
                        f"reward function {self.name}, response {b}: {len(row)} token rewards for {len(ids)} "
                        "response tokens (EOS included when finished); return a number or spans instead"
                    )
            else:
                raise TypeError(
                    f"reward function {self.name}, response {b}: got {type(item).__name__}; return a number, a "
                    "list of per-token numbers, or a list of (start, end, reward) spans"
                )
            rows.append(row)
        return list_to_token_rewards(rows, mask)


class WeightedSum:
    """Σ_i w_i · rewards_i of several sources (`combine_rewards`)."""

    def __init__(self, terms: Sequence[tuple[float, RewardSource]]):
        if not terms:
            raise UserError("WeightedSum needs at least one (weight, source) pair")
        self.terms = list(terms)

    def __call__(self, prompt_rows, response_ids, texts, tokenizer) -> RewardOutput:
        outputs = [(w, s(prompt_rows, response_ids, texts, tokenizer)) for w, s in self.terms]
        mask = outputs[0][1][1]
        return combine_rewards([(w, r) for w, (r, _) in outputs]), mask


SPEC_HELP = (
    "a reward spec is one or more terms joined by '+', each '[WEIGHT*]KIND:ARGS' with KIND one of: "
    "'rm:DIR' or 'rm:DIR:token' (reward model, per-token increments), 'factworld:DIR' or 'factworld:DIR:token' "
    "(gold score per sequence or per fact span), 'dpo:DIR[:REF_DIR][:beta=B]' (per-token β·(log π_dpo − log "
    "π_ref) of a DPO model; reference and β default to DIR/../config.json of `rlxf dpo`, else β = 0.1), "
    "'rlaif:MODEL_DIR_OR_URL[?task=helpful&...]' (d-RLAIF: an LLM's expected 1-10 score mapped to [-1, 1]), "
    "'seq2seq:DIR[:variant=A|B|soft][:match_topk=K][:c=C][:alpha=A][:beta=B]' (token rewards of a seq2seq RM "
    "from `rlxf seq2seq-rm`: +alpha where it agrees with the response, -beta where it diverges), "
    "'callable:module:function'. "
    "Example: '0.5*rm:runs/rm/final+factworld:runs/factworld:token'"
)


Device = str | torch.device | None
RewardBuilder = Callable[[str, str, Device], RewardSource]
"""builder(args, term, device): `args` is what follows 'KIND:' in the term, `term` the whole term (for errors)."""


def _split_level(args: str) -> tuple[str, str | None]:
    """'DIR' or 'DIR:token' / 'DIR:sequence' -> (DIR, level or None)."""
    head, _, last = args.rpartition(":")
    return (head, last) if head and last in ("token", "sequence") else (args, None)


def _build_rm(args: str, term: str, device: Device) -> RewardSource:
    path, level = _split_level(args)
    return RewardModelSource(path, per_token=level == "token", device=device)


def _build_factworld(args: str, term: str, device: Device) -> RewardSource:
    path, level = _split_level(args)
    return FactWorldGoldSource(path, level=level or "sequence")


def _build_rlaif(args: str, term: str, device: Device) -> RewardSource:
    from rlxf.rewards.rlaif import DirectScoreSource  # d-RLAIF: an LLM's expected 1-10 score, mapped to [-1, 1]

    return DirectScoreSource.from_spec(args)


def _build_callable(args: str, term: str, device: Device) -> RewardSource:
    return CallableSource(args)


def _build_dpo(args: str, term: str, device: Device) -> RewardSource:
    """'dpo:DIR[:REF_DIR][:beta=B]' -> DPOImplicitRewardSource."""
    paths, beta = [], None
    for part in args.split(":"):
        if part.startswith("beta="):
            try:
                beta = float(part[len("beta=") :])
            except ValueError:
                raise UserError(f"{part!r} in reward term {term!r} is not a number; {SPEC_HELP}") from None
        elif part:
            paths.append(part)
    if not 1 <= len(paths) <= 2:
        raise UserError(f"reward term {term!r}: expected 'dpo:DIR[:REF_DIR][:beta=B]'; {SPEC_HELP}")
    return DPOImplicitRewardSource(paths[0], paths[1] if len(paths) == 2 else None, beta=beta, device=device)


def _build_seq2seq(args: str, term: str, device: Device) -> RewardSource:
    """'seq2seq:DIR[:variant=B][:match_topk=3]...' -> Seq2SeqRewardSource (docs/methods/seq2seq_rm.md §2.4)."""
    from rlxf.rewards.seq2seq import Seq2SeqRewardSource, parse_seq2seq_spec

    path, options = parse_seq2seq_spec(args, term)
    return Seq2SeqRewardSource(path, device=device, **options)


REWARD_KINDS: dict[str, RewardBuilder] = {
    "callable": _build_callable,
    "dpo": _build_dpo,
    "factworld": _build_factworld,
    "rlaif": _build_rlaif,
    "rm": _build_rm,
    "seq2seq": _build_seq2seq,
}
"""The kinds a reward spec may name; `register_reward_kind` adds one."""


def register_reward_kind(kind: str, builder: RewardBuilder) -> None:
    """Make 'KIND:ARGS' terms build `builder(args, term, device)` (a new reward model family, a user's source)."""
    if not kind.isidentifier():
        raise UserError(f"a reward kind must be an identifier, got {kind!r}")
    REWARD_KINDS[kind] = builder


def _build_term(term: str, device: Device) -> RewardSource:
    kind, sep, args = term.partition(":")
    if not sep or not args:
        raise UserError(f"reward term {term!r} has no 'KIND:ARGS'; {SPEC_HELP}")
    if kind not in REWARD_KINDS:
        raise UserError(f"unknown reward kind {kind!r} in {term!r}; choose one of {sorted(REWARD_KINDS)}")
    return REWARD_KINDS[kind](args, term, device)


def source_stats(source: RewardSource) -> dict[str, float]:
    """What a source measured since it was last asked (e.g. `seq2seq/truncated_frac`), for the trainer's log: the
    `pop_stats()` of the source, or of each term of a weighted sum; {} for sources that keep none."""
    if isinstance(source, WeightedSum):
        return {k: v for _, term in source.terms for k, v in source_stats(term).items()}
    pop = getattr(source, "pop_stats", None)
    return pop() if callable(pop) else {}


def build_reward_source(spec: str, device: str | torch.device | None = None) -> RewardSource:
    """Parse a reward spec (see `SPEC_HELP`) into a source; one term without a weight gives that source itself,
    anything else a `WeightedSum`. `device` is where reward models run (default: CUDA when available)."""
    if not spec or not spec.strip():
        raise UserError(f"empty reward spec; {SPEC_HELP}")
    terms: list[tuple[float, RewardSource]] = []
    for raw in spec.split("+"):
        term = raw.strip()
        if not term:
            raise UserError(f"empty term in reward spec {spec!r} (a stray '+'); {SPEC_HELP}")
        weight, star, body = term.partition("*")
        if star:
            try:
                w = float(weight)
            except ValueError:
                raise UserError(f"weight {weight!r} of reward term {term!r} is not a number; {SPEC_HELP}") from None
            terms.append((w, _build_term(body.strip(), device)))
        else:
            terms.append((1.0, _build_term(term, device)))
    if len(terms) == 1 and "*" not in spec:
        return terms[0][1]
    return WeightedSum(terms)
