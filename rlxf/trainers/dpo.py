"""Direct preference optimisation (Rafailov et al. 2023) with IPO, conservative DPO, soft labels and an SFT term.

Chosen and rejected sequences go through the policy in one forward pass (2B rows, chosen first). The reference
model's log-probs are computed once before training and cached (default), or recomputed every step ("live").

Masked DPO ("ADPO", rlxf-ASR, arXiv:2411.00809; docs/methods/adaptive_segment_reward.md §2.6). With `credit.granularity`
other than 'sequence', token rewards from `credit.token_reward` are computed once per pair before training, and each
response gets a keep-mask: chosen (label +1) keeps its tokens whose segment reward is > 0, rejected (label −1) those
whose segment reward is < 0 (`rlxf.credit.agreement_mask`). The masks are stored in the rows; the loss sums the
policy's AND the reference's log-probs over kept tokens only, h = Σ_t m_t (log π_θ(y_t) − log π_ref(y_t)), then
applies the usual DPO loss. A pair whose two masks are both empty is dropped; one-sided pairs are kept.

Shapes: B pairs, L sequence length, V vocab, N response tokens of a packed micro-batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from rlxf.config import check_ranges
from rlxf.credit.segments import CreditConfig
from rlxf.data.formats import load_preferences
from rlxf.data.packing import PackShapes, check_packing_supported, pack_pairs, packed_attention, resolve_pack_shapes
from rlxf.data.tokenize import encode_preferences, pad
from rlxf.engine import Engine, TrainConfig
from rlxf.errors import UserError
from rlxf.hf import load_model, load_tokenizer
from rlxf.logprobs import packed_sequence_logprobs, sequence_logprobs, shift_for_next_token, weighted_sequence_logprobs
from rlxf.losses import dpo_loss
from rlxf.models.lora import LoraSettings, add_lora
from rlxf.trainers.common import check_eval_split, load_reference, load_train_eval

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
    eval_split: float = 0.0
    """Hold out this share of train_file's rows (e.g. 0.1) for evaluation when no eval_file is given: seeded by
    train.seed, deterministic, disjoint from training; the held-out rows are written to `<out>/eval_split.jsonl`.
    In [0, 1); 0 holds out nothing; giving it with eval_file is an error."""
    out: str = "runs/dpo"
    """Output directory: metrics, checkpoints, and the final policy in `final/`."""
    max_length: int = 256
    """Longest prompt + response in tokens; longer prompts are cut from the left."""
    max_prompt_length: int = 192
    """Longest prompt in tokens."""
    on_bad_row: Literal["error", "skip"] = "error"
    """What a malformed or over-long row does: stop with an error, or be skipped and written to a side file."""
    allow_empty_responses: bool = False
    """Keep rows whose response is empty (or only whitespace) instead of rejecting them; the response is then EOS
    alone. Off by default (an empty response is usually a broken export); in HH-RLHF an empty reply is a refusal."""
    truncate_responses: bool = False
    """Cut over-long responses instead of rejecting the row (TRL's rule): the prompt keeps up to max_prompt_length
    tokens, the responses the rest of max_length (a cut response has no EOS); counted and logged."""
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
    pack_length_multiple: int = 0
    """Packed rows are this many tokens long or a multiple of it, so micro-batch shapes repeat (a GPU reuses attention
    plans and memory blocks); same log-probs up to float rounding. 0: 256 on a GPU, 1 (tightest) on the CPU."""
    pack_rows_multiple: int = 0
    """Packed rows per micro-batch rounded up to a multiple of this (rows of padding); 0: 2 on a GPU, 1 on the CPU."""
    packed_attention: Literal["auto", "efficient", "cudnn", "flash", "math"] = "auto"
    """SDPA kernel for packed rows (their block mask): 'auto' lets PyTorch choose (cuDNN on recent GPUs, which builds
    a plan per new shape); 'efficient' the memory-efficient kernel (no plans); 'math' the reference. No effect on
    the CPU beyond 'math'."""
    reference: Literal["cached", "live"] = "cached"
    """'cached' computes reference log-probs once before training; 'live' keeps a frozen copy and recomputes."""
    credit: CreditConfig = field(default_factory=CreditConfig)
    """Which response tokens DPO trains on. 'sequence' (default): all of them (plain DPO). 'token' / 'step' /
    'segment': masked DPO (rlxf-ASR): token rewards from `credit.token_reward` (required then) are computed once per
    pair; chosen keeps the tokens of positive-reward segments, rejected those of negative-reward ones; the mask
    multiplies the policy and the reference log-probs; τ comes from the chosen + rejected rewards of blocks of
    `train.batch_size` pairs in file order (or `credit.tau` when set)."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    """LoRA adapters (`lora.r` > 0) instead of training every weight: final/ then holds the adapters, which
    `peft.PeftModel.from_pretrained`, `rlxf merge` and every rlxf stage load (README, "LoRA adapters")."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, batch_size=32, epochs=1.0))
    """Optimisation settings (engine)."""

    def __post_init__(self) -> None:
        check_ranges(
            self,
            {
                "max_length": ">=2",
                "max_prompt_length": ">=1",
                "beta": ">0",
                "label_smoothing": "[0,0.5)",
                "sft_weight": ">=0",
                "pack_length_multiple": ">=0",
                "pack_rows_multiple": ">=0",
            },
        )
        check_eval_split(self.eval_split, self.eval_file)
        if self.credit.granularity != "sequence" and not self.credit.token_reward:
            raise UserError(
                f"credit.granularity={self.credit.granularity!r} needs credit.token_reward, a reward spec whose token "
                "rewards are segmented, e.g. 'rm:runs/rm/final:token', 'dpo:runs/dpo0/final' or "
                "'factworld:runs/factworld:token' (or use credit.granularity='sequence' for plain DPO)"
            )


def collate_dpo(
    rows: list[dict[str, Any]],
    pad_id: int,
    use_label_prob: bool,
    pack: bool = False,
    shapes: PackShapes = PackShapes(),
) -> dict[str, Any]:
    """2B right-padded sequences (chosen rows first) and their response masks, or the pairs packed in `shapes` (see
    `rlxf.data.packing`); cached reference log-probs. `num_tokens` counts the tokens of the 2B sequences either way.

    Rows with ASR keep-masks (`chosen_weight`, `rejected_weight`: one weight per response token) add the token
    weights: `token_weight` (2B, L) float aligned with `input_ids` (0 on prompt and padding), or, packed,
    `target_weight` (N,) aligned with `target_index`."""
    batch: dict[str, Any] = {
        "num_units": len(rows),
        "num_tokens": sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows),
    }
    weighted = "chosen_weight" in rows[0]
    weights = [r["chosen_weight"] for r in rows] + [r["rejected_weight"] for r in rows] if weighted else []
    if pack:
        batch |= pack_pairs(rows, pad_id, length_multiple=shapes.length_multiple, rows_multiple=shapes.rows_multiple)
        if weighted:
            # Targets of one sequence appear in order (token 0, 1, ...), so a running count per sequence finds each
            # target's token. O(N) in Python, once per micro-batch.
            seen = [0] * len(weights)
            target_weight = []
            for seq in batch["target_seq"].tolist():
                target_weight.append(weights[seq][seen[seq]])
                seen[seq] += 1
            batch["target_weight"] = torch.tensor(target_weight, dtype=torch.float32)  # (N,)
    else:
        seqs = [r["prompt_ids"] + r["chosen_ids"] for r in rows] + [r["prompt_ids"] + r["rejected_ids"] for r in rows]
        responses = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
        masks = [[0] * (len(s) - len(resp)) + [1] * len(resp) for s, resp in zip(seqs, responses)]
        batch["input_ids"], batch["attention_mask"] = pad(seqs, pad_id, side="right")
        batch["response_mask"], _ = pad(masks, 0, side="right")
        if weighted:
            token_weight = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)  # (2B, L)
            for b, (s, w) in enumerate(zip(seqs, weights)):
                token_weight[b, len(s) - len(w) : len(s)] = torch.tensor(w, dtype=torch.float32)
            batch["token_weight"] = token_weight
    if "ref_chosen_logp" in rows[0]:
        batch["ref_logps"] = torch.tensor(
            [r["ref_chosen_logp"] for r in rows] + [r["ref_rejected_logp"] for r in rows], dtype=torch.float32
        )
    if use_label_prob and any(r.get("label_prob") is not None for r in rows):
        batch["label_prob"] = torch.tensor([1.0 if r.get("label_prob") is None else r["label_prob"] for r in rows])
    return batch


