"""`rlxf eval`: compare policies on held-out prompts, against a gold world or on any data.

With `--world` (a FactWorld directory), for each policy: gold win rate against a baseline policy (ties count half,
with a 95% confidence interval), the gold score, hallucination rate, retain accuracy, mean length, and the KL to a
reference model; the pairwise accuracy of a reward model when one is given.

Without a world, on any prompts file and any preference file (every format the loaders read), gold metrics are simply
absent and these remain:
- `--reward_model DIR --pairs_file F`: the reward model's pairwise accuracy on the pairs (ties ½), with a 95% interval
  and the number of pairs (no policy needed);
- `--policies A,B --prompts_file F --reward_model DIR`: the mean reward-model score of each policy's sampled responses
  (sd and 95% interval), with the length and the KL to the reference;
- `--judge SPEC`: the win rate of each policy against the baseline (the first policy) judged by a reward model
  (`rm:DIR`), an AI labeller (`openai:URL[:MODEL]`, `local:DIR`; `rlxf label`'s prompt, both orders, soft labels
  from the log-probs of "1" / "2") or a Python function (`callable:module:function`). Ties (P = ½ exactly, equal RM
  scores) count ½; the interval is the one of the gold win rate (`win_rate_with_ci`).
Every policy samples its responses with the same settings and seed, so policies answer the same prompts.
Writes `eval.json`, `eval.md`, the sampled responses and, with a judge, every judgement (`judge_<name>.jsonl`).

Shapes: B responses, T response tokens, V vocab.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlxf.config import check_ranges
from rlxf.data.formats import load_preferences, load_prompts
from rlxf.data.tokenize import encode_preferences, encode_prompts, encode_sft, pad
from rlxf.errors import UserError
from rlxf.hf import default_device, load_model, load_policy
from rlxf.sampling import GenerationSettings, sample_responses

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    policies: list[str] = field(default_factory=list)
    """Policy directories to evaluate, comma-separated (not needed for the reward-model accuracy alone)."""
    names: list[str] = field(default_factory=list)
    """Display names of the policies, comma-separated (default: directory names)."""
    baseline: str = ""
    """Policy directory the win rates are measured against (default: the first policy)."""
    reference: str = ""
    """Reference model for the KL (default: the baseline)."""
    world: str = ""
    """FactWorld directory: the gold scorer (gold win rate, gold score, hallucination, retain, ...). Optional: without
    it, give --prompts_file for the policies, and the gold metrics are absent."""
    prompts_file: str = ""
    """Held-out prompts, any format `load_prompts` reads (default with --world: <world>/prompts_test.jsonl)."""
    reward_model: str = ""
    """Reward-model directory: its pairwise accuracy on `pairs_file` is reported, and (see `rm_score`) the mean score
    it gives each policy's responses."""
    pairs_file: str = ""
    """Preference pairs (prompt / chosen / rejected, any format `load_preferences` reads) for the reward-model
    accuracy (default with --world: <world>/preferences_test.jsonl)."""
    seq2seq_rm: str = ""
    """Seq2seq reward-model directory (`rlxf seq2seq-rm`): its sanity metrics on `pairs_file` (pairwise accuracy
    with R(y) = Σ_t r_t, copy rate on chosen, flag rates on chosen and rejected, the flag-rate gap)."""
    rm_score: bool | None = None
    """Score every policy's responses with --reward_model (mean, sd, 95% interval). None = on without --world, off
    with --world (which keeps the gold evaluation as it was)."""
    judge: str = ""
    """Win rate against the baseline judged by: 'rm:DIR' (a reward model: the higher score wins), 'openai:URL[:MODEL]'
    (an OpenAI-compatible server, e.g. openai:http://127.0.0.1:8000/v1:judge), 'local:DIR' (a labeller model in this
    process), or 'callable:module:function' (fn(prompt_rows, responses_a, responses_b) -> P(a ≻ b) per pair). AI
    judges take '?key=value&...' options: BackendConfig fields (api, batch_size, max_concurrency, timeout, ...) and
    task (default helpful), preamble, preamble_file, cot (default false), top_k, missing, combine, max_prompt_tokens,
    rationale_max_tokens, cache (an SQLite file, to resume)."""
    out: str = "runs/eval"
    """Output directory for eval.json, eval.md and the sampled responses."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt and policy; more lowers the variance of every metric."""
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(temperature=1.0))
    """Decoding settings. Temperature 1 samples the policy itself, which is what the KL estimate assumes."""
    max_prompt_length: int = 192
    """Longest prompt in tokens."""
    seed: int = 0
    """Seed of the sampling (the same for every policy)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"samples_per_prompt": ">=1", "max_prompt_length": ">=1", "seed": ">=0"})


def win_rate_with_ci(outcomes: list[float]) -> tuple[float, float, float]:
    """Mean of win (1) / tie (0.5) / loss (0) outcomes and a normal-approximation 95% interval."""
    n = len(outcomes)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    mean = sum(outcomes) / n
    var = sum((x - mean) ** 2 for x in outcomes) / max(n - 1, 1)
    half = 1.96 * math.sqrt(var / n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def mean_with_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd and the normal-approximation 95% interval mean ± 1.96 sd / √n (unbounded)."""
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in values) / max(n - 1, 1))
    half = 1.96 * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def outcome(p_win: float) -> float:
    """A judgement P(a ≻ b) as a win (1), tie (½, P = ½ exactly) or loss (0); NaN stays NaN (no valid judgement)."""
    if math.isnan(p_win):
        return math.nan
    return 1.0 if p_win > 0.5 else 0.5 if p_win == 0.5 else 0.0


