"""PPO with per-token rewards (REINFORCE with a learned value baseline is the same loop: `rlxf.trainers.reinforce`).

PPO: Schulman et al. 2017 (arXiv 1707.06347) as used for language models by Ziegler et al. 2019 (arXiv 1909.08593)
and Stiennon et al. 2020: per-token KL penalty to a frozen reference folded into the rewards, GAE over the response
tokens, a clipped policy loss and a clipped value loss, several epochs over minibatches of each rollout.
REINFORCE with a baseline (Williams 1992; the RL algorithm of the RLAIF paper, arXiv 2309.00267 §2.3):
A_t = G_t − V(s_t), one on-policy update per rollout (`rlxf reinforce`, the same loop with other defaults).

One optimiser step of the engine = one rollout:
  1. take the step's prompts from the engine's data order (`train.batch_size` prompts, each sampled k times);
  2. sample responses with the current policy (KV cache), seeded by (seed, step, micro-batch, process);
  3. token rewards (B, T) from the reward source (the reward contract of `rlxf.rewards.sources`); optionally a
     penalty on responses that hit the length limit without EOS;
  4. one no-grad forward of the policy (and critic) as it will be trained: the old log-probs and values PPO uses;
     one of the frozen reference: per-token KL_t (k1 or k3), and r_t − β·KL_t on every response token;
  5. advantages (GAE(γ, λ), or G_t − V for REINFORCE), returns, optional whitening of the advantages;
  6. credit assignment (`credit.granularity`): the policy loss keeps only the tokens whose token / step / segment
     reward agrees in sign with the response's sequence-level advantage (arXiv 2411.00809); value loss and KL stay
     on all tokens;
  7. `ppo_epochs` passes over the rollout in `num_minibatches` shuffled minibatches, one optimiser update each:
     clipped policy loss + vf_coef · clipped value loss;
  8. the adaptive KL coefficient (if `kl_target` > 0) moves after the rollout.

Layout. A rollout batch is [left-padded prompt | right-padded response] so that every response starts at the same
column: the (B, T) response tensors (rewards, log-probs, values, masks) are all response-aligned, column t = response
token t, and the logits / hidden state that predict y_t sit at column P + t − 1.

Shapes: P prompt columns, T response tokens, B responses (prompts × k), V vocab, H hidden size.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from rlxf.config import check_ranges
from rlxf.credit.assign import assign_credit, credit_counts, credit_metrics
from rlxf.credit.segments import CreditConfig
from rlxf.data.formats import load_prompts
from rlxf.data.tokenize import encode_prompts, pad
from rlxf.engine import Engine, NonFiniteLossError, TrainConfig
from rlxf.errors import UserError
from rlxf.hf import check_vocabulary_fits, load_model, load_tokenizer, readable_files
from rlxf.logprobs import token_logprobs
from rlxf.models.lora import LoraSettings, add_lora, transformers_model
from rlxf.models.reward_model import RewardModel, positions_from_mask
from rlxf.rewards.sources import RewardSource, build_reward_source, source_stats
from rlxf.rl import (
    AdaptiveKLController,
    FixedKLController,
    discounted_returns,
    entropy_from_logits,
    gae,
    kl_penalty,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    reinforce_advantages,
    token_rewards_with_kl,
    value_loss,
)
from rlxf.sampling import GenerationSettings, rollout_seed, sample_rollout
from rlxf.trainers.common import collate_prompts, load_encoded, load_gold_world, load_reference

logger = logging.getLogger(__name__)


@dataclass
class PPOConfig:
    model: str = ""
    """save_pretrained directory of the policy to start from (usually the SFT model). Required."""
    ref_model: str = ""
    """Reference model of the KL penalty; empty means the starting policy (`model`), loaded from disk."""
    prompts_file: str = ""
    """RL prompts: JSONL / Parquet / datasets dir with `prompt` + any metadata the reward needs. Required."""
    reward: str = ""
    """Reward spec, e.g. 'rm:runs/rm/final', 'factworld:runs/factworld:token', 'callable:my_mod:fn', or weighted
    terms joined by '+'. Required."""
    out: str = "runs/ppo"
    """Output directory: metrics, checkpoints, the final policy in `final/` and its critic in `final/value_model/`."""
    shared_value_head: bool = False
    """True: a linear value head on the policy's last hidden state (one backbone, less memory); False: a separate
    critic model."""
    value_model: str = ""
    """Where the separate critic starts: a reward-model directory (`rlxf rm` output, the usual choice) or any causal
    LM directory (a fresh head); empty means the policy's directory."""
    k: int = 1
    """Responses sampled per prompt."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Sampling settings of the rollouts (temperature 1 samples the policy itself)."""
    max_prompt_length: int = 192
    """Longest prompt in tokens; longer prompts keep their end."""
    advantage: Literal["gae", "reinforce"] = "gae"
    """'gae': generalised advantage estimation with the critic; 'reinforce': A_t = G_t − V(s_t), the critic as a
    learned baseline only."""
    gamma: float = 1.0
    """Discount over response tokens."""
    lam: float = 0.95
    """GAE λ (bias-variance trade-off; 1 gives the Monte-Carlo return minus the value)."""
    ppo_epochs: int = 4
    """Passes over each rollout."""
    num_minibatches: int = 1
    """Optimiser updates per pass: the rollout is shuffled and cut into this many minibatches."""
    clip_eps: float = 0.2
    """Policy ratio clip ε."""
    value_clip_eps: float = 0.2
    """Value clip: the critic moves at most this far from its rollout value per update (inf disables)."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    value_lr: float = 0.0
    """Learning rate of the critic (the separate value model, or the value head of a shared backbone); 0 means
    train.lr. A fresh head usually needs a larger one than the policy."""
    kl_coef: float = 0.05
    """β of the per-token KL penalty r_t − β·KL_t (the initial β when kl_target > 0)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """Per-token KL estimate: k1 = log π − log π_ref (unbiased, can be negative), k3 = (r − 1) − log r (≥ 0)."""
    kl_target: float = 0.0
    """> 0: adaptive β (Ziegler et al. 2019) steering the mean per-response KL to this many nats; 0: fixed β."""
    kl_horizon: float = 10000.0
    """Samples over which the adaptive β corrects a KL error of 20%."""
    whiten_advantages: bool = True
    """Normalise the rollout's advantages to mean 0 and variance 1 over its response tokens."""
    missing_eos_penalty: float = 0.0
    """Subtracted from the reward of responses that reach generation.max_new_tokens without EOS (0: none)."""
    loss_reduction: Literal["token", "sequence"] = "token"
    """Policy and value losses averaged over the minibatch's tokens, or per response then over responses."""
    credit: CreditConfig = field(default_factory=CreditConfig)
    """Credit assignment: which response tokens the policy loss trains on (see `rlxf.credit`)."""
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
    """Optimisation settings (engine). batch_size counts PROMPTS per rollout (each sampled k times),
    per_device_batch_size prompts per forward pass; one engine step = one rollout (ppo_epochs × num_minibatches
    optimiser updates); the learning-rate schedule moves once per rollout."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "max_prompt_length": ">=1",
                "gamma": "[0,1]",
                "lam": "[0,1]",
                "clip_eps": ">0",
                "value_clip_eps": ">0",
                "vf_coef": ">=0",
                "value_lr": ">=0",
                "kl_coef": ">=0",
                "kl_target": ">=0",
                "kl_horizon": ">0",
                "missing_eos_penalty": ">=0",
            },
        )
        if self.k < 1 or self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise UserError(
                f"k={self.k}, ppo_epochs={self.ppo_epochs}, num_minibatches={self.num_minibatches}: each must be >= 1"
            )


class ActorCritic(nn.Module):
    """The policy and its critic in one module, so the engine optimises, clips, checkpoints and syncs both.

    The critic is either a separate `RewardModel` (values = its head at every position) or, with a shared
    backbone, a linear head on the policy's last hidden state (zero-initialised: V starts at 0).
    """

    def __init__(self, policy: nn.Module, value_model: RewardModel | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        self.value_head = None
        if value_model is None:
            self.value_head = nn.Linear(policy.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, response_width: int) -> tuple[Tensor, Tensor]:
        """Logits and values at the T = response_width positions that predict the response tokens.

        (B, P + T) ids -> logits (B, T, V), values (B, T): column t predicts / values response token t.
        """
        position_ids = positions_from_mask(attention_mask)  # left-padded prompts: positions start at each row's BOS
        predicting = slice(input_ids.shape[1] - response_width - 1, input_ids.shape[1] - 1)
        if self.value_head is not None:
            policy = transformers_model(self.policy)  # a PeftModel's backbone is not its `.base_model`
            hidden = policy.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
            ).last_hidden_state[:, predicting]  # (B, T, H)
            logits = policy.get_output_embeddings()(hidden)  # (B, T, V)
            values = self.value_head(hidden).squeeze(-1).float()  # (B, T)
            return logits, values
        logits = self.policy(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=response_width + 1,
        ).logits[:, :-1]  # (B, T + 1, V) -> (B, T, V)
        values = self.value_model(input_ids, attention_mask, position_ids)[:, predicting]  # (B, P + T) -> (B, T)
        return logits, values


def layout(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    """[left-padded prompt | right-padded response] ids (B, P + T), attention mask (B, P + T), response mask (B, T)."""
    prompts, prompt_mask = pad(prompt_ids, pad_id, side="left")  # (B, P)
    responses, response_mask = pad(response_ids, pad_id, side="right")  # (B, T)
    return {
        "input_ids": torch.cat([prompts, responses], 1),
        "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        "response_mask": response_mask.bool(),
    }


def forward_response(model: nn.Module, batch: dict[str, Any], with_entropy: bool = False):
    """log π(y_t) (B, T), V(s_t) (B, T) and, if asked, the policy entropy (B, T) on the response columns."""
    width = batch["response_mask"].shape[1]
    logits, values = model(batch["input_ids"], batch["attention_mask"], width)  # (B, T, V), (B, T)
    mask = batch["response_mask"]
    labels = batch["input_ids"][:, -width:].masked_fill(~mask, 0)  # (B, T)
    logps = token_logprobs(logits, labels)  # (B, T)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    return logps, values, entropy


def pad_rows(rows: list[Tensor], width: int | None = None) -> Tensor:
    """Right-pad 1-D tensors with 0 into (B, width)."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.zeros(len(rows), width, dtype=rows[0].dtype if rows else torch.float32)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


