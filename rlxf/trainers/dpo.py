"""Direct preference optimisation (Rafailov et al. 2023) with IPO, conservative DPO, soft labels and an SFT term.

Chosen and rejected sequences go through the policy in one forward pass (2B rows, chosen first). The reference
model's log-probs are computed once before training and cached (default), or recomputed every step ("live").
Shapes: B pairs, L sequence length, V vocab.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from rlxf.data import load_preferences
from rlxf.engine import Engine, TrainConfig
from rlxf.logprobs import sequence_logprobs, shift_for_next_token
from rlxf.losses import dpo_loss
from rlxf.packing import check_packing_supported, pack_pairs, packed_sequence_logprobs
from rlxf.tokenization import encode_preferences, pad
from rlxf.trainers.common import load_encoded, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class DPOConfig:
    model: str = ""
    """save_pretrained directory of the policy to start from (usually the SFT model). Required."""
    ref_model: str = ""
    """Reference model directory; empty means the starting policy (`model`)."""
    train_file: str = ""
    """Preference pairs: `prompt`, `chosen`, `rejected` (+ optional `label_prob`). Required."""
    eval_file: str = ""
    """Held-out pairs for the evaluation loss and reward accuracy (optional)."""
    out: str = "runs/dpo"
    """Output directory: metrics, checkpoints, and the final policy in `final/`."""
    max_length: int = 256
    """Longest prompt + response in tokens; longer prompts are cut from the left."""
    max_prompt_length: int = 192
    """Longest prompt in tokens."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed or over-long row does: stop with an error, or be skipped and written to a side file."""
    beta: float = 0.1
    """Strength of the KL constraint to the reference: higher keeps the policy closer."""
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    """'sigmoid' is DPO; 'ipo' is the squared loss of Azar et al. (on summed log-probs)."""
    label_smoothing: float = 0.0
    """Conservative DPO: assume each label is flipped with this probability."""
    use_label_prob: bool = False
    """Train on the row's soft label `label_prob` (when present) instead of a hard 1."""
    sft_weight: float = 0.0
    """Weight of an NLL term on the chosen response (mean over its tokens), as in RPO; 0 disables it."""
    pack: bool = True
    """Pack each micro-batch's pairs into rows without padding, each prompt computed once (same log-probs, fewer
    token positions); needs the 'sdpa' or 'eager' attention implementation."""
    reference: Literal["cached", "live"] = "cached"
    """'cached' computes reference log-probs once before training; 'live' keeps a frozen copy and recomputes."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, batch_size=32, epochs=1.0))
    """Optimisation settings (engine)."""


def collate_dpo(rows: list[dict[str, Any]], pad_id: int, use_label_prob: bool, pack: bool = False) -> dict[str, Any]:
    """2B right-padded sequences (chosen rows first) and their response masks, or the pairs packed (see
    `rlxf.packing`); cached reference log-probs. `num_tokens` counts the tokens of the 2B sequences either way."""
    batch: dict[str, Any] = {
        "num_units": len(rows),
        "num_tokens": sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
    }
    if pack:
        batch |= pack_pairs(rows, pad_id)
    else:
        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
        responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        masks = [[0] * (len(s) - len(resp)) + [1] * len(resp) for s, resp in zip(seqs, responses)]
        batch["input_ids"], batch["attention_mask"] = pad(seqs, pad_id, side="right")
        batch["response_mask"], _ = pad(masks, 0, side="right")
    if "ref_chosen_logp" in rows[0]:
        batch["ref_logps"] = torch.tensor(
            [r["ref_chosen_logp"] for r in rows] + [r["ref_rejected_logp"] for r in rows], dtype=torch.float32
        )
    if use_label_prob and any(r.get("label_prob") is not None for r in rows):
        batch["label_prob"] = torch.tensor([1.0 if r.get("label_prob") is None else r["label_prob"] for r in rows])
    return batch


def response_logps(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens (2B,) and the response token counts (2B,)."""
    if "target_index" in batch:  # packed pairs
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        return packed_sequence_logprobs(model(**kwargs).logits, batch, 2 * batch["num_units"])  # (R, L, V) -> (2B,)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, L, V)
    logits, labels, mask = shift_for_next_token(logits, batch["input_ids"], batch["response_mask"])
    return sequence_logprobs(logits, labels, mask), mask.sum(-1)


