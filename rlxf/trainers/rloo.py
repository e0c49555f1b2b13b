"""REINFORCE leave-one-out (RLOO): online RL with K samples per prompt and no critic.

Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
LLMs" (arXiv 2402.14740), eq. 5; Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free!").

One optimiser step:
  1. take the step's prompts from the engine's data order (rows = prompts, `train.batch_size` prompts per step);
  2. sample K responses per prompt with the current policy (KV cache, `rlxf.sampling.generate`), seeded by
     (seed, step, micro-batch) so a resumed run samples what the uninterrupted one did;
  3. rewards from the reward source (`rlxf.rewards.sources`, the (B, T) reward contract); a response's score is the
     SUM of its token rewards (a scalar reward is all on the last token, so this is the scalar itself);
  4. per-token k1 KL to a frozen reference loaded from disk, KL_t = log π(y_t) − log π_ref(y_t), and the
     KL-regularised score R = score − β Σ_t KL_t (the KL is part of the sequence reward, as in the paper and TRL's
     RLOOTrainer; with sequence-level advantages a per-token placement would give the same R);
  5. advantages A_i = R_i − mean of the other K − 1 scores of the prompt (`rloo_advantages`), one per sequence;
  6. the policy gradient loss −A_i Σ_t log π_θ(y_t) over response tokens (EOS included), through the engine; with
     `credit.granularity` other than 'sequence', only over the tokens whose token / step / segment reward agrees
     in sign with the response's advantage on the task score (arXiv 2411.00809; the KL stays in the score).
One epoch per rollout, no ratio clipping: on-policy REINFORCE with the leave-one-out baseline.

Shapes: P prompts, K samples per prompt, B = P·K responses, L prompt + response length, T response tokens.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlxf.config import check_ranges
from rlxf.credit.assign import assign_credit, credit_counts, credit_metrics
from rlxf.credit.segments import CreditConfig
from rlxf.data.formats import load_prompts
from rlxf.data.tokenize import encode_prompts, pad
from rlxf.engine import Engine, TrainConfig
from rlxf.errors import UserError
from rlxf.hf import load_model, load_tokenizer
from rlxf.logprobs import shift_for_next_token, token_logprobs
from rlxf.models.lora import LoraSettings, add_lora
from rlxf.rewards.sources import RewardSource, build_reward_source, source_stats
from rlxf.rl import entropy_from_logits, masked_mean, rloo_advantages
from rlxf.sampling import GenerationSettings, rollout_seed, sample_rollout
from rlxf.trainers.common import collate_prompts, load_encoded, load_gold_world, load_reference

logger = logging.getLogger(__name__)


@dataclass
class RLOOConfig:
    model: str = ""
    """save_pretrained directory of the policy to start from (usually the SFT model). Required."""
    ref_model: str = ""
    """Reference model for the KL penalty; empty means the starting policy (`model`), loaded from disk."""
    prompts_file: str = ""
    """RL prompts: JSONL / Parquet / datasets dir with `prompt` + any metadata the reward needs. Required."""
    reward: str = ""
    """Reward spec, e.g. 'rm:runs/rm/final', 'factworld:runs/factworld:token', 'callable:my_mod:fn', or weighted
    terms joined by '+': '0.5*rm:DIR+factworld:DIR'. Required."""
    out: str = "runs/rloo"
    """Output directory: metrics, checkpoints, and the final policy in `final/`."""
    k: int = 4
    """Responses sampled per prompt (at least 2: each one's baseline is the mean of the other K − 1)."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Sampling settings of the rollouts (temperature 1 samples the policy itself)."""
    max_prompt_length: int = 192
    """Longest prompt in tokens; longer prompts keep their end."""
    kl_coef: float = 0.05
    """β: Σ_t β·(log π − log π_ref) is subtracted from each response's score (per-token k1 estimate)."""
    loss_units: Literal["sequence", "token"] = "sequence"
    """How −A·Σ_t log π is averaged: over the step's sequences (the REINFORCE estimator of the paper), or over its
    response tokens (long responses weigh more per sequence, smaller gradients overall)."""
    credit: CreditConfig = field(default_factory=CreditConfig)
    """Credit assignment: which response tokens the policy-gradient loss trains on (see `rlxf.credit`)."""
    gold_world: str = ""
    """FactWorld directory whose gold score of the rollouts is logged (`rewards/gold`), never trained on."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed prompt row does: stop with an error, or be skipped and written to a side file."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (`lora.r` > 0) instead of training every weight: final/ then holds the adapters, which
    `peft.PeftModel.from_pretrained`, `rlxf merge` and every rlxf stage load (README, "LoRA adapters")."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-5, batch_size=16, per_device_batch_size=4, max_steps=100)
    )
    """Optimisation settings (engine). Here batch_size counts PROMPTS per step (each sampled k times) and
    per_device_batch_size prompts per forward pass (k responses each)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"max_prompt_length": ">=1", "kl_coef": ">=0"})
        if self.k < 2:
            raise UserError(f"k={self.k}: RLOO needs at least 2 samples per prompt for its leave-one-out baseline")