@torch.no_grad()
def sequence_kl(
    policy: torch.nn.Module,
    reference: torch.nn.Module,
    prompt_ids: list[list[int]],
    response_ids: list[list[int]],
    pad_id: int,
    batch_size: int = 16,
) -> list[float]:
    """Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)) along each response, summed over the full vocabulary.

    Along responses sampled from π this is an unbiased estimate of KL(π ‖ π_ref) with lower variance than the
    sampled log-ratio, because each position's expectation over the next token is computed exactly.
    """
    device = next(policy.parameters()).device
    out: list[float] = []
    for i in range(0, len(prompt_ids), batch_size):
        seqs = [p + r for p, r in zip(prompt_ids[i : i + batch_size], response_ids[i : i + batch_size])]
        masks = [
            [0] * len(p) + [1] * len(r)
            for p, r in zip(prompt_ids[i : i + batch_size], response_ids[i : i + batch_size])
        ]
        ids, attention = pad(seqs, pad_id, side="right")
        response_mask, _ = pad(masks, 0, side="right")
        ids, attention, response_mask = ids.to(device), attention.to(device), response_mask.to(device)
        logp = policy(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
        logq = reference(input_ids=ids, attention_mask=attention).logits[:, :-1].float().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)  # (B, T-1): position t predicts token t + 1
        out.extend((kl * response_mask[:, 1:]).sum(-1).tolist())
    return out


# --- reward models ---------------------------------------------------------------------------------------------------