@torch.no_grad()
def rollout(
    engine: Engine,
    ref: nn.Module,
    rows: list[dict[str, Any]],
    tokenizer: Any,
    source: RewardSource,
    credit_source: RewardSource | None,
    cfg: PPOConfig,
    seed: int,
    world: Any = None,
) -> dict[str, Any]:
    """Steps 2-4 for one micro-batch of prompts: per-response lists (ids, rewards, old log-probs, values, KL, ...)."""
    # 2-3. sample k responses per prompt (samples of one prompt adjacent), token rewards through the reward
    # contract (column t = response token t), the gold score when a world is known
    r = sample_rollout(
        engine.unwrap().policy, rows, tokenizer, cfg.k, cfg.generation, seed, source=source, world=world
    )
    prompt_ids, response_ids, texts = r.prompt_ids, r.response_ids, r.texts
    rewards = r.rewards  # (B, T)
    scores = rewards.sum(-1)  # (B,) task score, no KL: the label of credit assignment
    if cfg.missing_eos_penalty:
        for b, finished in enumerate(r.finished):
            if not finished:
                rewards[b, len(response_ids[b]) - 1] -= cfg.missing_eos_penalty
    credit_rewards = None
    if cfg.credit.granularity != "sequence":
        credit_rewards = (
            rewards if credit_source is None else credit_source(r.prompt_rows, response_ids, texts, tokenizer)[0]
        )

    # 4. old log-probs and values from the model as it is trained (same precision, same code path), reference
    batch = {k: v.to(engine.device) for k, v in layout(prompt_ids, response_ids, tokenizer.pad_token_id).items()}
    engine.model.eval()
    old_logps, old_values, _ = forward_response(engine.model, batch)  # (B, T)
    width = batch["response_mask"].shape[1]
    ref_logits = ref(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=positions_from_mask(batch["attention_mask"]),
        logits_to_keep=width + 1,
    ).logits[:, :-1]  # (B, T, V)
    ref_logps = token_logprobs(ref_logits, batch["input_ids"][:, -width:].masked_fill(~batch["response_mask"], 0))
    kl = kl_penalty(old_logps, ref_logps, cfg.kl_estimator)  # (B, T)

    n = [len(ids) for ids in response_ids]
    cpu = {"old_logps": old_logps, "old_values": old_values, "kl": kl}
    out = {k: [v[b, : n[b]].float().cpu() for b in range(len(n))] for k, v in cpu.items()}
    out |= {
        "prompt_ids": prompt_ids,
        "response_ids": response_ids,
        "rewards": [rewards[b, : n[b]].float() for b in range(len(n))],
        "score": scores.tolist(),
        "finished": [float(f) for f in r.finished],
        "text": texts,
    }
    if credit_rewards is not None:
        out["credit_rewards"] = [credit_rewards[b, : n[b]].float() for b in range(len(n))]
    if r.gold is not None:
        out["gold"] = r.gold
    return out


