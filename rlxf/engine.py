"""The one training engine every stage uses.

It owns what is the same for SFT, reward models, DPO and RL updates: the data order (seeded, resumable, length-
bucketed), gradient accumulation with exact normalisation, LR schedule, clipping, mixed precision, logging
(progress bar, JSONL, TensorBoard), atomic checkpoints and exact resume, and multi-process runs through
Accelerate (DDP on GPUs or gloo on CPUs; FSDP / DeepSpeed through Accelerate's own config files).

A stage keeps its algorithm in plain sight and hands the engine a loss function:

    engine = Engine(cfg.train, out_dir, model, num_examples=len(rows), lengths=lengths)
    for micro_batches in engine.steps(rows, collate):
        engine.train_step(micro_batches, loss_fn)       # loss_fn(batch) -> (summed loss, summed metrics)

Loss functions return *sums* over their units (tokens for SFT, pairs for reward models and DPO) and every batch
says how many units it holds (`batch["num_units"]`). The engine divides by the number of units in the whole
optimiser step, over all micro-batches and processes, so batch 8 × accumulation 1, batch 1 × accumulation 8 and
2 processes × batch 4 produce the same gradient.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_scheduler

logger = logging.getLogger(__name__)

LossFn = Callable[[dict[str, Any]], tuple[Tensor, dict[str, Tensor]]]


class NonFiniteLossError(RuntimeError):
    """A loss or gradient was NaN or infinite; the step was not applied."""


@dataclass
class TrainConfig:
    batch_size: int = 32
    """Examples per optimiser step, summed over processes and accumulation (pairs for RM/DPO, rows for SFT)."""
    per_device_batch_size: int = 8
    """Examples per forward pass on one process; lower it if memory runs out, accumulation makes up the rest."""
    max_steps: int = 0
    """Optimiser steps to train; 0 means derive it from `epochs`."""
    epochs: float = 1.0
    """Passes over the training data, used when max_steps is 0."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warm-up."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to `lr`."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """'auto' uses bf16 on a GPU that supports it and fp32 otherwise."""
    seed: int = 0
    """Seed of the data order and of every random draw in training."""
    length_bucketing: bool = True
    """Sort each step's examples by length before cutting micro-batches, so padding is small."""
    log_every: int = 1
    """Write metrics every N steps."""
    eval_every: int = 0
    """Evaluate on the held-out set every N steps (0: only at the end)."""
    save_every: int = 0
    """Write a checkpoint every N steps (0: only when stopping early)."""
    keep_checkpoints: int = 2
    """How many most recent checkpoints to keep."""
    resume: bool = False
    """Continue from the latest checkpoint in the output directory, exactly where it stopped."""
    stop_after: int = 0
    """Stop after this many steps with a checkpoint (e.g. to fit a time slot); 0 runs to the end."""
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    """Where metrics go besides metrics.jsonl."""
    progress: bool = True
    """Show a progress bar with ETA."""