class RewardModelScorer:
    """A reward model and its tokenizer, reading prompt + response *texts* encoded as the RM was trained (the RM's
    tokenizer and chat template, EOS after the response), so it need not share the policy's tokenizer."""

    def __init__(self, rm_dir: str, batch_size: int = 32):
        from rlxf.hf import load_tokenizer
        from rlxf.models.reward_model import RewardModel

        self.rm_dir = rm_dir
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(rm_dir)
        self.device = default_device()
        self.model = load_model(rm_dir, RewardModel.from_pretrained, "reward model", tokenizer=self.tokenizer)
        self.model = self.model.to(self.device).eval()
        self._memo: dict[tuple[str, str, int | None], float] = {}

    @torch.no_grad()
    def score(
        self, prompts: Sequence[Any], responses: Sequence[str], max_prompt_length: int | None = None
    ) -> list[float]:
        """The reward of each (prompt, response): the head at the response's last token (its EOS). A response to a
        chat prompt (message list) is read as the assistant's turn, through the chat template."""
        keys = [(json.dumps(p), r, max_prompt_length) for p, r in zip(prompts, responses)]
        todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
        rows = []
        for prompt_json, response, _ in todo:
            prompt = json.loads(prompt_json)
            completion = [{"role": "assistant", "content": response}] if isinstance(prompt, list) else response
            rows.append({"prompt": prompt, "completion": completion})
        encoded = encode_sft(rows, self.tokenizer, max_prompt_length=max_prompt_length)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for i in range(0, len(encoded), self.batch_size):
            ids, attention = pad([r["input_ids"] for r in encoded[i : i + self.batch_size]], pad_id, side="right")
            rewards = self.model.sequence_rewards(ids.to(self.device), attention.to(self.device)).float().tolist()
            self._memo.update(zip(todo[i : i + self.batch_size], rewards))
        return [self._memo[k] for k in keys]

    @torch.no_grad()
    def pair_outcomes(self, pairs_file: str, rejected_path: str | Path | None = None) -> list[float]:
        """1 / ½ / 0 per preference pair of `pairs_file` (chosen scored above / equal to / below rejected)."""
        from rlxf.losses import pairwise_accuracy
        from rlxf.models.reward_model import collate_pairs, pair_rewards

        rows = load_preferences(pairs_file, on_bad_row="skip", rejected_path=rejected_path)
        rows = encode_preferences(rows, self.tokenizer, on_bad_row="skip", rejected_path=rejected_path)
        out: list[float] = []
        for i in range(0, len(rows), self.batch_size):
            batch = collate_pairs(rows[i : i + self.batch_size], self.tokenizer.pad_token_id, False, False)
            batch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            chosen, rejected = pair_rewards(self.model, batch)
            out.extend(pairwise_accuracy(chosen, rejected, reduction="none").tolist())
        return out


def reward_model_pairwise(rm_dir: str, pairs_file: str, rejected_path: str | Path | None = None) -> dict[str, Any]:
    """Pairwise accuracy of a reward model on a preference file (ties ½) with its 95% interval and the pair count."""
    outcomes = RewardModelScorer(rm_dir).pair_outcomes(pairs_file, rejected_path)
    acc, lo, hi = win_rate_with_ci(outcomes)
    return {"accuracy": acc, "ci_low": lo, "ci_high": hi, "n_pairs": len(outcomes), "pairs_file": str(pairs_file)}


def reward_model_accuracy(rm_dir: str, pairs_file: str, batch_size: int = 32) -> float:
    """Pairwise accuracy (ties ½) of a reward model on a preference file."""
    return reward_model_pairwise(rm_dir, pairs_file)["accuracy"]


# --- judges ----------------------------------------------------------------------------------------------------------

JUDGE_HELP = (
    "--judge is 'rm:DIR', 'openai:URL[:MODEL][?options]' (e.g. openai:http://127.0.0.1:8000/v1:judge), "
    "'local:DIR[?options]' or 'callable:module:function'"
)
# ALGO LOGIC: URL = scheme://host[:port][/path without ':'], then an optional ':MODEL' (which may hold '/')
_OPENAI_TARGET = re.compile(r"^(https?://[^/:?]+(?::\d+)?(?:/[^:]*)?)(?::(.+))?$")
_LABEL_OPTIONS = (
    "task",
    "preamble",
    "preamble_file",
    "preamble_invert",
    "cot",
    "top_k",
    "missing",
    "combine",
    "max_prompt_tokens",
    "rationale_max_tokens",
)


