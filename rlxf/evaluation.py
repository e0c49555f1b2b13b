"""`rlxf eval`: compare policies on held-out prompts against a gold world.

For each policy: gold win rate against a baseline policy (ties count half, with a 95% confidence interval), the gold
score, hallucination rate, retain accuracy, mean length, and the KL to a reference model; the pairwise accuracy of a
reward model when one is given. Writes `eval.json` and `eval.md`.

Shapes: B responses, T response tokens, V vocab.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlxf.config import check_ranges
from rlxf.data.formats import load_preferences, load_prompts
from rlxf.data.tokenize import encode_preferences, encode_prompts, pad
from rlxf.errors import UserError
from rlxf.hf import load_model, load_policy
from rlxf.sampling import GenerationSettings, sample_responses

logger = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    policies: list[str] = field(default_factory=list)
    """Policy directories to evaluate, comma-separated. Required."""
    names: list[str] = field(default_factory=list)
    """Display names of the policies, comma-separated (default: directory names)."""
    baseline: str = ""
    """Policy directory the win rate is measured against (default: the first policy)."""
    reference: str = ""
    """Reference model for the KL (default: the baseline)."""
    world: str = ""
    """FactWorld directory: the gold scorer. Required."""
    prompts_file: str = ""
    """Held-out prompts (default: <world>/prompts_test.jsonl)."""
    reward_model: str = ""
    """Reward-model directory; when given, its pairwise accuracy on `pairs_file` is reported."""
    pairs_file: str = ""
    """Held-out preference pairs for the reward-model accuracy (default: <world>/preferences_test.jsonl)."""
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


def reward_model_accuracy(rm_dir: str, pairs_file: str, batch_size: int = 32) -> float:
    from rlxf.hf import load_tokenizer
    from rlxf.models.reward_model import RewardModel, evaluate_pairs

    tokenizer = load_tokenizer(rm_dir)
    rm = load_model(rm_dir, RewardModel.from_pretrained, "reward model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = encode_preferences(load_preferences(pairs_file, on_bad_row="skip"), tokenizer, on_bad_row="skip")
    return evaluate_pairs(rm.to(device), rows, tokenizer.pad_token_id, batch_size, device)["eval/pairwise_accuracy"]


def run_eval(cfg: EvalConfig) -> dict[str, Any]:
    from rlxf.worlds.factworld import load_factworld

    if not cfg.policies:
        raise UserError("--policies is required: one or more policy directories, comma-separated")
    if not cfg.world:
        raise UserError("--world is required: the FactWorld directory whose gold scorer judges the responses")
    world = load_factworld(cfg.world)
    names = cfg.names or [Path(p).name if Path(p).name != "final" else Path(p).parent.name for p in cfg.policies]
    if len(names) != len(cfg.policies):
        raise UserError(f"{len(names)} names for {len(cfg.policies)} policies; give one name per policy")
    baseline = cfg.baseline or cfg.policies[0]
    reference_dir = cfg.reference or baseline
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    reference, tokenizer = load_policy(reference_dir)
    prompt_rows = load_prompts(cfg.prompts_file or str(Path(cfg.world) / "prompts_test.jsonl"))
    encoded = encode_prompts(prompt_rows, tokenizer, max_prompt_length=cfg.max_prompt_length)
    scoring_rows = [world.row_for(r) for r in prompt_rows for _ in range(cfg.samples_per_prompt)]

    responses: dict[str, list[str]] = {}
    gold: dict[str, list[float]] = {}
    results: dict[str, dict[str, Any]] = {}
    for name, path in zip(names, cfg.policies):
        policy, policy_tok = load_policy(path)
        samples = sample_responses(policy, policy_tok, encoded, cfg.samples_per_prompt, cfg.generation, cfg.seed)
        texts = [s["response"] for s in samples]
        responses[name] = texts
        gold[name] = [world.score(row, y).score for row, y in zip(scoring_rows, texts)]
        metrics = world.evaluate(scoring_rows, texts)
        response_ids = [s["_response_ids"] for s in samples]
        prompt_ids = [r["prompt_ids"] for r in encoded for _ in range(cfg.samples_per_prompt)]
        kls = sequence_kl(policy, reference, prompt_ids, response_ids, policy_tok.pad_token_id)
        metrics["kl_to_reference"] = sum(kls) / len(kls)
        results[name] = metrics
        with (out / f"responses_{name}.jsonl").open("w", encoding="utf-8") as f:
            for row, y, g in zip(scoring_rows, texts, gold[name]):
                f.write(json.dumps({"prompt": row["prompt"], "response": y, "gold": g}) + "\n")
        del policy

    base_name = names[cfg.policies.index(baseline)] if baseline in cfg.policies else None
    if base_name is None:  # a baseline that is not one of the evaluated policies
        policy, policy_tok = load_policy(baseline)
        texts = [
            s["response"]
            for s in sample_responses(policy, policy_tok, encoded, cfg.samples_per_prompt, cfg.generation, cfg.seed)
        ]
        gold["baseline"] = [world.score(row, y).score for row, y in zip(scoring_rows, texts)]
        base_name = "baseline"
    for name in names:
        outcomes = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(gold[name], gold[base_name])]
        mean, lo, hi = win_rate_with_ci(outcomes)
        results[name] |= {"win_rate": mean, "win_rate_ci_low": lo, "win_rate_ci_high": hi}

    summary: dict[str, Any] = {"baseline": base_name, "policies": results, "config": asdict(cfg)}
    if cfg.reward_model:
        pairs = cfg.pairs_file or str(Path(cfg.world) / "preferences_test.jsonl")
        summary["reward_model_pairwise_accuracy"] = reward_model_accuracy(cfg.reward_model, pairs)
    (out / "eval.json").write_text(json.dumps(summary, indent=2))
    (out / "eval.md").write_text(markdown_table(summary))
    return summary


COLUMNS = [
    ("win_rate", "gold win rate vs {baseline}"),
    ("gold_score", "gold score"),
    ("hallucination_rate", "hallucination rate"),
    ("retain_accuracy", "retain accuracy"),
    ("list_validity", "list validity"),
    ("mean_length_words", "length (words)"),
    ("kl_to_reference", "KL to ref"),
]


def markdown_table(summary: dict[str, Any]) -> str:
    header = [label.format(baseline=summary["baseline"]) for _, label in COLUMNS]
    lines = ["| policy | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for name, m in summary["policies"].items():
        cells = []
        for key, _ in COLUMNS:
            if key == "win_rate":
                cells.append(f"{m['win_rate']:.3f} [{m['win_rate_ci_low']:.3f}, {m['win_rate_ci_high']:.3f}]")
            else:
                cells.append(f"{m[key]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "reward_model_pairwise_accuracy" in summary:
        lines.append("")
        lines.append(
            f"Reward model pairwise accuracy on held-out pairs: {summary['reward_model_pairwise_accuracy']:.3f}"
        )
    return "\n".join(lines) + "\n"
