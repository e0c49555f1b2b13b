"""Rejection sampling (best-of-N fine-tuning), with optional sign-agreeing segment masks ("ARJ").

Best-of-N: sample N responses per prompt, keep the one with the highest reward and fine-tune on it with the NLL
(Touvron et al. 2023, Llama 2, §3.2.3 "Rejection Sampling fine-tuning"; Dong et al. 2023, RAFT, arXiv 2304.06767).
rlxf-ASR (arXiv:2411.00809; docs/methods/adaptive_segment_reward.md §2.6): the winner has label +1 and only its tokens whose
segment reward is positive are trained on, L = −(1/Σ w) Σ_t w_t log π_θ(y*_t | x, y*_<t).

One optimiser step (online: the current policy samples, as RAFT iterates):
  1. take the step's prompts from the engine's data order (`train.batch_size` prompts per step);
  2. sample N responses per prompt with the current policy (`rlxf.sampling.generate`), seeded by (seed, step,
     micro-batch, process) so a resumed run samples what the uninterrupted one did;
  3. score them with the reward source (the (B, T) reward contract); a response's reward is the SUM of its token
     rewards; the winner of a prompt is its highest-reward sample (the first one on ties);
  4. credit: the winners' token rewards (from `credit.token_reward`, or the stage's own reward when that is empty)
     are segmented and masked with label +1, all winners of the step in one batch (one τ); a winner whose mask is
     empty is skipped (counted); 'sequence' keeps every token (plain rejection sampling);
  5. the masked NLL of the kept tokens through the engine: summed −w_t log π(y*_t), divided by Σ w over the step;
  6. the winners (prompt columns, response, reward, all N rewards, per-token rewards and keep-mask) are appended to
     OUT/selected.jsonl.

Shapes: P prompts, N samples per prompt, W winners, L prompt + response length, T response tokens, V vocab.
"""

from __future__ import annotations

import json
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
from rlxf.logprobs import weighted_sequence_logprobs
from rlxf.models.lora import LoraSettings, add_lora
from rlxf.rewards.sources import RewardSource, build_reward_source
from rlxf.sampling import GenerationSettings, rollout_seed, sample_rollout
from rlxf.trainers.common import collate_prompts, load_encoded, load_gold_world

logger = logging.getLogger(__name__)


@dataclass
class RejectionSamplingConfig:
    model: str = ""
    """save_pretrained directory of the policy to start from (usually the SFT model). Required."""
    prompts_file: str = ""
    """Prompts: JSONL / Parquet / datasets dir with `prompt` + any metadata the reward needs. Required."""
    reward: str = ""
    """Reward spec that picks the best of N, e.g. 'rm:runs/rm/final', 'factworld:runs/factworld', 'callable:mod:fn'
    (a response's reward is the sum of its token rewards). Required."""
    out: str = "runs/rejection_sampling"
    """Output directory: metrics, checkpoints, selected.jsonl (the winners), and the final policy in `final/`."""
    n: int = 4
    """Responses sampled per prompt; the one with the highest reward is trained on."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Sampling settings (temperature 1 samples the policy itself)."""
    max_prompt_length: int = 192
    """Longest prompt in tokens; longer prompts keep their end."""
    credit: CreditConfig = field(default_factory=CreditConfig)
    """Which tokens of a winner are trained on: 'sequence' all of them (plain rejection sampling); 'token' / 'step' /
    'segment' those whose segment reward is positive (rlxf-ASR "ARJ"), from `credit.token_reward` or, when empty,
    the `reward` itself; τ comes from the token rewards of the step's winners."""
    gold_world: str = ""
    """FactWorld directory whose gold score of the winners is logged (`rewards/gold`), never trained on."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed prompt row does: stop with an error, or be skipped and written to a side file."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (`lora.r` > 0) instead of training every weight: final/ then holds the adapters, which
    `peft.PeftModel.from_pretrained`, `rlxf merge` and every rlxf stage load (README, "LoRA adapters")."""
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=1e-5, batch_size=16, per_device_batch_size=4, max_steps=100)
    )
    """Optimisation settings (engine). Here batch_size counts PROMPTS per step (each sampled n times; one winner
    each) and per_device_batch_size prompts per sampling pass and winners per forward pass."""

    def __post_init__(self) -> None:
        check_ranges(self, {"max_prompt_length": ">=1"})
        if self.n < 1:
            raise UserError(f"n={self.n}: rejection sampling needs at least 1 sample per prompt")