def response_logps(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of the response tokens (2B,) and the response token counts (2B,); with ASR token weights in
    the batch, the weighted sums Σ_t w_t log π(y_t) and the weight sums Σ_t w_t."""
    if "target_index" in batch:  # packed pairs
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
        logits = model(**kwargs).logits  # (R, L, V)
        if "target_weight" in batch:
            return packed_sequence_logprobs(logits, batch, 2 * batch["num_units"], batch["target_weight"])
        return packed_sequence_logprobs(logits, batch, 2 * batch["num_units"])  # (R, L, V) -> (2B,)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (2B, L, V)
    logits, labels, mask = shift_for_next_token(logits, batch["input_ids"], batch["response_mask"])
    if "token_weight" in batch:
        weight = batch["token_weight"][:, 1:]  # (2B, L-1), aligned like the mask
        return weighted_sequence_logprobs(logits, labels, weight), weight.sum(-1)
    return sequence_logprobs(logits, labels, mask), mask.sum(-1)


@torch.no_grad()
def cache_reference_logps(
    ref: torch.nn.Module,
    rows: list[dict[str, Any]],
    pad_id: int,
    batch_size: int,
    device,
    desc: str,
    pack: bool,
    shapes: PackShapes = PackShapes(),
    precision: Callable[[], AbstractContextManager] = nullcontext,
) -> None:
    """Store `ref_chosen_logp` / `ref_rejected_logp` in every row; the forward passes run under `precision()` (the
    policy's autocast), so the cached numbers are those a live reference would give."""
    ref.eval()
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, dynamic_ncols=True, leave=False):
        chunk = rows[i : i + batch_size]
        collated = collate_dpo(chunk, pad_id, False, pack, shapes)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collated.items()}
        with precision():
            logps, _ = response_logps(ref, batch)
        chosen, rejected = logps.float().cpu().chunk(2)
        for row, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
            row["ref_chosen_logp"], row["ref_rejected_logp"] = c, r