def policy_token_logprobs(
    model: torch.nn.Module, batch: dict[str, Any], with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log π(y_t) of the response tokens: (B, T') log-probs, the (B, T') response mask, and (B, T') entropies, with
    T' = L - first_response_position (L - 1 when the batch does not say)."""
    # Logits from the position before the batch's earliest response token on: the LM head, log-softmax and entropy
    # skip prompt positions that predict no response token. first: a Python int from the rollout (no host sync).
    first = batch.get("first_response_position", 1)  # 1: every position (a batch built elsewhere)
    keep = batch["input_ids"].shape[1] - first + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    logits, labels, mask = shift_for_next_token(
        logits, batch["input_ids"][:, first - 1 :], batch["response_mask"][:, first - 1 :]
    )  # (B, keep, V) -> (B, keep-1, V), (B, keep-1), (B, keep-1)
    mask = mask.bool()
    logps = token_logprobs(logits, labels.masked_fill(~mask, 0))  # (B, L-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())  # (B, L-1, V) -> (B, L-1)
    return logps, mask, entropy


@torch.no_grad()
def rollout(
    policy: torch.nn.Module,
    ref: torch.nn.Module,
    rows: list[dict[str, Any]],
    tokenizer: Any,
    source: RewardSource,
    cfg: RLOOConfig,
    seed: int,
    device: torch.device,
    credit_source: RewardSource | None = None,
    world: Any = None,
) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, float]]:
    """Steps 2-6 for P prompts: a training batch of B = P·K responses (right-padded prompt + response, advantages,
    keep-mask), per-response statistics for logging, and the credit counts (`rlxf.credit.assign.credit_counts`)."""
    # 2-3. sample K responses per prompt and score them: the score of a response is the sum of its token rewards.
    # log π(y_t) comes from the sampling pass: no separate no-grad forward of the policy.
    r = sample_rollout(
        policy, rows, tokenizer, cfg.k, cfg.generation, seed, source=source, world=world, return_logprobs=True
    )
    prompt_rows, response_ids = r.prompt_rows, r.response_ids
    scores = r.scores.to(device)  # (B,)

    # 4. per-token k1 KL to the reference, subtracted from the score
    seqs = [p + ids for p, ids in zip(r.prompt_ids, response_ids)]
    masks = [[0] * len(p) + [1] * len(ids) for p, ids in zip(r.prompt_ids, response_ids)]
    input_ids, attention_mask = pad(seqs, tokenizer.pad_token_id, side="right")  # (B, L)
    response_mask, _ = pad(masks, 0, side="right")  # (B, L)
    first = min(len(p) for p in r.prompt_ids)
    batch = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "response_mask": response_mask.to(device),
        "first_response_position": first,
    }
    ref_logps, mask, _ = policy_token_logprobs(ref, batch)  # (B, T')
    # k1 summed over the response: Σ_t (log π − log π_ref) = Σ_t log π (sampling pass) − Σ_t log π_ref
    policy_logp = torch.tensor([sum(lp) for lp in r.logprobs], dtype=ref_logps.dtype, device=device)  # (B,)
    kl = policy_logp - torch.where(mask, ref_logps, 0).sum(-1)  # (B,) Σ_t KL_t
    rlhf_scores = scores - cfg.kl_coef * kl  # (B,)

    # 5. leave-one-out advantages within each prompt's K samples
    advantages = rloo_advantages(rlhf_scores.view(-1, cfg.k)).flatten()  # (P, K) -> (B,)

    # 6. credit: keep the tokens whose reward agrees with the sign of the task-score advantage, without the KL
    # (docs/methods/adaptive_segment_reward.md §2.5), through the one credit path; its (B, T) response-aligned
    # keep-mask is placed at the response columns of this batch, p_b − first + t.
    keep, counts = mask, {}
    if cfg.credit.granularity != "sequence":
        labels = torch.sign(rloo_advantages(scores.view(-1, cfg.k)).flatten())  # (B,)
        token_rewards = r.rewards
        if credit_source is not None:
            token_rewards, _ = credit_source(prompt_rows, response_ids, r.texts, tokenizer)
        rc = assign_credit(cfg.credit, labels, response_ids, tokenizer, token_rewards=token_rewards, texts=r.texts)
        keep = torch.zeros_like(mask)
        for b, (p, ids) in enumerate(zip(r.prompt_ids, response_ids)):
            start = len(p) - first
            keep[b, start : start + len(ids)] = rc.keep[b, : len(ids)].to(device)
        counts = credit_counts(rc, labels)

    batch |= {
        "keep": keep,
        "advantages": advantages,
        "num_units": len(response_ids) if cfg.loss_units == "sequence" else int(keep.sum()),
        "num_tokens": int(attention_mask.sum()),
    }
    stats = {
        "score": scores.tolist(),
        "kl": kl.tolist(),
        "rlhf_reward": rlhf_scores.tolist(),
        "length": [float(len(ids)) for ids in response_ids],
        "finished": [float(f) for f in r.finished],
    }
    if r.gold is not None:
        stats["gold"] = r.gold
    return batch, stats, counts