def best_of_n(scores: torch.Tensor) -> torch.Tensor:
    """(P, N) rewards of N samples per prompt -> (P,) index of the best sample of each prompt (the first on ties)."""
    return scores.argmax(-1)  # torch.argmax returns the first maximal index


@torch.no_grad()
def sample_and_select(
    policy: torch.nn.Module,
    rows: list[dict[str, Any]],
    tokenizer: Any,
    source: RewardSource,
    cfg: RejectionSamplingConfig,
    seed: int,
) -> list[dict[str, Any]]:
    """Steps 2-3 for P prompts: one winner per prompt, a dict with `row`, `response_ids`, `text`, `score`, `scores`
    (all N), `sample_index`, `finished`, `token_rewards` (the winner's row of the reward contract) and `mean_score`."""
    r = sample_rollout(policy, rows, tokenizer, cfg.n, cfg.generation, seed, source=source)
    rewards, texts = r.rewards, r.texts  # (P·N, T), (P·N,)
    scores = r.scores.view(len(rows), cfg.n)  # (P, N)
    best = best_of_n(scores)  # (P,)
    winners = []
    for p, (row, j) in enumerate(zip(rows, best.tolist())):
        i = p * cfg.n + j
        winners.append(
            {
                "row": row,
                "response_ids": r.response_ids[i],
                "text": texts[i],
                "score": float(scores[p, j]),
                "scores": scores[p].tolist(),
                "mean_score": float(scores[p].mean()),
                "sample_index": j,
                "finished": r.finished[i],
                "token_rewards": rewards[i, : len(r.response_ids[i])],
            }
        )
    return winners


def winner_batch(winners: list[dict[str, Any]], weights: list[list[float]], pad_id: int) -> dict[str, Any]:
    """Right-padded prompt + response of each winner, `token_weight` (W, L) float aligned with `input_ids` (0 on the
    prompt and padding), and the engine's units: Σ w (the masked NLL is a mean over kept tokens)."""
    seqs = [w["row"]["prompt_ids"] + w["response_ids"] for w in winners]
    input_ids, attention_mask = pad(seqs, pad_id, side="right")  # (W, L)
    token_weight = torch.zeros(input_ids.shape, dtype=torch.float32)  # (W, L)
    for b, (s, w) in enumerate(zip(seqs, weights)):
        token_weight[b, len(s) - len(w) : len(s)] = torch.tensor(w, dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_weight": token_weight,
        "first_response_position": min(len(w["row"]["prompt_ids"]) for w in winners),
        "num_units": float(token_weight.sum()),
        "num_tokens": int(attention_mask.sum()),
    }