def resolve_mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def several_cpu_processes() -> bool:
    """True for a multi-process launch (torchrun sets WORLD_SIZE) on a machine without CUDA.

    Accelerate sets up its gloo process group for CPU processes only when told the run is on the CPU; without this
    each process would silently train alone.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    per_pass = cfg.per_device_batch_size * world_size
    if cfg.batch_size % per_pass:
        raise ValueError(
            f"batch_size={cfg.batch_size} is not a multiple of per_device_batch_size × processes = "
            f"{cfg.per_device_batch_size} × {world_size}; change one of them"
        )
    return cfg.batch_size // per_pass


class Engine:
    """Optimiser, schedule, data order, logging and checkpoints around one trainable model."""

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        model: torch.nn.Module,
        num_examples: int,
        config_dict: dict[str, Any] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
    ):
        """`param_groups`: optimiser parameter groups (torch's format, e.g. a group with its own "lr") instead of
        all of `model`'s parameters at `cfg.lr`; the schedule scales every group's rate alike."""
        if num_examples <= 0:
            raise ValueError("no training examples: check the data file and --on-bad-row")
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
        if AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
            # Accelerate allows one precision per process; a pipeline, experiment or test suite that trains one model
            # in bf16 and the next in fp32 would fail. The process group (PartialState) is kept.
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=several_cpu_processes())
        set_seed(cfg.seed)
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.grad_accum = accumulation_steps(cfg, self.world_size)
        self.num_examples = num_examples
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * num_examples / cfg.batch_size))

        params: list[Any] = [p for p in model.parameters() if p.requires_grad]
        if param_groups is not None:  # e.g. PPO's critic with its own learning rate
            params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in param_groups]
        # One fused kernel for all parameters instead of a Python loop over them (CPU and CUDA, torch >= 2.4): the same
        # update up to float rounding, ~4x less optimiser time on small models.
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        self.scheduler = get_scheduler(
            cfg.lr_schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=self.total_steps
        )
        # The scheduler is not passed to prepare(): Accelerate would step it once per process.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)

        self.step = 0
        self.finished = False
        # JSON-able state of the algorithm (e.g. PPO's adaptive KL coefficient), saved with every checkpoint and
        # restored by resume.
        self.extra_state: dict[str, Any] = {}
        self._perm_cache: tuple[int, list[int]] | None = None
        self._last_log_time = time.perf_counter()
        self._tokens_since_log = 0
        self.history: dict[str, list[float]] = {}

        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            if config_dict is not None:
                (self.out_dir / "config.json").write_text(json.dumps(config_dict, indent=2, default=str))
        self.accelerator.wait_for_everyone()
        if cfg.resume:
            self._resume_latest()
        self._metrics_file = self.out_dir / "metrics.jsonl"
        if self.is_main:
            self._truncate_metrics_after(self.step)
        self._tb = None
        if self.is_main and cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        self._bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (self.is_main and cfg.progress),
            desc=self.out_dir.name,
            dynamic_ncols=True,
        )
        logger.info(
            "training %d steps: %d examples/step = %d per pass × %d processes × %d accumulation",
            self.total_steps,
            cfg.batch_size,
            cfg.per_device_batch_size,
            self.world_size,
            self.grad_accum,
        )

    # ------------------------------------------------------------------ data order
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def unwrap(self, model: torch.nn.Module | None = None) -> torch.nn.Module:
        return self.accelerator.unwrap_model(model if model is not None else self.model)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm_cache = (epoch, torch.randperm(self.num_examples, generator=g).tolist())
        return self._perm_cache[1]

    def step_indices(self, step: int) -> list[int]:
        """The examples of optimiser step `step`: a window on the concatenation of seeded per-epoch shuffles.

        The order depends only on (seed, step), which is what makes resume exact and makes the split across
        processes and micro-batches irrelevant to which examples a step sees.
        """
        first = step * self.cfg.batch_size
        return [
            self._epoch_order(pos // self.num_examples)[pos % self.num_examples]
            for pos in range(first, first + self.cfg.batch_size)
        ]

    def micro_batch_indices(self, step: int, lengths: Sequence[int] | None) -> list[list[int]]:
        """This process's micro-batches of step `step` (lists of example indices)."""
        idx = self.step_indices(step)
        if self.cfg.length_bucketing and lengths is not None:
            idx = sorted(idx, key=lambda i: (-lengths[i], i))
        size = self.cfg.per_device_batch_size
        chunks = [idx[i : i + size] for i in range(0, len(idx), size)]
        return chunks[self.rank :: self.world_size]

    def steps(
        self,
        rows: Sequence[Any],
        collate: Callable[[list[Any]], dict[str, Any]],
        lengths: Sequence[int] | None = None,
    ) -> Iterator[list[dict[str, Any]]]:
        """Yield this process's collated micro-batches, one list per optimiser step, until training ends."""
        if len(rows) != self.num_examples:
            raise ValueError(f"engine was built for {self.num_examples} examples, got {len(rows)}")
        while self.step < self.total_steps:
            if self.cfg.stop_after and self.step >= self.cfg.stop_after:
                self.save_checkpoint()
                logger.info("stopped at step %d; continue with --train.resume", self.step)
                return
            yield [
                self.to_device(collate([rows[i] for i in chunk]))
                for chunk in self.micro_batch_indices(self.step, lengths)
            ]
        self.finished = True

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    # ------------------------------------------------------------------ one optimiser step
    def count_units(self, micro_batches: list[dict[str, Any]]) -> Tensor:
        """Units (tokens or pairs) in the whole optimiser step, over all micro-batches and processes."""
        local = torch.tensor(float(sum(b["num_units"] for b in micro_batches)), device=self.device)
        return self.accelerator.reduce(local, reduction="sum") if self.world_size > 1 else local

    def global_sum(self, value: float | Tensor) -> Tensor:
        """A number summed over processes (e.g. the kept tokens of a PPO minibatch), as a tensor on this device."""
        local = torch.as_tensor(value, dtype=torch.float32, device=self.device).clone()
        return self.accelerator.reduce(local, reduction="sum") if self.world_size > 1 else local

    def train_step(self, micro_batches: list[dict[str, Any]], loss_fn: LossFn) -> dict[str, float]:
        """Forward/backward every micro-batch, then clip and apply one update. Returns the logged metrics."""
        total_units = self.count_units(micro_batches).clamp(min=1)
        metric_sums, grad_norm = self.update(micro_batches, loss_fn, total_units)
        return self.end_step(metric_sums, total_units, grad_norm)

    def update(
        self, micro_batches: list[dict[str, Any]], loss_fn: LossFn, total_units: Tensor | float
    ) -> tuple[dict[str, Tensor], Tensor]:
        """One optimiser update from `micro_batches`, whose loss sums are divided by `total_units` (all processes).

        Does not advance the step: SFT, DPO and RLOO make one update per step (`train_step`); PPO makes several per
        rollout (epochs × minibatches) and then calls `end_step` once. Returns the summed metrics and the gradient
        norm before clipping.
        """
        metric_sums: dict[str, Tensor] = {}
        self.model.train()
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced once per update, on the last micro-batch, not after every backward.
            sync = nullcontext() if last or self.world_size == 1 else self.accelerator.no_sync(self.model)
            with sync:
                loss_sum, metrics = loss_fn(batch)
                self._check_finite(loss_sum, f"loss of micro-batch {i}")
                # DDP averages gradients over processes; × world_size turns that average into the global sum.
                self.accelerator.backward(loss_sum * (self.world_size / total_units))
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float()
            self._tokens_since_log += int(batch.get("num_tokens", 0))

        grad_norm = self._clip_and_check_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metric_sums, grad_norm

    def end_step(
        self, metric_sums: dict[str, Tensor], total_units: Tensor | float, grad_norm: Tensor
    ) -> dict[str, float]:
        """Close optimiser step `step`: advance the schedule and the step, log `metric_sums / total_units`, and
        checkpoint when due. Returns the logged metrics ({} when this step is not logged)."""
        self.scheduler.step()
        self.step += 1
        logged = self._log_train(metric_sums, torch.as_tensor(total_units, device=self.device), grad_norm)
        if self.cfg.save_every and self.step % self.cfg.save_every == 0:
            self.save_checkpoint()
        return logged

    def _check_finite(self, value: Tensor, what: str) -> None:
        bad = (~torch.isfinite(value.detach())).float().reshape(())
        if self.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if bad.item() > 0:  # a host sync, needed to stop before the update
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"non-finite {what} ({value.detach().float().item()}) at step {self.step + 1}; no update was applied. "
                "Lower --train.lr, check the data for extreme values, or use --train.mixed_precision no."
            )

    def _clip_and_check_gradients(self) -> Tensor:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.max_grad_norm > 0:
            norm = self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
        else:
            grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
            norm = torch.stack(grads).norm() if grads else torch.zeros((), device=self.device)
        self._check_finite(norm, "gradient norm")
        return norm

    # ------------------------------------------------------------------ logging
    def _log_train(self, metric_sums: dict[str, Tensor], total_units: Tensor, grad_norm: Tensor) -> dict[str, float]:
        if self.step % self.cfg.log_every and self.step != self.total_steps:
            self._bar.update(1)
            return {}
        sums = dict(metric_sums)
        if self.world_size > 1:
            sums = {k: self.accelerator.reduce(v, reduction="sum") for k, v in sums.items()}
        logged = {k: (v / total_units).item() for k, v in sums.items()}
        now = time.perf_counter()
        logged["train/lr"] = self.scheduler.get_last_lr()[0]
        logged["train/grad_norm"] = float(grad_norm)
        if self._tokens_since_log:
            logged["perf/tokens_per_s"] = (
                self._tokens_since_log * self.world_size / max(now - self._last_log_time, 1e-9)
            )
        if torch.cuda.is_available():
            logged["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self._last_log_time, self._tokens_since_log = now, 0
        self.log(logged)
        self._bar.update(1)
        shown = {
            k.split("/")[-1]: f"{v:.4g}" for k, v in logged.items() if k.startswith(("loss/", "eval/", "rewards/"))
        }
        self._bar.set_postfix(shown, refresh=False)
        return logged

    def log(self, metrics: dict[str, float]) -> None:
        """Record metrics at the current step (rank 0 only): history, metrics.jsonl and TensorBoard."""
        if not self.is_main:
            return
        for k, v in metrics.items():
            self.history.setdefault(k, []).append(v)
        with self._metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, self.step)

    def should_evaluate(self) -> bool:
        every = self.cfg.eval_every
        return (bool(every) and self.step % every == 0) or self.step == self.total_steps

    def _truncate_metrics_after(self, step: int) -> None:
        """On resume, drop metric lines written after the checkpoint, so the file has each step once."""
        if not self._metrics_file.exists():
            return
        keep = [
            line
            for line in self._metrics_file.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step
        ]
        self._metrics_file.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, RNG states and data position, written under a temporary name and renamed.

        A crash leaves the previous checkpoint or the new one, never half of one.
        """
        final = self.checkpoint_dir / f"step-{self.step:07d}"
        tmp = self.checkpoint_dir / f".tmp-step-{self.step:07d}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {
                "step": self.step,
                "total_steps": self.total_steps,
                "world_size": self.world_size,
                "extra": self.extra_state,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.cfg.keep_checkpoints or None]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def _resume_latest(self) -> None:
        found = sorted(self.checkpoint_dir.glob("step-*"))
        if not found:
            logger.warning("--train.resume: no checkpoint in %s, starting from scratch", self.checkpoint_dir)
            return
        latest = found[-1]
        state = json.loads((latest / "trainer_state.json").read_text())
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"checkpoint {latest} was written by {state['world_size']} processes, this run has {self.world_size}; "
                "resume with the same number of processes"
            )
        self.accelerator.load_state(str(latest))
        self.step = state["step"]
        self.extra_state = state.get("extra", {})
        logger.info("resumed from %s at step %d", latest, self.step)

    def save_final(self, tokenizer: Any, name: str = "final", model: Any = None) -> Path:
        """The trained model (or `model`, e.g. the policy inside an actor-critic) and its tokenizer as one
        `save_pretrained` directory, out_dir/name.

        Written by rank 0 under a temporary name and renamed, so a crash never leaves half a model behind.
        """
        target = self.out_dir / name
        self.accelerator.wait_for_everyone()
        if self.is_main:
            tmp = self.out_dir / f".tmp-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            (model if model is not None else self.unwrap()).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        self.accelerator.wait_for_everyone()
        return target

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