class Judge:
    """Judges (prompt, a, b) and returns P(a ≻ b) per pair (NaN = no valid judgement). `name` is for reports."""

    name: str

    def __call__(self, prompts: Sequence[Any], a: Sequence[str], b: Sequence[str]) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RewardModelJudge(Judge):
    """The response with the higher reward wins; equal rewards are a tie (½)."""

    def __init__(self, scorer: RewardModelScorer, max_prompt_length: int | None = None):
        self.name = f"rm:{scorer.rm_dir}"
        self.scorer = scorer
        self.max_prompt_length = max_prompt_length

    def __call__(self, prompts, a, b):
        ra = self.scorer.score(prompts, a, self.max_prompt_length)
        rb = self.scorer.score(prompts, b, self.max_prompt_length)
        return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(ra, rb)]


class CallableJudge(Judge):
    """A user's function `fn(prompt_rows, responses_a, responses_b)` returning P(a ≻ b) in [0, 1] per pair."""

    def __init__(self, spec: str | Callable[..., Sequence[float]]):
        from rlxf.rewards.contract import load_callable

        self.fn = load_callable(spec) if isinstance(spec, str) else spec
        self.name = f"callable:{spec}" if isinstance(spec, str) else getattr(spec, "__name__", repr(spec))

    def __call__(self, prompts, a, b):
        out = [float(p) for p in self.fn(list(prompts), list(a), list(b))]
        if len(out) != len(a):
            raise UserError(f"judge {self.name} returned {len(out)} values for {len(a)} pairs")
        bad = [p for p in out if not (0.0 <= p <= 1.0)]  # NaN fails too
        if bad:
            raise UserError(f"judge {self.name} must return P(a ≻ b) in [0, 1] per pair; got {bad[0]}")
        return out


class LabellerJudge(Judge):
    """An AI labeller through `rlxf label`'s machinery (`rlxf.feedback.label.PairwiseLabeler`): the labelling prompt,
    both orders (position bias removed), soft labels from the log-probs of "1" / "2"."""

    def __init__(self, backend_cfg: Any, label_cfg: Any, cache_path: str = ""):
        from rlxf.backends import build_backend
        from rlxf.backends.cache import JudgementCache
        from rlxf.feedback.label import PairwiseLabeler, build_template, template_id

        template = build_template(label_cfg)
        self.backend = build_backend(backend_cfg, max_context=label_cfg.max_prompt_tokens)
        self.cache = JudgementCache(Path(cache_path)) if cache_path else None
        try:
            self.labeler = PairwiseLabeler(
                self.backend,
                template,
                cache=self.cache,
                k=label_cfg.top_k,
                missing=label_cfg.missing,
                combine=label_cfg.combine,
                rationale_max_tokens=label_cfg.rationale_max_tokens,
            )
        except BaseException:
            self.close()
            raise
        self.name = f"{self.backend.kind}:{self.backend.model_id} ({template_id(template)})"

    def __call__(self, prompts, a, b):
        from rlxf.feedback.label import as_text

        triples = [
            (as_text(p).strip(), as_text(x, True).strip(), as_text(y, True).strip()) for p, x, y in zip(prompts, a, b)
        ]
        return [j.p_a if j.valid else math.nan for j in self.labeler.label(triples)]

    def close(self) -> None:
        self.backend.close()
        if self.cache is not None:
            self.cache.close()


