"""Side-by-side speed benchmark: rlxf's reward-model and DPO training against TRL's RewardTrainer and DPOTrainer.

    .venv/bin/python benchmarks/bench_trl.py --steps 30 --out benchmarks/results

One run builds the shared inputs once (a FactWorld preference file, a BPE tokenizer and tiny Llama models saved with
`save_pretrained`), then trains each library in its own subprocess on exactly the same rows, batches, lengths,
optimiser, learning rate, number of steps and torch threads, and writes `trl.md` and `trl.json` into --out.

How the two sides are made equal (README.md explains each choice):
  * data order: rlxf draws its order from its own seeded permutation (`Engine.step_indices`); TRL is given the rows
    in that order with `train_sampling_strategy="sequential"`, so optimiser step k sees the same B pairs in both;
  * tokens: rlxf encodes prompt and response separately, TRL tokenizes prompt + response as one text; the TRL child
    checks that every sequence comes out with identical ids, and the run stops if one does not;
  * nothing is truncated or filtered on either side (max_length is above the longest row; checked);
  * optimiser: fused torch AdamW on both (TRL `optim="adamw_torch_fused"`), constant LR, no warm-up, no weight
    decay, clip norm 1.0, fp32, no gradient checkpointing (TRL turns it on by default), no eval, no checkpoints,
    no progress bar, no TensorBoard/W&B, metrics logged every step in both (the step-0 loss is the first).

Throughput = non-pad tokens of the chosen and rejected sequences of the timed steps / their wall time. Token counts
come from rlxf's encoding and the step order above (identical ids on both sides, so the count is the same for both;
TRL's own `num_tokens` counter is checked against it). Wall time runs from the end of optimiser step `--warmup` to
the end of the last step, read from a global `torch.optim` step hook that both libraries trigger.

Shapes: B pairs per step, N steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from any directory: import the rlxf of this checkout
    sys.path.insert(0, str(ROOT))

TASKS = ("rm", "dpo", "dpo_cached")
TASK_TITLES = {
    "rm": "Reward model (Bradley–Terry)",
    "dpo": "DPO, reference recomputed every step",
    "dpo_cached": "DPO, reference log-probs precomputed",
}


@dataclass
class Spec:
    """Everything a child process needs; written to JSON by the parent."""

    side: str  # "rlxf" or "trl"
    task: str  # one of TASKS
    work: str  # shared inputs (world, models, pairs file)
    out: str  # this child's output directory
    result: str  # where the child writes its result JSON
    steps: int
    warmup: int
    batch_size: int
    lr: float
    beta: float
    max_length: int
    max_prompt_length: int
    threads: int
    seed: int
    device: str


# ---------------------------------------------------------------------------------------------------------------
# Measurements shared by both sides
# ---------------------------------------------------------------------------------------------------------------


class StepClock:
    """Wall-clock time at the end of every optimiser step, from a global torch.optim hook.

    Both libraries step a torch.optim.AdamW (wrapped by Accelerate), so the same hook times both loops end to end:
    data collation, forward, backward, clipping, the update, scheduler and logging all fall between two ticks.
    """

    def __init__(self, device: str):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.times: list[float] = []
        self.optimizer: dict[str, Any] = {}
        self._cuda = device == "cuda"
        self._torch = torch
        register_optimizer_step_post_hook(self._tick)

    def _tick(self, optimizer, args, kwargs) -> None:
        if self._cuda:
            self._torch.cuda.synchronize()  # kernels are asynchronous: time their end, not their launch
        self.times.append(time.perf_counter())
        if not self.optimizer:  # what each side really stepped, for the report
            keys = ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused")
            self.optimizer = {"class": type(optimizer).__name__} | {k: optimizer.defaults.get(k) for k in keys}
            self.optimizer["group_weight_decay"] = [g["weight_decay"] for g in optimizer.param_groups]
            self.optimizer["lr_now"] = optimizer.param_groups[0]["lr"]


class PeakMemory:
    """Peak memory of the training loop: RSS high-water mark on CPU, allocated CUDA memory on GPU."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.rss_at_start_mib = _status_kib("VmRSS") / 1024
        # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so the peak excludes model loading and tokenization.
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False

    def stop(self) -> dict[str, Any]:
        import torch

        out = {
            "rss_at_train_start_mib": self.rss_at_start_mib,
            "peak_rss_train_mib": _status_kib("VmHWM") / 1024,
            "peak_rss_train_is_reset": self.reset,
            "peak_rss_process_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if self.device == "cuda":
            out["peak_cuda_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return out


def _status_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    return float("nan")


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


# ---------------------------------------------------------------------------------------------------------------
# Children: one library, one task, one process
# ---------------------------------------------------------------------------------------------------------------


def _rlxf_train_config(spec: Spec):
    from rlxf.engine import TrainConfig

    return TrainConfig(
        batch_size=spec.batch_size,
        per_device_batch_size=spec.batch_size,  # one forward pass per step: no accumulation on either side
        max_steps=spec.steps,
        lr=spec.lr,
        lr_schedule="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        mixed_precision="no",
        seed=spec.seed,
        log_every=1,  # every step on both sides: the step-0 loss is the first logged value
        report_to="none",
        progress=False,
    )


def run_rlxf(spec: Spec, memory: PeakMemory) -> dict[str, Any]:
    work = Path(spec.work)
    if spec.task == "rm":
        from rlxf.trainers.rm import RewardModelConfig, train_reward_model

        cfg = RewardModelConfig(
            model=str(work / "rm"),
            train_file=str(work / "pairs.jsonl"),
            out=spec.out,
            max_length=spec.max_length,
            max_prompt_length=spec.max_prompt_length,
            use_margin=False,  # TRL's RewardTrainer has hard labels and no margin column here
            use_label_prob=False,
            center_rewards_coef=0.0,
            train=_rlxf_train_config(spec),
        )
        memory.start()
        result = train_reward_model(cfg)
        loss_key, extra = "loss/bt", {"rewards/margins": "rewards/margins", "rewards/accuracies": "rewards/accuracies"}
    else:
        from rlxf.trainers.dpo import DPOConfig, train_dpo

        cfg = DPOConfig(
            model=str(work / "policy"),
            ref_model=str(work / "ref"),
            train_file=str(work / "pairs.jsonl"),
            out=spec.out,
            max_length=spec.max_length,
            max_prompt_length=spec.max_prompt_length,
            beta=spec.beta,
            loss_type="sigmoid",
            label_smoothing=0.0,
            use_label_prob=False,
            sft_weight=0.0,
            reference="cached" if spec.task == "dpo_cached" else "live",
            train=_rlxf_train_config(spec),
        )
        memory.start()
        result = train_dpo(cfg)
        loss_key, extra = "loss/dpo", {"logps/chosen": "logps/chosen", "rewards/margins": "rewards/margins"}
    history = result["history"]
    logged = {"loss": history[loss_key]}
    logged |= {name: history[key] for name, key in extra.items() if key in history}
    return {"logged": logged}


def _trl_common_args(spec: Spec) -> dict[str, Any]:
    return dict(
        output_dir=spec.out,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec.steps,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",  # rlxf's optimiser: torch.optim.AdamW(fused=True)
        bf16=False,  # TRL's configs default to bf16; the benchmark is fp32 on both sides
        fp16=False,
        use_cpu=spec.device == "cpu",
        gradient_checkpointing=False,  # TRL's default is True; rlxf does not checkpoint activations
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
        train_sampling_strategy="sequential",  # rows arrive already in rlxf's order
        dataloader_num_workers=0,
        max_length=spec.max_length,
    )


def run_trl(spec: Spec, memory: PeakMemory) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    work = Path(spec.work)
    expected = json.loads((work / "ordered_ids.json").read_text())  # rlxf's ids, in rlxf's step order
    with (work / "pairs.jsonl").open(encoding="utf-8") as f:
        pairs = [json.loads(line) for line in f]
    ordered = [pairs[i] for i in expected["order"]]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in ordered])

    if spec.task == "rm":
        from trl import RewardConfig, RewardTrainer

        tokenizer = AutoTokenizer.from_pretrained(work / "rm")
        args = RewardConfig(**_trl_common_args(spec), center_rewards_coefficient=None, disable_dropout=True)
        memory.start()  # as for rlxf: model loading, tokenization and training
        trainer = RewardTrainer(model=str(work / "rm"), args=args, train_dataset=dataset, processing_class=tokenizer)
        prepared = trainer.train_dataset
        got = [(r["chosen_ids"], r["rejected_ids"]) for r in prepared]
        want = [(e["prompt_ids"] + e["chosen_ids"], e["prompt_ids"] + e["rejected_ids"]) for e in expected["rows"]]
        extra = {"rewards/margins": "margin", "rewards/accuracies": "accuracy"}
    else:
        from trl import DPOConfig, DPOTrainer

        tokenizer = AutoTokenizer.from_pretrained(work / "policy")
        args = DPOConfig(
            **_trl_common_args(spec),
            beta=spec.beta,
            loss_type=["sigmoid"],
            label_smoothing=0.0,
            precompute_ref_log_probs=spec.task == "dpo_cached",
            truncation_mode="keep_start",
            padding_free=False,
            disable_dropout=True,
        )
        memory.start()
        ref = AutoModelForCausalLM.from_pretrained(work / "ref", dtype=torch.float32)
        trainer = DPOTrainer(
            model=str(work / "policy"), ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer
        )
        prepared = trainer.train_dataset
        got = [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"]) for r in prepared]
        want = [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in expected["rows"]]
        extra = {"logps/chosen": "logps/chosen", "rewards/margins": "rewards/margins"}
    if len(got) != len(want):
        raise RuntimeError(f"TRL kept {len(got)} of {len(want)} rows (filtered by max_length?); raise --max-length")
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if [list(x) for x in g] != [list(x) for x in w]]
    if bad:
        raise RuntimeError(
            f"TRL tokenized {len(bad)} of {len(want)} rows differently from rlxf (first: row {bad[0]}: "
            f"TRL {got[bad[0]]} vs rlxf {want[bad[0]]}); the two sides would not train on the same tokens"
        )

    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    logged = {"loss": [h["loss"] for h in history]}
    logged |= {name: [h[key] for h in history] for name, key in extra.items() if key in history[0]}
    logged["num_tokens"] = [h.get("num_tokens") for h in history]
    return {"logged": logged, "identical_token_ids": True}


