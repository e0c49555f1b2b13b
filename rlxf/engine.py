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
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import set_seed
from torch import Tensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from rlxf.errors import UserError
from rlxf.hf import readable_files

logger = logging.getLogger(__name__)

LossFn = Callable[[dict[str, Any]], tuple[Tensor, dict[str, Tensor]]]


class NonFiniteLossError(UserError, RuntimeError):
    """A loss or gradient was NaN or infinite; the step was not applied."""


class RunDirError(UserError):
    """An output directory that cannot take this run: it holds another run, its checkpoint was written with other
    settings, or it is not writable. A ValueError, so the CLI prints it as one `rlxf: error:` line."""


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
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """dtype of the weights every model of the stage is loaded in (policy, reference, reward and value models).
    float32 keeps fp32 master weights under `mixed_precision` (the safe default); bfloat16 halves the memory of
    weights, gradients and optimiser state (pure bf16 training: less precise updates); auto keeps each checkpoint's
    own dtype."""
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
    """How many most recent checkpoints to keep; the one just written is always kept (0 counts as 1)."""
    resume: bool = False
    """Continue from the latest checkpoint in the output directory, exactly where it stopped. The run's settings must
    be those of the checkpoint, except resume, overwrite, stop_after, max_steps, epochs and the logging / checkpoint
    cadence (progress, report_to, log_every, eval_every, save_every, keep_checkpoints). A finished run does nothing."""
    overwrite: bool = False
    """Start afresh in an output directory that holds another run: its checkpoints/, final/, metrics.jsonl and
    tensorboard/ are deleted first. Without it such a directory is refused (runs would mix)."""
    stop_after: int = 0
    """Stop after this many steps with a checkpoint (e.g. to fit a time slot); 0 runs to the end."""
    report_to: Literal["tensorboard", "none"] = "tensorboard"
    """Where metrics go besides metrics.jsonl."""
    progress: bool = True
    """Show a progress bar with ETA."""
    threads: int = 0
    """CPU threads torch uses for its kernels (torch.set_num_threads); 0 keeps torch's default (one per core).
    On a shared or small machine 1-2 threads are often faster for tiny models."""
    dropout: bool = False
    """Keep the model's dropout layers active in training; off by default as TRL does (dropout makes the policy's
    log-probs noisy against the reference's, so DPO / PPO ratios do not start at 1)."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass instead of keeping them: much less memory
    for long sequences, about one more forward pass of time. The gradients are the same."""

    def __post_init__(self) -> None:
        self.validate()

    def load_kwargs(self) -> dict[str, Any]:
        """What `from_pretrained` needs to load weights in `torch_dtype`."""
        return {"dtype": TORCH_DTYPES[self.torch_dtype]}

    def validate(self) -> None:
        """Raise ValueError naming the first setting outside its range (the CLI prints it as one line)."""

        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise UserError(f"train.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("batch_size", "per_device_batch_size", "log_every"):
            need(getattr(self, name) >= 1, name, "at least 1")
        for name in (
            "max_steps",
            "warmup_steps",
            "eval_every",
            "save_every",
            "keep_checkpoints",
            "stop_after",
            "seed",
            "threads",
        ):
            need(getattr(self, name) >= 0, name, "0 or more")
        for name in ("epochs", "lr"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "a positive number")
        for name in ("weight_decay", "max_grad_norm"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a number, 0 or more")
        need(self.lr_schedule in ("cosine", "linear", "constant"), "lr_schedule", "cosine, linear or constant")
        need(self.mixed_precision in ("auto", "no", "bf16", "fp16"), "mixed_precision", "auto, no, bf16 or fp16")
        need(self.report_to in ("tensorboard", "none"), "report_to", "tensorboard or none")
        need(self.torch_dtype in TORCH_DTYPES, "torch_dtype", "float32, bfloat16, float16 or auto")
        if self.resume and self.overwrite:
            raise UserError("train.resume and train.overwrite exclude each other: continue the run or replace it")


TORCH_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",
}


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


def end_distributed_run() -> None:
    """Leave a multi-process CPU (gloo) run cleanly once its work is done on every rank; a no-op otherwise.

    With torch 2.13's gloo collectives, about 1 run in 8 aborts *after* Python has finished (SIGABRT, "terminate
    called without an active exception", no Python frame): a C++ static destructor meets a still-joinable thread.
    Everything is written by then, but the exit status says the run failed. So: wait for every rank, destroy the
    process group, flush logs and streams, and exit 0 without the C++ destructors. NCCL runs exit normally.
    """
    import sys

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend() != "gloo":
        return
    dist.barrier()
    dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def launched_alone_by_accelerate() -> bool:
    """True when `accelerate launch --num_processes N` (N > 1) ran its single-process launcher: it sets MASTER_ADDR
    for N > 1 but starts one process without WORLD_SIZE (what it does on a machine without CUDA)."""
    env = os.environ
    return "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env and "WORLD_SIZE" not in env


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    per_pass = cfg.per_device_batch_size * world_size
    if cfg.batch_size % per_pass:
        raise UserError(
            f"batch_size={cfg.batch_size} is not a multiple of per_device_batch_size × processes = "
            f"{cfg.per_device_batch_size} × {world_size}; change one of them"
        )
    return cfg.batch_size // per_pass


def disable_dropout(model: torch.nn.Module) -> int:
    """Set every dropout probability in `model` to 0; returns how many were non-zero.

    Covers nn.Dropout modules and the float attributes attention layers read at forward time instead of a module
    (Llama's `attention_dropout` goes straight into the attention kernel). The model's config is left alone, so a
    saved model keeps its own settings.
    """
    changed = 0
    for name, module in model.named_modules():
        if "lora_dropout" in name:  # LoRA's own dropout is a setting of the adapters (lora.dropout), kept
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            module.p = 0.0
            changed += 1
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value > 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def enable_gradient_checkpointing(model: torch.nn.Module) -> int:
    """Turn on activation checkpointing in every Hugging Face model inside `model` (a policy, a RewardModel's
    backbone, PPO's policy + critic); returns how many. Non-reentrant checkpointing: it needs no input that requires
    grad (frozen embeddings, adapters) and gives the same gradients as without."""
    from transformers import PreTrainedModel

    models = [m for m in model.modules() if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]
    if not models:
        raise UserError(
            f"--train.gradient_checkpointing: {type(model).__name__} holds no transformers model that supports it; "
            "turn the option off"
        )
    for m in models:
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name goes in v6
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return len(models)


# Fields of TrainConfig that may differ between a run and the checkpoint it resumes: they change how long the run is
# or what it writes, not which updates it makes. max_steps / epochs may grow to continue a run (the LR schedule is then
# recomputed for the new length, which the engine warns about).
RESUME_MAY_CHANGE = frozenset(
    {"resume", "overwrite", "stop_after", "max_steps", "epochs", "progress", "report_to", "log_every", "eval_every",
     "save_every", "keep_checkpoints", "threads", "gradient_checkpointing"}
)  # fmt: skip

# A step's loss above LOSS_SPIKE_FACTOR × the median |loss| of the previous LOSS_WINDOW steps (at least
# LOSS_SPIKE_MIN_HISTORY of them) and above LOSS_SPIKE_FLOOR is a warning: orders of magnitude, not noise. The floor
# keeps a DPO loss near 0.005 that returns to 0.7 on a hard batch from counting as a spike.
LOSS_SPIKE_FACTOR = 100.0
LOSS_SPIKE_FLOOR = 1.0
LOSS_WINDOW = 20
LOSS_SPIKE_MIN_HISTORY = 3
WARN_EVERY = 100  # the same warning at most once per this many steps in the log (metrics.jsonl records every one)


def _jsonable(value: Any) -> Any:
    """`value` as it reads back from JSON (tuples become lists, paths strings), so saved and live configs compare."""
    return json.loads(json.dumps(value, default=str))


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _find_path(d: dict[str, Any], target: dict[str, Any], prefix: str = "") -> str | None:
    """The dotted key under which `target` sits in `d` ('' for d itself)."""
    if d == target:
        return prefix
    for k, v in d.items():
        if isinstance(v, dict) and (found := _find_path(v, target, f"{prefix}{k}.")) is not None:
            return found
    return None


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
        all of `model`'s parameters at `cfg.lr`; the schedule scales every group's rate alike.

        `config_dict`: the stage's whole config, saved with checkpoints and compared on resume."""
        cfg.validate()  # again: a config may have been changed after it was built
        if num_examples <= 0:
            raise UserError("no training examples: check the data file and --on-bad-row")
        self.cfg = cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._started = time.time()
        self.out_dir = Path(out_dir)
        self._config = _jsonable(config_dict if config_dict is not None else {"train": asdict(cfg)})
        mixed_precision = resolve_mixed_precision(cfg.mixed_precision)
        if AcceleratorState._shared_state.get("_mixed_precision") not in (None, mixed_precision):
            # Accelerate allows one precision per process; a pipeline, experiment or test suite that trains one model
            # in bf16 and the next in fp32 would fail. The process group (PartialState) is kept.
            AcceleratorState._reset_state()
        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=several_cpu_processes())
        if self.accelerator.num_processes > 1 and not self.accelerator.is_main_process:
            # Every line once per run, from rank 0 (the CLI also quiets the other ranks before loading data).
            logging.getLogger("rlxf").setLevel(logging.ERROR)
        if launched_alone_by_accelerate() and self.accelerator.num_processes == 1:
            logger.warning(
                "accelerate launch was asked for several processes but started this one alone (without CUDA its "
                "launcher needs --multi_gpu, a config such as configs/accelerate/ddp.yaml, or mpirun): training "
                "in 1 process; see the README, 'Several processes'"
            )
        sharding = [k for k in ("FSDP", "DEEPSPEED") if os.environ.get(f"ACCELERATE_USE_{k}", "").lower() == "true"]
        if sharding and several_cpu_processes() and self.accelerator.is_main_process:
            # Accelerate builds FSDP and DeepSpeed only on accelerators; on CPUs its state falls back to MULTI_CPU.
            logger.warning(
                "%s was requested, but Accelerate runs it only on GPUs: these %d CPU processes train with DDP (gloo), "
                "the same updates with nothing sharded",
                sharding[0],
                self.accelerator.num_processes,
            )
        set_seed(cfg.seed)
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.grad_accum = accumulation_steps(cfg, self.world_size)
        self.num_examples = num_examples
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * num_examples / cfg.batch_size))

        # The output directory is settled before anything is trained: a run never mixes with another run's
        # checkpoints, and an unwritable directory fails now rather than at the first checkpoint.
        self._recover_interrupted_swaps()
        if not cfg.resume:
            self._claim_out_dir()
        self._check_writable()

        if not cfg.dropout:
            disable_dropout(model)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(model)
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
        # True when resume found this run already finished: nothing is trained, logged or saved (save_final and log
        # do nothing), so a repeated `--train.resume` leaves final/ and metrics.jsonl as they were.
        self.finished_before = False
        # JSON-able state of the algorithm (e.g. PPO's adaptive KL coefficient), saved with every checkpoint and
        # restored by resume.
        self.extra_state: dict[str, Any] = {}
        self._perm_cache: tuple[int, list[int]] | None = None
        self._last_log_time = time.perf_counter()
        self._tokens_since_log = 0
        self.history: dict[str, list[float]] = {}
        # Health checks (loss spikes, zero gradients): the losses of recent steps and of this step's updates.
        self._recent_losses: list[float] = []
        self._step_losses: list[float] = []
        self._zero_grad_updates = 0
        self._last_warned: dict[str, int] = {}

        if cfg.resume:
            self._resume_latest()
        self._metrics_file = self.out_dir / "metrics.jsonl"
        if self.is_main and not self.finished_before:
            (self.out_dir / "config.json").write_text(json.dumps(self._config, indent=2))
            self._truncate_metrics_after(self.step)
        self._tb = None
        if self.is_main and cfg.report_to == "tensorboard" and not self.finished_before:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        self._bar = tqdm(
            total=self.total_steps,
            initial=min(self.step, self.total_steps),
            disable=not (self.is_main and cfg.progress) or self.finished_before,
            desc=self.out_dir.name,
            dynamic_ncols=True,
        )
        if not self.finished_before:
            logger.info(
                "training %d steps: %d examples/step = %d per pass × %d processes × %d accumulation",
                self.total_steps,
                cfg.batch_size,
                cfg.per_device_batch_size,
                self.world_size,
                self.grad_accum,
            )

    # ------------------------------------------------------------------ the output directory
    def _any_rank(self, flag: bool) -> bool:
        """True if `flag` is true on any process, so that all processes raise (or go on) together."""
        if self.world_size == 1:
            return flag
        t = torch.tensor(float(flag), device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    def _recover_interrupted_swaps(self) -> None:
        """Undo a `save_final` cut between moving the old model aside (.old-NAME) and moving the new one in."""
        if self.is_main and self.out_dir.is_dir():
            for backup in self.out_dir.glob(".old-*"):
                target = self.out_dir / backup.name.removeprefix(".old-")
                if target.exists():  # the swap completed; only deleting the backup was cut
                    shutil.rmtree(backup, ignore_errors=True)
                else:
                    os.replace(backup, target)
                    logger.warning("restored %s from %s: a previous run stopped while replacing it", target, backup)
        self.accelerator.wait_for_everyone()

    def _claim_out_dir(self) -> None:
        """A fresh run needs a directory without another run's checkpoints or final model, or `overwrite`.

        Two runs in one directory mix: checkpoints are pruned by name across both, and resume picks the other run's.
        """
        held = sorted(p.name for p in self.checkpoint_dir.glob("step-*"))
        if (self.out_dir / "final").exists():
            held.append("final/")
        if not held:
            return
        if not self.cfg.overwrite:
            shown = ", ".join(f"checkpoints/{n}" if n.startswith("step-") else n for n in held[-3:])
            raise RunDirError(
                f"{self.out_dir} already holds a run ({shown}); pass --train.overwrite to delete it and start again, "
                "--train.resume to continue it, or choose another output directory"
            )
        if self.is_main:
            for name in ("checkpoints", "final", "metrics.jsonl", "tensorboard", "config.json"):
                path = self.out_dir / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
            for leftover in self.out_dir.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            logger.warning("--train.overwrite: deleted the previous run in %s (%s)", self.out_dir, ", ".join(held))
        self.accelerator.wait_for_everyone()

    def _check_writable(self) -> None:
        """Create the output directory (and checkpoints/ when this run will write checkpoints) and write a probe file
        in each, so a permission or path problem stops the run before step 1 rather than after hours of training."""
        problem = ""
        if self.is_main:
            dirs = [self.out_dir]
            if self.cfg.save_every or self.cfg.stop_after:
                dirs.append(self.checkpoint_dir)
            for d in dirs:
                try:
                    d.mkdir(parents=True, exist_ok=True)
                    with tempfile.NamedTemporaryFile(dir=d, prefix=".write-test-"):
                        pass
                except OSError as e:
                    problem = f"cannot write to {d} ({e.strerror or e}); fix its permissions or choose another --out"
                    break
        if self._any_rank(bool(problem)):
            raise RunDirError(problem or f"cannot write to {self.out_dir} (reported by the main process)")

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
        losses: list[Tensor] = []
        self.model.train()
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Gradients are all-reduced once per update, on the last micro-batch, not after every backward.
            sync = nullcontext() if last or self.world_size == 1 else self.accelerator.no_sync(self.model)
            with sync:
                loss_sum, metrics = loss_fn(batch)
                # DDP averages gradients over processes; × world_size turns that average into the global sum.
                self.accelerator.backward(loss_sum * (self.world_size / total_units))
            losses.append(loss_sum.detach().float().reshape(()))
            for k, v in metrics.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v.detach().float()
            self._tokens_since_log += int(batch.get("num_tokens", 0))

        grad_norm = self._clip_gradients()
        loss_mean, norm_is_zero = self._check_update(losses, grad_norm, total_units)  # the update's one host sync
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # For the health checks at the end of the step: this update's loss (as optimised, over all processes) and
        # whether its gradient was exactly zero (a collapsed model, or a loss that does not reach the parameters).
        self._step_losses.append(loss_mean)
        self._zero_grad_updates += int(norm_is_zero)
        return metric_sums, grad_norm

    def _check_update(
        self, losses: list[Tensor], grad_norm: Tensor, total_units: Tensor | float
    ) -> tuple[float, bool]:
        """Raise NonFiniteLossError (after dropping the gradients) if a micro-batch's loss or the gradient norm is not
        finite on any process; else return the loss summed over micro-batches and processes / `total_units`, and
        whether the gradient norm is exactly 0.

        Everything is checked with one host sync (and one all-reduce with several processes): on a GPU a sync per
        check would make the host wait for the device several times per update. The losses are checked after the
        backward passes, not before each one: a non-finite loss gives non-finite gradients, which are dropped here,
        before the update, so nothing is applied either way."""
        loss_t = torch.stack(losses)  # (M,)
        norm = grad_norm.detach().float().reshape(1)
        # M + 1 non-finite flags, then "the norm is exactly 0" and the summed loss: summed over processes, each flag
        # counts the processes where it holds (the norm is the same on every process).
        packed = torch.cat([~torch.isfinite(loss_t), ~torch.isfinite(norm), norm == 0]).float()
        packed = torch.cat([packed, (loss_t.nan_to_num(0.0).sum() / total_units).reshape(1)])  # (M + 3,)
        if self.world_size > 1:
            packed = self.accelerator.reduce(packed, reduction="sum")
        host = packed.tolist()
        bad = [i for i, flag in enumerate(host[:-2]) if flag > 0]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            i = bad[0]
            what, value = (
                (f"loss of micro-batch {i}", float(losses[i]))
                if i < len(losses)
                else ("gradient norm", float(grad_norm))
            )
            raise NonFiniteLossError(
                f"non-finite {what} ({value}) at step {self.step + 1}; no update was applied. "
                "Lower --train.lr, check the data for extreme values, or use --train.mixed_precision no."
            )
        return host[-1], host[-2] > 0

    def end_step(
        self, metric_sums: dict[str, Tensor], total_units: Tensor | float, grad_norm: Tensor
    ) -> dict[str, float]:
        """Close optimiser step `step`: advance the schedule and the step, log `metric_sums / total_units`, and
        checkpoint when due. Returns the logged metrics ({} when this step is not logged)."""
        self.scheduler.step()
        self.step += 1
        warnings = self._health_warnings()
        logged = self._log_train(metric_sums, torch.as_tensor(total_units, device=self.device), grad_norm, warnings)
        if self.cfg.save_every and self.step % self.cfg.save_every == 0:
            self.save_checkpoint()
        return logged

    def snapshot(self) -> dict[str, Any]:
        """A CPU copy of the model's and the optimiser's state, for `restore` (PPO takes one per rollout, so that a
        non-finite update in the middle of a rollout leaves the model as it was before the rollout)."""
        to_cpu = lambda x: x.detach().to("cpu", copy=True) if torch.is_tensor(x) else x  # noqa: E731
        optimizer = self.optimizer.state_dict()
        return {
            "model": {k: to_cpu(v) for k, v in self.unwrap().state_dict().items()},
            "optimizer": {
                "state": {i: {k: to_cpu(v) for k, v in s.items()} for i, s in optimizer["state"].items()},
                "param_groups": [dict(g) for g in optimizer["param_groups"]],
            },
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Put back the model and optimiser state of `snapshot` (the optimiser moves its state to the parameters'
        devices itself)."""
        self.unwrap().load_state_dict(snapshot["model"])
        self.optimizer.load_state_dict(snapshot["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)

    def _health_warnings(self) -> dict[str, float]:
        """Warnings about the step just finished, as metrics: `train/loss_spike` (the loss over the recent median)
        when the loss jumps by orders of magnitude, `train/grad_norm_zero` (the fraction of this step's updates whose
        gradient was exactly 0). A run that diverged or collapsed this way would otherwise finish and exit 0."""
        losses = list(self._step_losses)
        zero, updates = self._zero_grad_updates, len(losses)
        self._step_losses, self._zero_grad_updates = [], 0
        if not losses:
            return {}
        loss = sum(losses) / len(losses)
        found: dict[str, float] = {}
        if len(self._recent_losses) >= LOSS_SPIKE_MIN_HISTORY:
            median = statistics.median(abs(x) for x in self._recent_losses)
            if abs(loss) > LOSS_SPIKE_FLOOR and abs(loss) > LOSS_SPIKE_FACTOR * median:
                found["train/loss_spike"] = abs(loss) / max(median, 1e-12)
                self._warn(
                    "loss_spike",
                    "loss %.4g at step %d is %.3g× the median of the previous %d steps (%.4g): training may have "
                    "diverged; lower --train.lr or check the data",
                    loss, self.step, found["train/loss_spike"], len(self._recent_losses), median,
                )  # fmt: skip
        self._recent_losses = (self._recent_losses + [loss])[-LOSS_WINDOW:]
        if zero:
            found["train/grad_norm_zero"] = zero / updates
            self._warn(
                "grad_norm_zero",
                "gradient norm is exactly 0 at step %d (%d of %d updates): nothing is learned; the model may have "
                "collapsed (lower --train.lr) or the loss does not depend on the trained parameters",
                self.step, zero, updates,
            )  # fmt: skip
        return found

    def _warn(self, kind: str, message: str, *args: Any) -> None:
        """logger.warning on the main process, the same kind at most once per WARN_EVERY steps."""
        if self.is_main and self.step - self._last_warned.get(kind, -WARN_EVERY) >= WARN_EVERY:
            self._last_warned[kind] = self.step
            logger.warning(message, *args)

    def _clip_gradients(self) -> Tensor:
        """Clip to max_grad_norm (when > 0); the global gradient norm before clipping, as a tensor (no host sync)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.cfg.max_grad_norm > 0:
            return self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return torch.stack(grads).norm() if grads else torch.zeros((), device=self.device)

    # ------------------------------------------------------------------ logging
    def _log_train(
        self, metric_sums: dict[str, Tensor], total_units: Tensor, grad_norm: Tensor, warnings: dict[str, float]
    ) -> dict[str, float]:
        # A step with a warning is logged even between log_every steps, so metrics.jsonl records every one.
        if self.step % self.cfg.log_every and self.step != self.total_steps and not warnings:
            self._bar.update(1)
            return {}
        sums = dict(metric_sums)
        if self.world_size > 1:
            sums = {k: self.accelerator.reduce(v, reduction="sum") for k, v in sums.items()}
        keys = list(sums)
        stacked = [(sums[k].float() / total_units).reshape(()) for k in keys] + [
            grad_norm.detach().float().reshape(())
        ]
        *values, norm = torch.stack(stacked).tolist()  # one host sync for all metrics
        logged = dict(zip(keys, values))
        now = time.perf_counter()
        logged["train/lr"] = self.scheduler.get_last_lr()[0]
        logged["train/grad_norm"] = norm
        logged["train/epoch"] = self.step * self.cfg.batch_size / self.num_examples  # passes over the data so far
        logged["time/elapsed_s"] = time.time() - self._started  # wall clock of this process (a resume starts at 0)
        if self._tokens_since_log:
            logged["perf/tokens_per_s"] = (
                self._tokens_since_log * self.world_size / max(now - self._last_log_time, 1e-9)
            )
        if torch.cuda.is_available():
            logged["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        logged.update(warnings)
        self._last_log_time, self._tokens_since_log = now, 0
        self.log(logged)
        self._bar.update(1)
        shown = {
            k.split("/")[-1]: f"{v:.4g}" for k, v in logged.items() if k.startswith(("loss/", "eval/", "rewards/"))
        } | {"epoch": f"{logged['train/epoch']:.2f}"}
        self._bar.set_postfix(shown, refresh=False)
        return logged

    def log(self, metrics: dict[str, float]) -> None:
        """Record metrics at the current step (rank 0 only): history, metrics.jsonl and TensorBoard."""
        if not self.is_main or self.finished_before:
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
        """Drop metric lines written after `step` (the checkpoint resumed from; 0 for a fresh run), so the file has
        each step once. A line that is not JSON (cut by a kill or a full disk) is dropped too, and reported."""
        if not self._metrics_file.exists():
            return
        keep, dropped = [], []
        for number, line in enumerate(self._metrics_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                line_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                dropped.append(number)
                continue
            if line_step <= step:
                keep.append(line)
        if dropped:
            logger.warning(
                "%s: dropped %d damaged line(s) (line %s), e.g. cut short by a kill or a full disk",
                self._metrics_file, len(dropped), ", ".join(map(str, dropped[:5])),
            )  # fmt: skip
        self._metrics_file.write_text("".join(line + "\n" for line in keep), encoding="utf-8")

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def _state(self) -> dict[str, Any]:
        """What a checkpoint or final/ records besides the weights (trainer_state.json)."""
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.world_size,
            "extra": self.extra_state,
            "recent_losses": self._recent_losses,
            "config": self._config,
        }

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
            (tmp / "trainer_state.json").write_text(json.dumps(self._state()))
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            self._prune_checkpoints(keep=final)
        self.accelerator.wait_for_everyone()
        return final

    def _prune_checkpoints(self, keep: Path) -> None:
        """Delete all but the newest `keep_checkpoints` checkpoints; `keep` (the one just written) always stays.

        Checkpoints after `keep` can only be ones a resume skipped as damaged, whose steps were trained again: they go.
        """
        others = [p for p in self.checkpoint_dir.glob("step-*") if p.name != keep.name]
        older = sorted(p for p in others if p.name < keep.name)
        newer = [p for p in others if p.name > keep.name]
        kept_older = max(self.cfg.keep_checkpoints, 1) - 1
        for old in newer + older[: len(older) - kept_older]:
            shutil.rmtree(old, ignore_errors=True)

    def _check_same_run(self, saved: dict[str, Any] | None, where: Path) -> None:
        """Refuse to resume from a checkpoint (or final/) written with other settings: the run would be neither the
        old one nor the new one. Only RESUME_MAY_CHANGE fields of the training settings (and `out`: a moved
        directory) may differ; keys present on one side only (settings added by a newer rlxf) are not compared."""
        if saved is None:  # written before checkpoints recorded their config
            return
        train_path = _find_path(self._config, _jsonable(asdict(self.cfg)))
        if train_path is None:
            train_path = "train."
        may_change = {train_path + name for name in RESUME_MAY_CHANGE} | {"out"}
        now, then = _flatten(self._config), _flatten(saved)
        differ = [k for k in sorted(now.keys() & then.keys()) if now[k] != then[k] and k not in may_change]
        if differ:
            shown = "; ".join(f"{k}: {then[k]!r} there, {now[k]!r} now" for k in differ[:8])
            raise RunDirError(
                f"cannot resume from {where}: it was written with other settings ({shown}). Resume with the same "
                f"settings, or start a new run (another output directory, or --train.overwrite)"
            )

    def _read_state(self, directory: Path) -> dict[str, Any] | None:
        try:
            return json.loads((directory / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return None

    def _resume_latest(self) -> None:
        final_dir = self.out_dir / "final"
        if final_dir.is_dir():
            final_state = self._read_state(final_dir)
            if final_state is not None:
                self._check_same_run(final_state.get("config"), final_dir)
            # final/ without a state file was written by an older rlxf: a finished run of unknown length.
            done = final_state["step"] if final_state is not None else self.total_steps
            if done >= self.total_steps:
                self.step, self.finished_before = done, True
                logger.info(
                    "%s: this run finished at step %d and final/ holds its model; nothing to do (raise "
                    "--train.max_steps to train on from its last checkpoint, or pass --train.overwrite to retrain)",
                    self.out_dir, done,
                )  # fmt: skip
                return
        found = sorted(self.checkpoint_dir.glob("step-*"), reverse=True)
        if not found:
            if final_dir.is_dir():
                raise RunDirError(
                    f"cannot train {final_dir}'s run on to step {self.total_steps}: {self.checkpoint_dir} holds no "
                    "checkpoint to continue from (use --train.save_every or --train.stop_after next time)"
                )
            logger.warning("--train.resume: no checkpoint in %s, starting from scratch", self.checkpoint_dir)
            return
        for ckpt in found:
            # The newest checkpoint may be damaged (a kill or a full disk while a file was copied in by hand, a
            # truncated file): report it and fall back to the one before, which the pruning kept for this.
            state = self._read_state(ckpt)
            problem: Exception | str | None = None if state is not None else "trainer_state.json unreadable"
            if state is not None:
                if state["world_size"] != self.world_size:
                    raise RunDirError(
                        f"checkpoint {ckpt} was written by {state['world_size']} processes, this run has "
                        f"{self.world_size}; resume with the same number of processes"
                    )
                self._check_same_run(state.get("config"), ckpt)
                try:
                    self.accelerator.load_state(str(ckpt))
                except Exception as e:  # safetensors, torch.load and pickle raise different types for a cut file
                    problem = e
            if self._any_rank(problem is not None):
                logger.warning(
                    "checkpoint %s is damaged (%s); trying the one before it", ckpt, problem or "on another process"
                )
                continue
            assert state is not None
            self.step = state["step"]
            self.extra_state = state.get("extra", {})
            self._recent_losses = state.get("recent_losses", [])
            if state["total_steps"] != self.total_steps:
                logger.warning(
                    "the run was planned for %d steps and now runs %d: the LR schedule is recomputed for the new "
                    "length, so it differs from a run planned for %d steps from the start",
                    state["total_steps"], self.total_steps, self.total_steps,
                )  # fmt: skip
            logger.info("resumed from %s at step %d", ckpt, self.step)
            return
        raise RunDirError(f"every checkpoint in {self.checkpoint_dir} is damaged; start again with --train.overwrite")

    def save_final(self, tokenizer: Any, name: str = "final", model: Any = None) -> Path:
        """The trained model (or `model`, e.g. the policy inside an actor-critic) and its tokenizer as one
        `save_pretrained` directory, out_dir/name, with trainer_state.json (step and config, read by resume).

        Written by rank 0 under a temporary name; the previous model is moved aside before the new one is renamed
        into place and deleted after, so a crash at any point leaves one complete model (startup restores a backup
        left without its replacement). Does nothing for a run that had finished before this resume.
        """
        target = self.out_dir / name
        if self.finished_before:
            return target
        self.accelerator.wait_for_everyone()
        if self.is_main:
            tmp = self.out_dir / f".tmp-{name}"
            backup = self.out_dir / f".old-{name}"
            shutil.rmtree(tmp, ignore_errors=True)
            (model if model is not None else self.unwrap()).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "trainer_state.json").write_text(json.dumps(self._state()))
            readable_files(tmp)
            shutil.rmtree(backup, ignore_errors=True)
            if target.exists():
                os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return target

    def close(self) -> None:
        self._bar.close()
        if self._tb is not None:
            self._tb.close()