def parse_judge(
    spec: str,
    max_prompt_length: int | None = None,
    scorer: Callable[[str], RewardModelScorer] = RewardModelScorer,
) -> Callable[[], Judge]:
    """Check a judge spec (see `EvalConfig.judge`) and return what builds the judge: models load only when it is
    called. `scorer(rm_dir)` gives the reward model of an 'rm:' judge (e.g. one already loaded)."""
    from rlxf.backends import parse_backend_spec
    from rlxf.config import from_dict
    from rlxf.feedback.label import LabelConfig, build_template

    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise UserError(f"bad judge {spec!r}; {JUDGE_HELP}")
    if kind == "rm":
        return lambda: RewardModelJudge(scorer(rest), max_prompt_length)
    if kind == "callable":
        return lambda: CallableJudge(rest)
    if kind not in ("openai", "local"):
        raise UserError(f"unknown judge kind {kind!r} in {spec!r}; {JUDGE_HELP}")
    target, _, query = rest.partition("?")
    model = ""
    if kind == "openai":
        match = _OPENAI_TARGET.match(target)
        if match is None:
            raise UserError(f"judge {spec!r}: expected an http(s) URL after 'openai:'; {JUDGE_HELP}")
        target, model = match.group(1), match.group(2) or ""
    elif target.startswith(("http://", "https://")):
        raise UserError(f"judge {spec!r}: a server is 'openai:URL[:MODEL]'; 'local:' takes a model directory")
    backend_cfg, opts = parse_backend_spec(
        target + (f"?{query}" if query else ""), extra_keys=(*_LABEL_OPTIONS, "cache")
    )
    if model:
        backend_cfg.model = model
    cache = opts.pop("cache", "")
    label_cfg = from_dict(LabelConfig, {"task": "helpful", "cot": "false"} | opts, where=f"judge {spec!r}")
    build_template(label_cfg)  # a bad preamble file or option fails now, not after the sampling
    return lambda: LabellerJudge(backend_cfg, label_cfg, cache)


def judge_outcomes(
    judge: Judge, prompts: Sequence[Any], policy: Sequence[str], baseline: Sequence[str]
) -> list[float]:
    """P(policy ≻ baseline) per pair; identical responses are a tie (½) without asking the judge."""
    ask = [i for i, (a, b) in enumerate(zip(policy, baseline)) if a != b]
    p = [0.5] * len(policy)
    if ask:
        for i, value in zip(
            ask, judge([prompts[i] for i in ask], [policy[i] for i in ask], [baseline[i] for i in ask])
        ):
            p[i] = value
    return p


# --- the stage -------------------------------------------------------------------------------------------------------