def child_main(spec_path: str) -> None:
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    _set_threads(spec.threads)
    import torch

    t0 = time.perf_counter()
    clock = StepClock(spec.device)
    memory = PeakMemory(spec.device)
    run = run_rlxf if spec.side == "rlxf" else run_trl
    out = run(spec, memory)
    out |= memory.stop()
    out["step_end_times"] = clock.times
    out["optimizer"] = clock.optimizer
    out["wall_s_total"] = time.perf_counter() - t0  # model loading, tokenization, reference caching, training
    out["torch_threads"] = torch.get_num_threads()
    if len(clock.times) != spec.steps:
        raise RuntimeError(f"{spec.side}/{spec.task}: saw {len(clock.times)} optimiser steps, expected {spec.steps}")
    Path(spec.result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------
# Parent: shared inputs, the runs, the table
# ---------------------------------------------------------------------------------------------------------------


def build_inputs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """World, pairs file, tokenizer and models, built once; returns the per-step token counts of rlxf's order."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlxf.data.tokenize import encode_preferences
    from rlxf.engine import Engine, TrainConfig
    from rlxf.hf import load_tokenizer
    from rlxf.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer
    from rlxf.worlds.factworld import FactWorldConfig, write_factworld

    transformers.logging.set_verbosity_error()  # the fresh score head's load report is expected
    transformers.logging.disable_progress_bar()
    work.mkdir(parents=True, exist_ok=True)
    paths = write_factworld(FactWorldConfig(seed=args.seed), work / "world")
    with paths["preferences_train"].open(encoding="utf-8") as f:
        all_pairs = [json.loads(line) for line in f]
    n = args.steps * args.batch_size
    if n > len(all_pairs):
        raise SystemExit(f"--steps × --batch-size = {n} pairs, the world has {len(all_pairs)}; lower one of them")
    # Exactly the pairs that are trained on, hard labels only (TRL's RewardTrainer has no soft labels): one epoch.
    pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in all_pairs[:n]]
    with (work / "pairs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in pairs)

    corpus = paths["corpus"].read_text(encoding="utf-8").splitlines()
    tokenizer = train_tokenizer([line for line in corpus if line.strip()], args.vocab_size)
    tiny = TinyModelConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        layers=args.layers,
        heads=args.heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
    )
    for name, seed in (("ref", args.seed), ("policy", args.seed + 1)):
        # The DPO policy starts from other weights than the reference, so the step-0 loss is not log 2 on both
        # sides whatever they compute: it then checks the log-probs of both models.
        model = build_tiny_model(tokenizer, TinyModelConfig(**{**asdict(tiny), "seed": seed}))
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    # One reward model (backbone + score head) saved once, so both sides start from the same head weights.
    torch.manual_seed(args.seed)
    config = AutoConfig.from_pretrained(work / "ref", num_labels=1)
    rm = AutoModelForSequenceClassification.from_pretrained(work / "ref", config=config)
    rm.save_pretrained(work / "rm")
    tokenizer.save_pretrained(work / "rm")

    # rlxf's step order, from rlxf's own engine code (a stand-in object carries the fields the method reads).
    cfg = TrainConfig(batch_size=args.batch_size, per_device_batch_size=args.batch_size, seed=args.seed)

    stand_in = SimpleNamespace(cfg=cfg, num_examples=n, _perm_cache=None)
    stand_in._epoch_order = lambda epoch: Engine._epoch_order(stand_in, epoch)
    order = [i for step in range(args.steps) for i in Engine.step_indices(stand_in, step)]

    encoded = encode_preferences(
        pairs, load_tokenizer(work / "ref"), max_length=args.max_length, max_prompt_length=args.max_prompt_length
    )
    if any(r["_prompt_tokens_cut"] for r in encoded):
        raise SystemExit("some prompts were truncated; raise --max-length / --max-prompt-length")
    rows = [{k: encoded[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in order]
    (work / "ordered_ids.json").write_text(json.dumps({"order": order, "rows": rows}))
    # Non-pad tokens of step k = the 2B sequences' lengths: identical for both sides (same ids, right padding).
    seq_tokens = [2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows]
    b = args.batch_size
    step_tokens = [sum(seq_tokens[k * b : (k + 1) * b]) for k in range(args.steps)]
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in rows)
    return {"step_tokens": step_tokens, "longest_sequence": longest, "num_pairs": n}


def run_child(spec: Any, env: dict[str, str], script: str | Path = __file__, label: str = "") -> dict[str, Any]:
    """Run one side of a benchmark (`script --child spec.json`) in a fresh process; returns its result JSON.

    `spec` is the benchmark's Spec dataclass (fields out, result, side); `label` names the run in errors."""
    label = label or f"{spec.side}/{spec.task}"
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    spec_path = Path(spec.out) / "spec.json"
    spec_path.write_text(json.dumps(asdict(spec)))
    log_path = Path(spec.out) / "child.log"
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(Path(script).resolve()), "--child", str(spec_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{label} failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(Path(spec.result).read_text())


def summarise(result: dict[str, Any], step_tokens: list[int], warmup: int) -> dict[str, Any]:
    times = result["step_end_times"]
    timed_tokens = sum(step_tokens[warmup:])
    seconds = times[-1] - times[warmup - 1]  # end of step `warmup` to end of the last step
    return {
        "tokens_per_s": timed_tokens / seconds,
        "timed_steps": len(step_tokens) - warmup,
        "timed_tokens": timed_tokens,
        "timed_seconds": seconds,
        "step_ms_median": 1000 * statistics.median(b - a for a, b in zip(times[warmup - 1 : -1], times[warmup:])),
    }


def child_env(threads: int, cache: Path, device: str) -> dict[str, str]:
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # rlxf's Accelerator would otherwise pick a visible GPU by itself
    env |= {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_DATASETS_CACHE": str(cache),
        "TQDM_DISABLE": "1",
        "PYTHONHASHSEED": "0",
    }
    return env


LOSS_TOLERANCE = 1e-4
"""Largest |step-0 loss difference| that counts as the same loss (fp32, same batch, same weights)."""


def compare(runs: dict[str, list[dict[str, Any]]], step_tokens: list[int]) -> dict[str, Any]:
    """Median throughput, memory and wall time per side over the repeats; logged metrics of the first run.

    On a shared machine a run can be slowed, or left alone, by other processes; the median needs two of three runs
    disturbed to move, where the fastest run would reward one quiet window. Every run's throughput is kept in
    `tokens_per_s_runs` (shown in the second table) and the fastest in `tokens_per_s_max`.
    """
    summary: dict[str, Any] = {}
    for side, results in runs.items():
        first = results[0]
        keep = [k for k in first if k.startswith(("peak_", "rss_")) and k != "peak_rss_train_is_reset"]
        summary[side] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "tokens_per_s_max": max(r["tokens_per_s"] for r in results),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in results],
            **{k: statistics.median(r[k] for r in results) for k in [*keep, "wall_s_total", "step_ms_median"]},
            "step0_loss": first["logged"]["loss"][0],
            "step0_loss_same_in_every_run": len({r["logged"]["loss"][0] for r in results}) == 1,
            "logged": first["logged"],
        }
    rl, tr = summary["rlxf"]["logged"], summary["trl"]["logged"]
    counted = [sum(step_tokens[: i + 1]) for i in range(len(step_tokens))]
    summary |= {
        "ratio": summary["rlxf"]["tokens_per_s"] / summary["trl"]["tokens_per_s"],
        "step0_loss_abs_diff": abs(rl["loss"][0] - tr["loss"][0]),
        "step0_metric_abs_diff": {k: abs(rl[k][0] - tr[k][0]) for k in rl if k in tr and k != "loss"},
        "loss_abs_diff_max_over_steps": max(abs(a - b) for a, b in zip(rl["loss"], tr["loss"])),
        # TRL counts attention-mask ones itself: equal to our count means it trained on the same rows per step.
        "trl_num_tokens_equal_to_count": [int(x) for x in tr["num_tokens"]] == counted,
    }
    summary["same_loss"] = summary["step0_loss_abs_diff"] <= LOSS_TOLERANCE
    return summary