@torch.no_grad()
def cache_reference_logps(
    ref: torch.nn.Module, rows: list[dict[str, Any]], pad_id: int, batch_size: int, device, desc: str, pack: bool
) -> None:
    """Store `ref_chosen_logp` / `ref_rejected_logp` in every row."""
    ref.eval()
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, dynamic_ncols=True, leave=False):
        chunk = rows[i : i + batch_size]
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v for k, v in collate_dpo(chunk, pad_id, False, pack).items()
        }
        logps, _ = response_logps(ref, batch)
        chosen, rejected = logps.float().cpu().chunk(2)
        for row, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            row["ref_chosen_logp"], row["ref_rejected_logp"] = c, r


def dpo_batch_loss(
    policy: torch.nn.Module, ref: torch.nn.Module | None, batch: dict[str, Any], cfg: DPOConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed DPO loss of a batch and summed metrics (TRL's names)."""
    logps, lengths = response_logps(policy, batch)
    if ref is not None:
        with torch.no_grad():
            ref_logps, _ = response_logps(ref, batch)
    else:
        ref_logps = batch["ref_logps"]
    chosen_logps, rejected_logps = logps.chunk(2)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen_logps,
        rejected_logps,
        ref_chosen,
        ref_rejected,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        loss_type=cfg.loss_type,
        label_prob=batch.get("label_prob"),
    )
    metrics = {"loss/dpo": losses.detach().sum()}
    if cfg.sft_weight:
        chosen_nll = -chosen_logps / lengths.chunk(2)[0].clamp(min=1)  # mean NLL per chosen token
        losses = losses + cfg.sft_weight * chosen_nll
        metrics["loss/sft"] = chosen_nll.detach().sum()
    margins = chosen_rewards - rejected_rewards
    metrics |= {
        "rewards/chosen": chosen_rewards.sum(),
        "rewards/rejected": rejected_rewards.sum(),
        "rewards/margins": margins.sum(),
        "rewards/accuracies": (margins > 0).float().sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
    }
    return losses.sum(), metrics


def train_dpo(cfg: DPOConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Align `cfg.model` on preference pairs with DPO; returns the metric history and the last evaluation."""
    tokenizer = load_tokenizer(cfg.model)
    if model is None:
        model = AutoModelForCausalLM.from_pretrained(cfg.model)
    out = Path(cfg.out)

    def encoded(path: str, split: str) -> list[dict[str, Any]]:
        lengths = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length}
        return load_encoded(
            load_preferences, encode_preferences, path, tokenizer, out, split, cfg.on_bad_row, **lengths
        )

    rows = encoded(cfg.train_file, "train")
    eval_rows = encoded(cfg.eval_file, "eval") if cfg.eval_file else []
    pad_id = tokenizer.pad_token_id
    engine = Engine(cfg.train, out, model, num_examples=len(rows), config_dict=asdict(cfg))
    policy = engine.model

    # Loaded from disk, not copied from the policy: on resume the policy has already moved.
    ref = AutoModelForCausalLM.from_pretrained(cfg.ref_model or cfg.model).to(engine.device).eval()
    ref.requires_grad_(False)
    if cfg.reference == "cached":
        for split, split_rows in (("train", rows), ("eval", eval_rows)):
            cache_reference_logps(
                ref,
                split_rows,
                pad_id,
                cfg.train.per_device_batch_size,
                engine.device,
                f"reference log-probs ({split})",
                cfg.pack,
            )
        ref = None
    final_eval: dict[str, float] = {}

    @torch.no_grad()
    def evaluate() -> None:
        nonlocal final_eval
        if not (eval_rows and engine.is_main):
            return
        net = engine.unwrap()
        net.eval()
        sums: dict[str, float] = {}
        for i in range(0, len(eval_rows), cfg.train.per_device_batch_size):
            batch = engine.to_device(collate_dpo(eval_rows[i : i + cfg.train.per_device_batch_size], pad_id, False))
            _, metrics = dpo_batch_loss(net, ref, batch, cfg)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.item()
        net.train()
        final_eval = {f"eval/{k.replace('/', '_')}": v / len(eval_rows) for k, v in sums.items()}
        engine.log(final_eval)

    if engine.step == 0:
        evaluate()
    lengths = [len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows]
    if cfg.pack:
        check_packing_supported(engine.unwrap())
    collate = lambda b: collate_dpo(b, pad_id, cfg.use_label_prob, cfg.pack)
    for micro_batches in engine.steps(rows, collate, lengths):
        engine.train_step(micro_batches, lambda batch: dpo_batch_loss(policy, ref, batch, cfg))
        if engine.should_evaluate():
            evaluate()

    if engine.finished:
        engine.save_final(tokenizer)
    engine.close()
    return {"history": engine.history, "eval": final_eval, "finished": engine.finished, "out": str(out)}