def _check(cfg: EvalConfig) -> None:
    if not cfg.policies and not cfg.reward_model and not cfg.seq2seq_rm:
        raise UserError(
            "nothing to evaluate: give --policies A,B (with --world W or --prompts_file F), and/or --reward_model DIR "
            "with --pairs_file F (or --world W) for its pairwise accuracy"
        )
    if cfg.policies and not cfg.world and not cfg.prompts_file:
        raise UserError("--policies need prompts: give --prompts_file F (any prompts file) or --world W")
    if not cfg.policies and cfg.judge:
        raise UserError("--judge compares policies: give --policies BASELINE,POLICY,... and --prompts_file F")
    if not cfg.policies and cfg.reward_model and not (cfg.pairs_file or cfg.world):
        raise UserError("--reward_model alone needs --pairs_file F (preference pairs) for its pairwise accuracy")
    if cfg.pairs_file and not cfg.reward_model and not cfg.seq2seq_rm:
        raise UserError("--pairs_file is read for the reward-model accuracy: give --reward_model DIR too")
    if cfg.seq2seq_rm and not (cfg.pairs_file or cfg.world):
        raise UserError("--seq2seq_rm needs --pairs_file F (preference pairs) for its sanity metrics")
    if cfg.rm_score and not cfg.reward_model:
        raise UserError("--rm_score true needs --reward_model DIR")


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    _check(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    scorers: dict[str, RewardModelScorer] = {}

    def scorer(rm_dir: str) -> RewardModelScorer:
        if rm_dir not in scorers:
            scorers[rm_dir] = RewardModelScorer(rm_dir)
        return scorers[rm_dir]

    if cfg.policies:
        summary |= _evaluate_policies(cfg, out, scorer)
    summary["config"] = asdict(cfg)
    if cfg.reward_model and (cfg.pairs_file or cfg.world):
        pairs = cfg.pairs_file or str(Path(cfg.world) / "preferences_test.jsonl")
        outcomes = scorer(cfg.reward_model).pair_outcomes(pairs, out / "pairs.rejected.jsonl")
        acc, lo, hi = win_rate_with_ci(outcomes)
        summary["reward_model_pairwise_accuracy"] = acc
        summary["reward_model_pairwise"] = {
            "accuracy": acc,
            "ci_low": lo,
            "ci_high": hi,
            "n_pairs": len(outcomes),
            "pairs_file": pairs,
        }
    if cfg.seq2seq_rm:
        pairs = cfg.pairs_file or str(Path(cfg.world) / "preferences_test.jsonl")
        summary["seq2seq_rm_sanity"] = seq2seq_rm_sanity(cfg.seq2seq_rm, pairs, out, cfg.max_prompt_length)
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    (out / "eval.md").write_text(markdown_table(summary))
    return summary


def seq2seq_rm_sanity(rm_dir: str, pairs_file: str, out: Path, max_prompt_length: int) -> dict[str, Any]:
    """The sanity metrics of a seq2seq RM on preference pairs (docs/methods/seq2seq_rm.md §2.6); rows whose
    `label_prob` < ½ count `rejected` as the preferred response, as in training."""
    from rlxf.data.formats import load_preferences
    from rlxf.data.tokenize import encode_preferences
    from rlxf.rewards.seq2seq import as_encoded_pairs, load_seq2seq_rm, oriented_pairs, sanity_metrics

    model, tokenizer, template = load_seq2seq_rm(rm_dir)
    rows = load_preferences(pairs_file, on_bad_row="skip", rejected_path=out / "pairs.rejected.jsonl")
    encoded = encode_preferences(rows, tokenizer, max_prompt_length=max_prompt_length, on_bad_row="skip")
    pairs, counts = oriented_pairs(encoded, template.eos_id, use_label_prob=True)
    metrics = sanity_metrics(model, template, as_encoded_pairs(pairs, template.eos_id), tokenizer.pad_token_id)
    return {**metrics, "n_pairs": len(pairs), "skipped": counts, "pairs_file": pairs_file}


def _evaluate_policies(cfg: EvalConfig, out: Path, scorer: Callable[[str], RewardModelScorer]) -> dict[str, Any]:
    world = None
    if cfg.world:
        from rlxf.worlds.factworld import load_factworld

        world = load_factworld(cfg.world)
    names = cfg.names or [Path(p).name if Path(p).name != "final" else Path(p).parent.name for p in cfg.policies]
    if len(names) != len(cfg.policies):
        raise UserError(f"{len(names)} names for {len(cfg.policies)} policies; give one name per policy")
    if len(set(names)) != len(names):
        raise UserError(f"policy names must differ, got {names}; give --names")
    baseline = cfg.baseline or cfg.policies[0]
    reference_dir = cfg.reference or baseline
    rm_score = cfg.reward_model and (cfg.rm_score if cfg.rm_score is not None else world is None)
    make_judge = parse_judge(cfg.judge, cfg.max_prompt_length, scorer) if cfg.judge else None  # checked up front

    reference, tokenizer = load_policy(reference_dir)
    prompt_rows = load_prompts(cfg.prompts_file or str(Path(cfg.world) / "prompts_test.jsonl"))
    encoded = encode_prompts(prompt_rows, tokenizer, max_prompt_length=cfg.max_prompt_length)
    sample_prompts = [r["prompt"] for r in encoded for _ in range(cfg.samples_per_prompt)]
    scoring_rows = [world.row_for(r) for r in prompt_rows for _ in range(cfg.samples_per_prompt)] if world else None

    responses: dict[str, list[str]] = {}
    gold: dict[str, list[float]] = {}
    rm_scores: dict[str, list[float]] = {}
    results: dict[str, dict[str, Any]] = {}
    for name, path in zip(names, cfg.policies):
        policy, policy_tok = load_policy(path)
        samples = sample_responses(policy, policy_tok, encoded, cfg.samples_per_prompt, cfg.generation, cfg.seed)
        texts = [s["response"] for s in samples]
        responses[name] = texts
        if world is not None:
            gold[name] = [world.score(row, y).score for row, y in zip(scoring_rows, texts)]
            metrics = world.evaluate(scoring_rows, texts)
        else:
            metrics = {"mean_length_words": sum(len(y.split()) for y in texts) / max(len(texts), 1)}
        response_ids = [s["_response_ids"] for s in samples]
        prompt_ids = [r["prompt_ids"] for r in encoded for _ in range(cfg.samples_per_prompt)]
        kls = sequence_kl(policy, reference, prompt_ids, response_ids, policy_tok.pad_token_id)
        metrics["kl_to_reference"] = sum(kls) / len(kls)
        results[name] = metrics
        del policy
    del reference

    base_name = names[cfg.policies.index(baseline)] if baseline in cfg.policies else None
    if base_name is None:  # a baseline that is not one of the evaluated policies
        policy, policy_tok = load_policy(baseline)
        texts = [
            s["response"]
            for s in sample_responses(policy, policy_tok, encoded, cfg.samples_per_prompt, cfg.generation, cfg.seed)
        ]
        del policy
        base_name = "baseline"
        responses[base_name] = texts
        if world is not None:
            gold["baseline"] = [world.score(row, y).score for row, y in zip(scoring_rows, texts)]
    if world is not None:
        for name in names:
            outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold[name], gold[base_name])]
            mean, lo, hi = win_rate_with_ci(outcomes)
            results[name] |= {"win_rate": mean, "win_rate_ci_low": lo, "win_rate_ci_high": hi}

    if rm_score:
        rm = scorer(cfg.reward_model)
        for name in names:
            rm_scores[name] = rm.score(sample_prompts, responses[name], cfg.max_prompt_length)
            stats = mean_with_ci(rm_scores[name])
            results[name] |= {
                "rm_score": stats["mean"],
                "rm_score_std": stats["std"],
                "rm_score_ci_low": stats["ci_low"],
                "rm_score_ci_high": stats["ci_high"],
            }

    extra: dict[str, Any] = {}
    if make_judge is not None:
        judge = make_judge()  # loaded after sampling: the policies are out of memory
        try:
            extra["judge"] = judge.name
            for name in names:
                p_win = judge_outcomes(judge, sample_prompts, responses[name], responses[base_name])
                results[name] |= _judge_metrics(p_win)
                with (out / f"judge_{name}.jsonl").open("w", encoding="utf-8") as f:
                    for prompt, y, b, p in zip(sample_prompts, responses[name], responses[base_name], p_win):
                        valid = not math.isnan(p)  # None = no valid judgement (too long, no label token)
                        row = {"prompt": prompt, "response": y, "baseline_response": b, "p_win": p if valid else None}
                        f.write(json.dumps(row | {"outcome": outcome(p) if valid else None}) + "\n")
        finally:
            judge.close()

    for name in names:
        with (out / f"responses_{name}.jsonl").open("w", encoding="utf-8") as f:
            for i, y in enumerate(responses[name]):
                row: dict[str, Any] = {
                    "prompt": scoring_rows[i]["prompt"] if world else sample_prompts[i],
                    "response": y,
                }
                if world is not None:
                    row["gold"] = gold[name][i]
                if name in rm_scores:
                    row["rm_score"] = rm_scores[name][i]
                f.write(json.dumps(row) + "\n")
    return {"baseline": base_name, "policies": results, **extra}