def rloo_loss(
    policy: torch.nn.Module, batch: dict[str, Any], loss_units: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 6: the summed policy-gradient loss Σ_i −A_i Σ_t log π_θ(y_i,t) and summed metrics per unit."""
    logps, mask, entropy = policy_token_logprobs(policy, batch, with_entropy=True)  # (B, L-1)
    pg = torch.where(batch["keep"], -batch["advantages"][:, None] * logps, 0)  # (B, L-1) only the kept tokens
    # The engine divides every sum by the step's units: per sequence, entropy is each sequence's token mean and
    # logps/response a sequence's summed log-prob; per token, both are token means.
    if loss_units == "sequence":
        entropy_sum = masked_mean(entropy, mask, dim=-1).sum()
    else:
        entropy_sum = torch.where(mask, entropy, 0).sum()
    logp_sum = torch.where(mask, logps.detach(), 0).sum()
    return pg.sum(), {"loss/policy": pg.detach().sum(), "objective/entropy": entropy_sum, "logps/response": logp_sum}


def train_rloo(cfg: RLOOConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Optimise `cfg.model` on `cfg.prompts_file` against `cfg.reward` with RLOO; returns the metric history."""
    if not cfg.prompts_file or not cfg.reward:
        raise UserError("--prompts-file and --reward are required (see `rlxf rloo --help` for the reward spec)")
    tokenizer = load_tokenizer(cfg.model)
    if model is None:
        model = load_model(cfg.model, tokenizer=tokenizer, **cfg.train.load_kwargs())
    model = add_lora(model, cfg.lora, cfg.model, cfg.train.seed)
    out = Path(cfg.out)
    rows = load_encoded(
        load_prompts, encode_prompts, cfg.prompts_file, tokenizer, out, "prompts", cfg.on_bad_row,
        max_prompt_length=cfg.max_prompt_length,
    )  # fmt: skip
    engine = Engine(cfg.train, out, model, num_examples=len(rows), config_dict=asdict(cfg))
    policy = engine.model
    source = build_reward_source(cfg.reward, device=engine.device)
    credit_source = build_reward_source(cfg.credit.token_reward, engine.device) if cfg.credit.token_reward else None
    world = load_gold_world(cfg.gold_world)

    ref = load_reference(cfg.model, cfg.ref_model, cfg.lora, engine.unwrap(), cfg.train, engine.device)

    for micro_batches in engine.steps(rows, collate_prompts):
        # 1-5. rollouts of this step's prompts, one per micro-batch, seeded by (seed, step, micro-batch, process)
        batches, stats, credit_totals = [], {}, {}
        for i, mb in enumerate(micro_batches):
            seed = rollout_seed(cfg.train.seed, engine.step, i, engine.rank)
            batch, mb_stats, counts = rollout(
                engine.unwrap(), ref, mb["rows"], tokenizer, source, cfg, seed, engine.device, credit_source, world
            )
            batches.append(batch)
            for key, values in mb_stats.items():
                stats.setdefault(key, []).extend(values)
            for key, value in counts.items():
                credit_totals[key] = credit_totals.get(key, 0.0) + value
        # 6. one policy-gradient update on the whole rollout
        logged = engine.train_step(batches, lambda batch: rloo_loss(policy, batch, cfg.loss_units))
        if logged:  # the engine logs every `log_every` steps; the rollout statistics go with it (this process's)
            mean = {k: sum(v) / len(v) for k, v in stats.items() if v}
            std = (sum((x - mean["score"]) ** 2 for x in stats["score"]) / len(stats["score"])) ** 0.5
            rollout_metrics = {
                "rewards/mean": mean["score"],
                "rewards/std": std,
                "objective/kl": mean["kl"],
                "objective/rlhf_reward": mean["rlhf_reward"],
                "response/length": mean["length"],
                "response/finished": mean["finished"],
            }
            if "gold" in mean:
                rollout_metrics["rewards/gold"] = mean["gold"]
            rollout_metrics |= credit_metrics(credit_totals)
            rollout_metrics |= source_stats(source)  # e.g. seq2seq/truncated_frac
            engine.log(rollout_metrics)

    if engine.finished:
        engine.save_final(tokenizer)
    engine.close()
    return {"history": engine.history, "finished": engine.finished, "out": str(out)}
