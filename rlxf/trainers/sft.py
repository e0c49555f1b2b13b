"""Supervised fine-tuning: next-token NLL on completion tokens only.

Shapes: B batch, L sequence length, V vocab.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from rlxf.config import check_ranges
from rlxf.data.formats import load_sft
from rlxf.data.tokenize import encode_sft, pad
from rlxf.engine import Engine, TrainConfig
from rlxf.hf import load_model, load_tokenizer
from rlxf.logprobs import shift_for_next_token, token_logprobs
from rlxf.models.lora import LoraSettings, add_lora
from rlxf.trainers.common import check_eval_split, load_encoded_splits

logger = logging.getLogger(__name__)


@dataclass
class SFTConfig:
    model: str = ""
    """save_pretrained directory of the causal LM to fine-tune (from `rlxf tiny-model` or any HF model). Required."""
    train_file: str = ""
    """SFT data: JSONL / Parquet / datasets dir with `prompt` + `completion` or `messages`. Required."""
    eval_file: str = ""
    """Held-out SFT data for the evaluation loss (optional)."""
    eval_split: float = 0.0
    """Hold out this share of train_file's rows (e.g. 0.1) for evaluation when no eval_file is given: seeded by
    train.seed, deterministic, disjoint from training; the held-out rows are written to `<out>/eval_split.jsonl`.
    In [0, 1); 0 holds out nothing; giving it with eval_file is an error."""
    out: str = "runs/sft"
    """Output directory: metrics, checkpoints, and the final model in `final/`."""
    max_length: int = 256
    """Longest prompt + completion in tokens; longer prompts are cut from the left."""
    max_prompt_length: int = 192
    """Longest prompt in tokens before the completion is appended."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed or over-long row does: stop with an error, or be skipped and written to a side file."""
    from_preferences: bool = False
    """train_file / eval_file are preference files (`prompt`, `chosen`, `rejected`, or HH-RLHF implicit-prompt
    `chosen` / `rejected` dialogues): train on prompt + `chosen`; `rejected` is not read."""
    assistant_turns: Literal["all", "last"] = "all"
    """For `messages` rows: train on every assistant turn ('all', the other turns masked out) or on the last one only
    ('last', earlier turns are context)."""
    allow_empty_responses: bool = False
    """Keep rows whose response is empty (or only whitespace) instead of rejecting them; the response is then EOS
    alone. Off by default (an empty response is usually a broken export); in HH-RLHF an empty reply is a refusal."""
    truncate_responses: bool = False
    """Cut over-long responses instead of rejecting the row (TRL's rule): the prompt keeps up to max_prompt_length
    tokens, the responses the rest of max_length (a cut response has no EOS); counted and logged."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (`lora.r` > 0) instead of training every weight: final/ then holds the adapters, which
    `peft.PeftModel.from_pretrained`, `rlxf merge` and every rlxf stage load (README, "LoRA adapters")."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, batch_size=32, epochs=3.0))
    """Optimisation settings (engine)."""

    def __post_init__(self) -> None:
        check_ranges(self, {"max_length": ">=2", "max_prompt_length": ">=1"})
        check_eval_split(self.eval_split, self.eval_file)


def collate_sft(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    ids, attention_mask = pad([r["input_ids"] for r in rows], pad_id, side="right")
    completion_mask, _ = pad([r["completion_mask"] for r in rows], 0, side="right")
    return {
        "input_ids": ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "num_units": int(completion_mask[:, 1:].sum()),  # predicted completion tokens
        "num_tokens": int(attention_mask.sum()),
    }


def completion_nll(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of the completion tokens and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L, V)
    logits, labels, mask = shift_for_next_token(logits, batch["input_ids"], batch["completion_mask"])
    logps = token_logprobs(logits, labels)  # (B, L-1)
    mask = mask.float()
    return -(logps * mask).sum(), mask.sum()


@torch.no_grad()
def evaluate_nll(model: torch.nn.Module, rows: list[dict[str, Any]], pad_id: int, batch_size: int, device) -> float:
    """Mean NLL per completion token over `rows`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0.0
    for i in range(0, len(rows), batch_size):
        batch = {
            k: v.to(device) if torch.is_tensor(v) else v
            for k, v in collate_sft(rows[i : i + batch_size], pad_id).items()
        }
        nll, n = completion_nll(model, batch)
        total, count = total + nll.item(), count + n.item()
    model.train(was_training)
    return total / max(count, 1.0)


def train_sft(cfg: SFTConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `cfg.train_file`; returns the metric history and the final evaluation."""
    tokenizer = load_tokenizer(cfg.model)
    if model is None:
        model = load_model(cfg.model, tokenizer=tokenizer, **cfg.train.load_kwargs())
    model = add_lora(model, cfg.lora, cfg.model, cfg.train.seed)
    out = Path(cfg.out)
    load = functools.partial(
        load_sft,
        assistant_turns=cfg.assistant_turns,
        from_preferences=cfg.from_preferences,
        allow_empty_responses=cfg.allow_empty_responses,
    )
    rows, eval_rows = load_encoded_splits(
        load,
        encode_sft,
        cfg,
        tokenizer,
        out,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        truncate_responses=cfg.truncate_responses,
    )
    pad_id = tokenizer.pad_token_id
    engine = Engine(cfg.train, out, model, num_examples=len(rows), config_dict=asdict(cfg))
    policy = engine.model

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        nll_sum, _ = completion_nll(policy, batch)
        return nll_sum, {"loss/nll": nll_sum.detach()}

    def evaluate() -> None:
        if eval_rows and engine.is_main:
            nll = evaluate_nll(engine.unwrap(), eval_rows, pad_id, cfg.train.per_device_batch_size, engine.device)
            engine.log({"eval/nll": nll})

    if engine.step == 0:
        evaluate()  # the starting point, so the curve shows what training changed
    lengths = [len(r["input_ids"]) for r in rows]
    for micro_batches in engine.steps(rows, lambda b: collate_sft(b, pad_id), lengths):
        engine.train_step(micro_batches, loss_fn)
        if engine.should_evaluate():
            evaluate()

    if engine.finished:
        engine.save_final(tokenizer)
    engine.close()
    return {"history": engine.history, "finished": engine.finished, "out": str(out)}