def dpo_batch_loss(
    policy: torch.nn.Module,
    ref: torch.nn.Module | None,
    batch: dict[str, Any],
    cfg: DPOConfig,
    ref_precision: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Summed DPO loss of a batch and summed metrics (TRL's names). A live `ref` runs under `ref_precision()`: the
    engine's autocast, which wraps only the prepared policy's forward, so the reference gets the policy's precision
    (bf16 on a GPU) instead of running in fp32."""
    logps, lengths = response_logps(policy, batch)
    if ref is not None:
        with torch.no_grad(), ref_precision():
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


RESPONSE_FIELDS = ("chosen", "rejected")


def scoring_prompt_row(raw: dict[str, Any], encoded: dict[str, Any]) -> dict[str, Any]:
    """What a reward source reads about a pair's prompt: the loaded row's columns (prompt text, metadata such as
    FactWorld's) without the responses, and the encoded (possibly cut) `prompt_ids` the policy sees."""
    return {k: v for k, v in raw.items() if k not in RESPONSE_FIELDS} | {"prompt_ids": encoded["prompt_ids"]}


def assign_pair_credit(
    rows: list[dict[str, Any]],
    prompt_rows: list[dict[str, Any]],
    tokenizer: Any,
    credit: CreditConfig,
    source: Any,
    block: int,
) -> dict[str, float]:
    """ASR keep-masks of every pair, stored in the rows as `chosen_weight` / `rejected_weight` (one 0/1 weight per
    response token); returns the summed counts (`rlxf.credit.inspect.credit_counts`, plus `one_sided_pairs` and
    `dropped_pairs`: both masks empty).

    Pairs are taken in blocks of `block` (file order); a block's 2·block responses (chosen label +1, rejected −1)
    are scored by `source` in one call and share one τ (docs/methods/adaptive_segment_reward.md §2.4 step 2: chosen and rejected together).
    """
    from rlxf.credit.assign import assign_credit, credit_counts

    totals: dict[str, float] = {"one_sided_pairs": 0.0, "dropped_pairs": 0.0}
    for start in range(0, len(rows), block):
        chunk, prompts = rows[start : start + block], prompt_rows[start : start + block]
        n = len(chunk)
        labels = [1] * n + [-1] * n
        ids = [r["chosen_ids"] for r in chunk] + [r["rejected_ids"] for r in chunk]
        rc = assign_credit(credit, labels, ids, tokenizer, source=source, prompt_rows=prompts + prompts)
        keep = rc.keep.float()  # (2n, T)
        for i, row in enumerate(chunk):
            row["chosen_weight"] = keep[i, : len(row["chosen_ids"])].tolist()
            row["rejected_weight"] = keep[n + i, : len(row["rejected_ids"])].tolist()
        kept_c, kept_r = rc.keep[:n].any(-1), rc.keep[n:].any(-1)  # (n,) each
        totals["one_sided_pairs"] += float((kept_c ^ kept_r).sum())
        totals["dropped_pairs"] += float((~kept_c & ~kept_r).sum())
        for k, v in credit_counts(rc, labels).items():
            totals[k] = totals.get(k, 0.0) + v
    return totals


def train_dpo(cfg: DPOConfig, model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Align `cfg.model` on preference pairs with DPO (masked by `cfg.credit`); returns the metric history and the
    last evaluation."""
    tokenizer = load_tokenizer(cfg.model)
    if model is None:
        model = load_model(cfg.model, tokenizer=tokenizer, **cfg.train.load_kwargs())
    model = add_lora(model, cfg.lora, cfg.model, cfg.train.seed)
    out = Path(cfg.out)

    def encoded(raw: list[dict[str, Any]], split: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Encoded pairs and, for each, the prompt row a token-reward source reads. In skip mode the rows rejected
        when loading or encoding go to `rejected_<split>.jsonl` / `rejected_tokenized_<split>.jsonl` in `out`."""
        if not raw:
            return [], []
        enc = encode_preferences(
            raw,
            tokenizer,
            on_bad_row=cfg.on_bad_row,
            rejected_path=out / f"rejected_tokenized_{split}.jsonl",
            max_length=cfg.max_length,
            max_prompt_length=cfg.max_prompt_length,
            truncate_responses=cfg.truncate_responses,
        )
        by_origin = {r["_origin"]: r for r in raw}
        return enc, [scoring_prompt_row(by_origin[r["_origin"]], r) for r in enc]

    load = functools.partial(load_preferences, allow_empty_responses=cfg.allow_empty_responses)
    raw_train, raw_eval = load_train_eval(
        load, cfg.train_file, cfg.eval_file, cfg.eval_split, cfg.train.seed, out, cfg.on_bad_row
    )
    rows, prompt_rows = encoded(raw_train, "train")
    eval_rows, eval_prompt_rows = encoded(raw_eval, "eval")

    # ASR: token rewards and keep-masks, once per pair, before the reference log-probs (which use the masks).
    asr_metrics: dict[str, float] = {}
    if cfg.credit.granularity != "sequence":
        from rlxf.credit.assign import credit_metrics
        from rlxf.rewards.sources import build_reward_source

        source = build_reward_source(cfg.credit.token_reward)
        for split, split_rows, split_prompts in (("train", rows, prompt_rows), ("eval", eval_rows, eval_prompt_rows)):
            if not split_rows:
                continue
            counts = assign_pair_credit(split_rows, split_prompts, tokenizer, cfg.credit, source, cfg.train.batch_size)
            metrics = credit_metrics(counts) | {
                "asr/dropped_pairs": counts["dropped_pairs"],
                "asr/one_sided_pairs": counts["one_sided_pairs"],
            }
            logger.info(
                "ASR masks (%s, %s granularity, token rewards %s): %s",
                split,
                cfg.credit.granularity,
                cfg.credit.token_reward,
                ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
            )
            if split == "train":
                asr_metrics = metrics
        del source  # a reward model or DPO pair of models: free it before training
        rows = [r for r in rows if any(r["chosen_weight"]) or any(r["rejected_weight"])]
        eval_rows = [r for r in eval_rows if any(r["chosen_weight"]) or any(r["rejected_weight"])]
        if not rows:
            raise UserError(
                f"every training pair lost both masks (credit.granularity={cfg.credit.granularity!r}, token rewards "
                f"{cfg.credit.token_reward}): nothing to train on; check the token rewards with `rlxf segments show`"
            )
    pad_id = tokenizer.pad_token_id
    engine = Engine(cfg.train, out, model, num_examples=len(rows), config_dict=asdict(cfg))
    policy = engine.model
    if asr_metrics and engine.step == 0:
        engine.log(asr_metrics)  # once, at step 0: what the masks keep of the training pairs

    ref = load_reference(cfg.model, cfg.ref_model, cfg.lora, engine.unwrap(), cfg.train, engine.device)
    shapes = resolve_pack_shapes(cfg.pack_length_multiple, cfg.pack_rows_multiple, engine.device)
    ref_precision = engine.accelerator.autocast
    if cfg.reference == "cached":
        for split, split_rows in (("train", rows), ("eval", eval_rows)):
            with packed_attention(cfg.packed_attention if cfg.pack else "auto"):
                cache_reference_logps(
                    ref,
                    split_rows,
                    pad_id,
                    cfg.train.per_device_batch_size,
                    engine.device,
                    f"reference log-probs ({split})",
                    cfg.pack,
                    shapes,
                    ref_precision,
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
            _, metrics = dpo_batch_loss(net, ref, batch, cfg, ref_precision)
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
    collate = lambda b: collate_dpo(b, pad_id, cfg.use_label_prob, cfg.pack, shapes)
    for micro_batches in engine.steps(rows, collate, lengths):
        with packed_attention(cfg.packed_attention if cfg.pack else "auto"):
            engine.train_step(micro_batches, lambda batch: dpo_batch_loss(policy, ref, batch, cfg, ref_precision))
        if engine.should_evaluate():
            evaluate()

    if engine.finished:
        engine.save_final(tokenizer)
    engine.close()
    return {"history": engine.history, "eval": final_eval, "finished": engine.finished, "out": str(out)}