def _judge_metrics(p_win: list[float]) -> dict[str, Any]:
    """Win rate (1 / ½ / 0 per valid judgement) and the mean soft P(policy ≻ baseline), each with its interval."""
    valid = [p for p in p_win if not math.isnan(p)]
    mean, lo, hi = win_rate_with_ci([outcome(p) for p in valid])
    soft, soft_lo, soft_hi = win_rate_with_ci(valid)
    if len(valid) < len(p_win):
        logger.warning("the judge gave no valid judgement for %d of %d pairs", len(p_win) - len(valid), len(p_win))
    return {
        "judge_win_rate": mean,
        "judge_win_rate_ci_low": lo,
        "judge_win_rate_ci_high": hi,
        "judge_p_win": soft,
        "judge_p_win_ci_low": soft_lo,
        "judge_p_win_ci_high": soft_hi,
        "judge_n": len(valid),
        "judge_n_invalid": len(p_win) - len(valid),
    }


COLUMNS = [
    ("win_rate", "gold win rate vs {baseline}"),
    ("gold_score", "gold score"),
    ("hallucination_rate", "hallucination rate"),
    ("retain_accuracy", "retain accuracy"),
    ("list_validity", "list validity"),
    ("mean_length_words", "length (words)"),
    ("kl_to_reference", "KL to ref"),
]
"""The gold table (with --world), unchanged."""