def masked_nll(policy: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step 5: Σ_rows Σ_t −w_t log π_θ(y*_t) (the engine divides by Σ w of the step) and summed metrics."""
    # Logits from the position before the batch's earliest response token on: prompt positions that predict no
    # response token skip the LM head and the log-softmax.
    first = batch["first_response_position"]
    keep = batch["input_ids"].shape[1] - first + 1
    logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    labels = batch["input_ids"][:, first:]  # (W, keep-1): position first-1+j predicts token first+j
    weight = batch["token_weight"][:, first:]  # (W, keep-1)
    nll = -weighted_sequence_logprobs(logits[:, :-1], labels, weight).sum()  # (W, keep-1, V) -> ()
    return nll, {"loss/nll": nll.detach()}


def train_rejection_sampling(cfg: RejectionSamplingConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Best-of-`cfg.n` fine-tuning of `cfg.model` on `cfg.prompts_file` against `cfg.reward`, masked by `cfg.credit`;
    returns the metric history."""
    if not cfg.prompts_file or not cfg.reward:
        raise UserError("--prompts-file and --reward are required (see `rlxf rejection-sampling --help`)")
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
    masked = cfg.credit.granularity != "sequence"
    credit_source = None
    if masked and cfg.credit.token_reward:
        credit_source = build_reward_source(cfg.credit.token_reward, device=engine.device)
    world = load_gold_world(cfg.gold_world)
    pad_id = tokenizer.pad_token_id

    # The winners file, one line per winner; on resume lines written after the checkpoint are dropped.
    selected_path = out / ("selected.jsonl" if engine.world_size == 1 else f"selected.rank{engine.rank}.jsonl")
    if selected_path.exists():
        lines = selected_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] < engine.step]
        selected_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    for micro_batches in engine.steps(rows, collate_prompts):
        # 1-3. sample N per prompt and keep the best, one sampling pass per micro-batch of prompts
        winners = []
        for i, mb in enumerate(micro_batches):
            seed = rollout_seed(cfg.train.seed, engine.step, i, engine.rank)
            winners += sample_and_select(engine.unwrap(), mb["rows"], tokenizer, source, cfg, seed)

        # 4. credit of the step's winners (label +1), one batch for τ
        ids = [w["response_ids"] for w in winners]
        rewards = None
        if masked and credit_source is None:  # the stage's own reward, already computed
            rewards = pad_rewards([w["token_rewards"] for w in winners])
        rc = assign_credit(
            cfg.credit, [1] * len(winners), ids, tokenizer, source=credit_source,
            prompt_rows=[w["row"] for w in winners], token_rewards=rewards, texts=[w["text"] for w in winners],
            with_tokens=True,
        )  # fmt: skip
        keep = rc.keep.float()  # (W, T)
        weights = [keep[b, : len(w["response_ids"])].tolist() for b, w in enumerate(winners)]
        trained = [b for b, w in enumerate(weights) if any(w)]
        skipped = len(winners) - len(trained)

        # 5. masked NLL of the kept tokens, micro-batches of per_device_batch_size winners
        size = cfg.train.per_device_batch_size
        if trained:
            batches = [
                engine.to_device(winner_batch([winners[b] for b in chunk], [weights[b] for b in chunk], pad_id))
                for chunk in (trained[i : i + size] for i in range(0, len(trained), size))
            ]
        else:  # every winner masked: a zero-weight pass keeps the step (and the processes) in lockstep
            zero = [[0.0] * len(w) for w in weights[:size]]
            batches = [engine.to_device(winner_batch(winners[:size], zero, pad_id))]
        step = engine.step
        logged = engine.train_step(batches, lambda batch: masked_nll(policy, batch))

        # 6. the winners, with their credit, to selected.jsonl (each process writes its own file)
        with selected_path.open("a", encoding="utf-8") as f:
            for b, w in enumerate(winners):
                record = {k: v for k, v in w["row"].items() if not k.startswith("_") and k != "prompt_ids"}
                record |= {
                    "response": w["text"],
                    "reward": w["score"],
                    "rewards": w["scores"],
                    "sample_index": w["sample_index"],
                    "finished": w["finished"],
                    "step": step,
                    "skipped": not any(weights[b]),
                    "tokens": rc.tokens[b],
                    "token_rewards": rc.token_rewards[b, : len(ids[b])].tolist(),
                    "keep": [int(x) for x in weights[b]],
                }
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

        if logged:  # the engine logs every `log_every` steps; the rollout statistics go with it (this process's)
            metrics = {
                "rewards/mean": sum(w["mean_score"] for w in winners) / len(winners),
                "rewards/best": sum(w["score"] for w in winners) / len(winners),
                "response/length": sum(len(i) for i in ids) / len(ids),
                "asr/skipped_winners": float(skipped),
            }
            if world is not None:
                metrics["rewards/gold"] = sum(world.score(w["row"], w["text"]).score for w in winners) / len(winners)
            if masked:
                metrics |= credit_metrics(credit_counts(rc, [1] * len(winners)))
            engine.log(metrics)

    if engine.finished:
        engine.save_final(tokenizer)
    engine.close()
    return {"history": engine.history, "finished": engine.finished, "out": str(out)}


def pad_rewards(rows: list[torch.Tensor]) -> torch.Tensor:
    """W 1-D reward rows -> (W, T) right-padded with 0."""
    out = torch.zeros(len(rows), max(len(r) for r in rows))
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out