def markdown_tables(report: dict[str, Any]) -> str:
    cuda = report["settings"]["device"] == "cuda"
    mem_key, mem_name = (
        ("peak_cuda_allocated_mib", "peak CUDA MiB") if cuda else ("peak_rss_train_mib", "peak RSS MiB")
    )
    lines = [
        f"| task | rlxf tokens/s | TRL tokens/s | rlxf / TRL | rlxf {mem_name} | TRL {mem_name} "
        "| rlxf step-0 loss | TRL step-0 loss | abs diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for task, r in report["tasks"].items():
        lines.append(
            f"| {TASK_TITLES[task]} | {r['rlxf']['tokens_per_s']:,.0f} | {r['trl']['tokens_per_s']:,.0f} "
            f"| {r['ratio']:.2f}× | {r['rlxf'][mem_key]:,.0f} | {r['trl'][mem_key]:,.0f} "
            f"| {r['rlxf']['step0_loss']:.6f} | {r['trl']['step0_loss']:.6f} | {r['step0_loss_abs_diff']:.1e} |"
        )
    lines += [
        "",
        "| task | same ids and rows per step | other step-0 metrics, abs diff | max loss diff, all steps "
        "| rlxf tokens/s per run | TRL tokens/s per run | wall s, imports + load + train: rlxf / TRL |",
        "|---|---|---|---:|---|---|---:|",
    ]
    for task, r in report["tasks"].items():
        metrics = ", ".join(f"{k} {v:.1e}" for k, v in r["step0_metric_abs_diff"].items())
        runs = {side: ", ".join(f"{x:,.0f}" for x in r[side]["tokens_per_s_runs"]) for side in ("rlxf", "trl")}
        lines.append(
            f"| {TASK_TITLES[task]} | {'yes' if r['trl_num_tokens_equal_to_count'] else 'NO'} | {metrics} "
            f"| {r['loss_abs_diff_max_over_steps']:.1e} | {runs['rlxf']} | {runs['trl']} "
            f"| {r['rlxf']['wall_s_total']:.1f} / {r['trl']['wall_s_total']:.1f} |"
        )
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    import torch
    import transformers
    import trl

    out = Path(args.out)
    work = out / "work"
    inputs = build_inputs(args, work)
    env = child_env(args.threads, work / "hf_datasets_cache", args.device)
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    settings["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
    }
    settings["longest_sequence_tokens"] = inputs["longest_sequence"]
    settings["num_pairs"] = inputs["num_pairs"]
    report: dict[str, Any] = {"settings": settings, "tasks": {}}
    for task in args.tasks:
        runs: dict[str, list[dict[str, Any]]] = {"rlxf": [], "trl": []}
        for rep in range(args.repeats):
            # Alternate which side goes first, so drift in machine load does not favour one of them.
            for side in ("rlxf", "trl") if rep % 2 == 0 else ("trl", "rlxf"):
                run_dir = out / "runs" / f"{task}-{side}-{rep}"
                spec = Spec(
                    side=side,
                    task=task,
                    work=str(work),
                    out=str(run_dir),
                    result=str(run_dir / "result.json"),
                    steps=args.steps,
                    warmup=args.warmup,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    beta=args.beta,
                    max_length=args.max_length,
                    max_prompt_length=args.max_prompt_length,
                    threads=args.threads,
                    seed=args.seed,
                    device=args.device,
                )
                result = run_child(spec, env)
                result |= summarise(result, inputs["step_tokens"], args.warmup)
                print(
                    f"[{task}] run {rep + 1}/{args.repeats} {side}: {result['tokens_per_s']:,.0f} tokens/s", flush=True
                )
                runs[side].append(result)
        report["tasks"][task] = compare(runs, inputs["step_tokens"])
    (out / "trl.json").write_text(json.dumps(report, indent=2))
    tables = markdown_tables(report)
    command = " ".join([".venv/bin/python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    (out / "trl.md").write_text(f"`{command}`\n\n{tables}\n\n{settings_line(report)}\n")
    print(f"\n{tables}\n\n{settings_line(report)}\nwritten: {out / 'trl.md'}, {out / 'trl.json'}")
    mismatched = [t for t, r in report["tasks"].items() if not r["same_loss"]]
    if mismatched:
        print(f"step-0 losses differ by more than {LOSS_TOLERANCE} in: {', '.join(mismatched)}", file=sys.stderr)
        return 1
    return 0


def settings_line(report: dict[str, Any]) -> str:
    s = report["settings"]
    v = s["versions"]
    return (
        f"Settings: {s['num_pairs']} FactWorld pairs (seed {s['seed']}), batch {s['batch_size']} pairs, {s['steps']} "
        f"steps ({s['steps'] - s['warmup']} timed), tiny Llama {s['layers']}×{s['hidden_size']} (vocab "
        f"{s['vocab_size']}), longest sequence {s['longest_sequence_tokens']} tokens, lr {s['lr']} constant, beta "
        f"{s['beta']}, fp32 on {s['device']}, {s['threads']} torch thread(s), median of {s['repeats']} run(s) "
        "per side. "
        f"torch {v['torch']}, transformers {v['transformers']}, TRL {v['trl']}, Python {v['python']}."
    )


def parse_with_model_args(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add the options every benchmark shares (tiny-model size, device, the child marker), parse, check --warmup."""
    p.add_argument("--vocab-size", type=int, default=512, help="BPE vocabulary of the tiny model")
    p.add_argument("--hidden-size", type=int, default=64, help="tiny Llama width")
    p.add_argument("--layers", type=int, default=2, help="tiny Llama blocks")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--intermediate-size", type=int, default=256, help="MLP width")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: both sides on the GPU, fp32")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None and not 1 <= args.warmup < args.steps:
        p.error(f"--warmup must be in [1, --steps) (got {args.warmup} with --steps {args.steps})")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for trl.md, trl.json and the runs")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="what to benchmark")
    p.add_argument("--steps", type=int, default=30, help="optimiser steps per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing (>= 1)")
    p.add_argument("--batch-size", type=int, default=16, help="preference pairs per optimiser step")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating sides; the median is reported")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in every run (1 by default: on a shared 2-core machine, 2 OpenMP threads make step\n"
        "times jump 10x whenever another process runs)",
    )
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--max-length", type=int, default=128, help="longest prompt + response (nothing may be cut)")
    p.add_argument("--max-prompt-length", type=int, default=96, help="longest prompt (nothing may be cut)")
    p.add_argument("--seed", type=int, default=0, help="world, weights and data order")
    return parse_with_model_args(p, argv)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.child:
        child_main(parsed.child)
    else:
        sys.exit(parent_main(parsed))