@torch.no_grad()
def advantages_and_masks(
    traj: dict[str, Any], cfg: PPOConfig, kl_coef: float, tokenizer: Any
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Steps 4-6 over the whole rollout of this process: KL-shaped rewards, advantages, returns, credit mask.

    Returns (N, T) tensors (response-aligned, 0 outside the mask) and credit statistics.
    """
    mask = pad_rows([torch.ones(len(ids), dtype=torch.bool) for ids in traj["response_ids"]])  # (N, T)
    rewards = pad_rows(traj["rewards"])
    kl = pad_rows(traj["kl"])
    values = pad_rows(traj["old_values"])
    shaped = token_rewards_with_kl(rewards, kl, kl_coef, mask)  # (N, T) r_t − β·KL_t
    if cfg.advantage == "gae":
        advantages, returns = gae(shaped, values, mask, cfg.gamma, cfg.lam)
    else:
        advantages = reinforce_advantages(shaped, mask, cfg.gamma, values)
        returns = discounted_returns(shaped, mask, cfg.gamma)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)

    # 6. credit: label = sign of the sequence-level advantage of the task score, through the one credit path
    # (`rlxf.credit.assign`); the baseline is the group mean when the prompt has several samples, the rollout mean
    # otherwise (docs/methods/adaptive_segment_reward.md §2.5)
    stats: dict[str, float] = {}
    keep = mask.clone()
    if cfg.credit.granularity != "sequence":
        scores = torch.tensor(traj["score"])  # (N,)
        if cfg.k >= 2:
            baseline = scores.view(-1, cfg.k).mean(-1, keepdim=True).expand(-1, cfg.k).reshape(-1)
        else:
            baseline = scores.mean().expand_as(scores)
        labels = torch.sign(scores - baseline)  # (N,) in {+1, 0, −1}
        rc = assign_credit(
            cfg.credit, labels, traj["response_ids"], tokenizer,
            token_rewards=pad_rows(traj["credit_rewards"], mask.shape[1]), texts=traj.get("text"),
        )  # fmt: skip
        keep = rc.keep
        stats = credit_metrics(credit_counts(rc, labels))
    tensors = {
        "advantages": advantages,
        "returns": returns,
        "keep": keep,
        "response_mask": mask,
        "old_logps": pad_rows(traj["old_logps"]),
        "old_values": values,
    }
    return tensors, stats


def collate_update(traj: dict[str, Any], tensors: dict[str, Tensor], idx: list[int], pad_id: int) -> dict[str, Any]:
    """A micro-batch of the update phase: responses `idx` of the rollout, trimmed to their own longest lengths."""
    batch: dict[str, Any] = layout(
        [traj["prompt_ids"][i] for i in idx], [traj["response_ids"][i] for i in idx], pad_id
    )
    width = batch["response_mask"].shape[1]
    batch |= {k: v[idx, :width] for k, v in tensors.items() if k != "response_mask"}
    batch["num_tokens"] = int(batch["attention_mask"].sum())
    return batch


def ppo_loss(
    model: nn.Module, batch: dict[str, Any], cfg: PPOConfig, counts: dict[str, Tensor]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Step 7 for one micro-batch: clipped policy loss on the kept tokens + vf_coef · clipped value loss on all
    response tokens, each already divided by the minibatch's global count (so micro-batches and processes add up
    to the minibatch mean). Metrics are weighted the same way."""
    logps, values, entropy = forward_response(model, batch, with_entropy=True)  # (b, T) each
    mask, keep = batch["response_mask"], batch["keep"]
    if cfg.loss_reduction == "token":
        policy_norm = {"num_tokens": counts["kept_tokens"]}
        value_norm = {"num_tokens": counts["tokens"]}
    else:
        policy_norm = {"num_sequences": counts["kept_sequences"]}
        value_norm = {"num_sequences": counts["sequences"]}
    pg_loss, pg_stats = ppo_policy_loss(
        logps, batch["old_logps"], batch["advantages"], keep, cfg.clip_eps, cfg.loss_reduction, **policy_norm
    )
    vf_loss, vf_stats = value_loss(
        values, batch["old_values"], batch["returns"], mask, cfg.value_clip_eps, cfg.loss_reduction, **value_norm
    )
    share = mask.sum() / counts["tokens"]  # this micro-batch's share of the minibatch's tokens
    metrics = {
        "loss/policy": pg_loss.detach(),
        "loss/value": vf_loss.detach(),
        "policy/clip_frac": pg_stats["clip_frac"] * share,
        "policy/approx_kl": pg_stats["approx_kl"] * share,
        "value/clip_frac": vf_stats["clip_frac"] * share,
        "value/error": vf_stats["error"] * share,
        "objective/entropy": masked_mean(entropy, mask) * share,
    }
    return pg_loss + cfg.vf_coef * vf_loss, metrics


def load_actor_critic(cfg: PPOConfig, model: nn.Module | None) -> ActorCritic:
    policy = model if model is not None else load_model(cfg.model, **cfg.train.load_kwargs())
    policy = add_lora(policy, cfg.lora, cfg.model, cfg.train.seed)
    value_model = None
    if not cfg.shared_value_head:
        value_path = cfg.value_model or cfg.model
        value_model = load_model(value_path, RewardModel.from_pretrained, "value model", **cfg.train.load_kwargs())
        value_model = add_lora(value_model, cfg.lora, value_path, cfg.train.seed + 1)
    return ActorCritic(policy, value_model)


def train_ppo(cfg: PPOConfig, model: nn.Module | None = None) -> dict[str, Any]:
    """Optimise `cfg.model` on `cfg.prompts_file` against `cfg.reward` with PPO (or REINFORCE with a baseline);
    returns the metric history."""
    if not cfg.model or not cfg.prompts_file or not cfg.reward:
        raise UserError("--model, --prompts-file and --reward are required (see `rlxf ppo --help`)")
    tokenizer = load_tokenizer(cfg.model)
    out = Path(cfg.out)
    rows = load_encoded(
        load_prompts, encode_prompts, cfg.prompts_file, tokenizer, out, "prompts", cfg.on_bad_row,
        max_prompt_length=cfg.max_prompt_length,
    )  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    actor_critic = load_actor_critic(cfg, model)
    check_vocabulary_fits(tokenizer, actor_critic.policy, cfg.model)
    critic = actor_critic.value_model if actor_critic.value_model is not None else actor_critic.value_head
    critic_ids = {id(p) for p in critic.parameters()}
    param_groups = [
        {"params": [p for p in actor_critic.parameters() if id(p) not in critic_ids]},
        {"params": list(critic.parameters()), "lr": cfg.value_lr or cfg.train.lr},
    ]
    engine = Engine(
        cfg.train, out, actor_critic, num_examples=len(rows), config_dict=asdict(cfg), param_groups=param_groups
    )
    source = build_reward_source(cfg.reward, device=engine.device)
    world = load_gold_world(cfg.gold_world)
    credit_source = build_reward_source(cfg.credit.token_reward, engine.device) if cfg.credit.token_reward else None
    ref = load_reference(cfg.model, cfg.ref_model, cfg.lora, engine.unwrap().policy, cfg.train, engine.device)
    if cfg.kl_target > 0:
        kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    else:
        kl_ctl = FixedKLController(cfg.kl_coef)
    if "kl_ctl" in engine.extra_state:  # resumed
        kl_ctl.load_state_dict(engine.extra_state["kl_ctl"])

    for micro_batches in engine.steps(rows, collate_prompts):
        # 2-4. rollouts of this step's prompts, one per micro-batch, seeded by (seed, step, micro-batch, process)
        traj: dict[str, list] = {}
        for i, mb in enumerate(micro_batches):
            seed = rollout_seed(cfg.train.seed, engine.step, i, engine.rank)
            for key, values in rollout(
                engine, ref, mb["rows"], tokenizer, source, credit_source, cfg, seed, world
            ).items():
                traj.setdefault(key, []).extend(values)
        # 5-6. advantages, returns and the credit mask over the whole rollout
        tensors, credit_stats = advantages_and_masks(traj, cfg, kl_ctl.value, tokenizer)

        # 7. epochs × minibatches of clipped updates
        n = len(traj["response_ids"])
        if n < cfg.num_minibatches:
            raise UserError(f"{n} responses per process cannot make {cfg.num_minibatches} minibatches")
        micro_size = cfg.train.per_device_batch_size * cfg.k
        generator = torch.Generator().manual_seed((cfg.train.seed * 1_000_003 + engine.step) * 100 + engine.rank)
        metric_sums: dict[str, Tensor] = {}
        updates, total_updates = 0, cfg.ppo_epochs * cfg.num_minibatches
        # A non-finite update k of this rollout must not leave updates 1..k-1 applied: the rollout is all or nothing.
        before = engine.snapshot() if total_updates > 1 else None
        try:
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(n, generator=generator).tolist()
                for m in range(cfg.num_minibatches):
                    idx = order[m * n // cfg.num_minibatches : (m + 1) * n // cfg.num_minibatches]
                    keep, mask = tensors["keep"][idx], tensors["response_mask"][idx]
                    counts = {
                        "tokens": engine.global_sum(mask.sum()),
                        "kept_tokens": engine.global_sum(keep.sum()),
                        "sequences": engine.global_sum(len(idx)),
                        "kept_sequences": engine.global_sum(keep.any(-1).sum()),
                    }
                    chunks = [idx[j : j + micro_size] for j in range(0, len(idx), micro_size)]
                    batches = [
                        engine.to_device(collate_update(traj, tensors, chunk, tokenizer.pad_token_id))
                        for chunk in chunks
                    ]
                    sums, grad_norm = engine.update(batches, lambda b: ppo_loss(engine.model, b, cfg, counts), 1.0)
                    for k, v in sums.items():
                        metric_sums[k] = metric_sums.get(k, 0.0) + v
                    updates += 1
        except NonFiniteLossError as e:
            if before is not None:
                engine.restore(before)
            raise NonFiniteLossError(
                f"{e} It happened in update {updates + 1} of {total_updates} of rollout {engine.step + 1}; the model, "
                "the optimiser and the KL coefficient are as they were before this rollout."
            ) from None

        # 8. the KL coefficient follows the rollout's mean per-response KL (over all processes)
        mean_kl = float(engine.global_sum(sum(float(x.sum()) for x in traj["kl"])) / engine.global_sum(n))
        used_kl_coef = kl_ctl.value
        kl_ctl.update(mean_kl, int(engine.global_sum(n)))
        engine.extra_state["kl_ctl"] = kl_ctl.state_dict()
        logged = engine.end_step(metric_sums, updates, grad_norm)
        if logged:  # rollout statistics of this process go with the engine's log line

            def mean(xs):
                return sum(xs) / len(xs)

            rollout_metrics = {
                "rewards/mean": mean(traj["score"]),
                "objective/kl": mean_kl,
                "objective/kl_coef": used_kl_coef,
                "response/length": mean([float(len(ids)) for ids in traj["response_ids"]]),
                "response/finished": mean(traj["finished"]),
                "value/mean": float(masked_mean(tensors["old_values"], tensors["response_mask"])),
                **credit_stats,
                **source_stats(source),  # e.g. seq2seq/truncated_frac
            }
            if "gold" in traj:
                rollout_metrics["rewards/gold"] = mean(traj["gold"])
            engine.log(rollout_metrics)

    if engine.finished and not engine.finished_before:  # a resumed finished run leaves final/ as it is
        final = engine.save_final(tokenizer, model=engine.unwrap().policy)
        if engine.is_main:
            actor_critic = engine.unwrap()
            if actor_critic.value_model is not None:
                actor_critic.value_model.save_pretrained(final / "value_model")
                readable_files(final / "value_model")
            else:
                torch.save(actor_critic.value_head.state_dict(), final / "value_head.pt")
    engine.close()
    return {"history": engine.history, "finished": engine.finished, "out": str(out)}