EXTRA_COLUMNS = [
    ("judge_win_rate", "judge win rate vs {baseline} [95% CI]"),
    ("judge_p_win", "mean P(≻ {baseline})"),
    ("rm_score", "RM score [95% CI]"),
    ("rm_score_std", "RM score sd"),
    ("mean_length_words", "length (words)"),
    ("kl_to_reference", "KL to ref"),
]
"""The table without a world, and beside the gold table the metrics it lacks."""


def _cell(m: dict[str, Any], key: str) -> str:
    if f"{key}_ci_low" in m:
        return f"{m[key]:.3f} [{m[f'{key}_ci_low']:.3f}, {m[f'{key}_ci_high']:.3f}]"
    return f"{m[key]:.3f}"


def _table(summary: dict[str, Any], columns: list[tuple[str, str]]) -> list[str]:
    first = next(iter(summary["policies"].values()))
    columns = [(k, label) for k, label in columns if k in first]
    header = [label.format(baseline=summary["baseline"]) for _, label in columns]
    lines = ["| policy | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, m in summary["policies"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(m, key) for key, _ in columns) + " |")
    return lines


def markdown_table(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    policies = summary.get("policies")
    if policies:
        gold = "gold_score" in next(iter(policies.values()))
        if gold:
            header = [label.format(baseline=summary["baseline"]) for _, label in COLUMNS]
            lines = ["| policy | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
            for name, m in policies.items():
                cells = []
                for key, _ in COLUMNS:
                    if key == "win_rate":
                        cells.append(f"{m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}]")
                    else:
                        cells.append(f"{m[key]:.3f}")
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            extra = [(k, label) for k, label in EXTRA_COLUMNS if k not in dict(COLUMNS)]
            if any(k in next(iter(policies.values())) for k, _ in extra):
                lines += [""] + _table(summary, extra)
        else:
            lines = _table(summary, EXTRA_COLUMNS)
    if "judge" in summary:
        lines += ["", f"Judge: {summary['judge']} (win = P(policy ≻ {summary['baseline']}) > ½, ties ½)"]
    if "reward_model_pairwise_accuracy" in summary:
        lines.append("")
        line = f"Reward model pairwise accuracy on held-out pairs: {summary['reward_model_pairwise_accuracy']:.3f}"
        info = summary.get("reward_model_pairwise")
        if info:
            line += f" [{info['ci_low']:.3f}, {info['ci_high']:.3f}] (95% CI, ties ½), {info['n_pairs']} pairs"
        lines.append(line)
    if "seq2seq_rm_sanity" in summary:
        m = summary["seq2seq_rm_sanity"]
        lines += ["", "| seq2seq RM | pairwise_accuracy | copy_rate_chosen | flag_rate_chosen | flag_rate_rejected | "
                  "flag_rate_gap |", "|---|---|---|---|---|---|",
                  f"| {m['n_pairs']} pairs | {m['pairwise_accuracy']:.3f} | {m['copy_rate_chosen']:.3f} | "
                  f"{m['flag_rate_chosen']:.3f} | {m['flag_rate_rejected']:.3f} | {m['flag_rate_gap']:.3f} |"]  # fmt: skip
    if lines and lines[0] == "":
        lines = lines[1:]
    return "\n".join(lines) + "\n"
