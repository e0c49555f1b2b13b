"""The bf16 GPU race: rlxf against TRL on real HH-RLHF pairs and a ~0.4B Llama, DPO (cached and live reference),
reward model and RLOO, each side in its own process on identical token ids and rows.

    .venv/bin/python benchmarks/race_gpu.py --out benchmarks/results/gpu          # one GPU, bf16 (≈ 6 min on an H200, estimated)
    .venv/bin/python benchmarks/race_gpu.py --tiny --out /tmp/race                 # CPU, fp32, seconds (the test)

Inputs, built once by the parent: the Anthropic HH-RLHF sample in tests/data/hh_rlhf (harmless-base test split,
implicit prompts split by rlxf's loader), a byte-level BPE of --vocab-size trained on it, the first
steps × batch pairs whose prompt + longer response fits --max-length (file order), and Llamas built from a config
(`LlamaConfig`, random weights, tied embeddings; policy and reference from different seeds; the reward model is the
reference's backbone with a score head), saved once with `save_pretrained` and loaded by both sides. RLOO samples
K responses to each of the first distinct HH prompts that fit --max-prompt-length, rewarded by `rloo_reward.py`;
the policy is its own reference.

The children are those of `bench_trl.py` (DPO, RM) and `bench_trl_rloo.py` (RLOO): the same settings table (README),
the same checks (TRL must see rlxf's token ids row for row, or the run stops), the same step clock and memory meter;
here they run under --precision: bf16 autocast over fp32 weights on both sides (rlxf `mixed_precision="bf16"`, TRL
`bf16=True`), or fp32.

Reported per task and side: tokens/s (non-pad tokens of the 2B sequences per second for DPO / RM, generated
response tokens for RLOO), the ratio rlxf / TRL, peak memory (allocated CUDA memory, or RSS on the CPU), MFU
(6·N model FLOPs per trained token, + 2·N per token of a live reference's forward, over --peak-tflops; N = the
parameters a token passes through, the tied LM head included) and the GPU-busy fraction: GPU kernel time / wall
time over --profile-steps steady steps under `torch.profiler` (CUDA only; those steps are then excluded from the
timing).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_trl  # noqa: E402
import bench_trl_rloo  # noqa: E402

HH_FILE = ROOT / "tests" / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
TASKS = ("dpo_cached", "dpo", "rm", "rloo")
TITLES = {
    "dpo_cached": "DPO, reference log-probs precomputed",
    "dpo": "DPO, reference recomputed every step",
    "rm": "Reward model (Bradley–Terry)",
    "rloo": "RLOO (generation + update)",
}


@dataclass
class RaceExtras:
    """What a race child needs besides the benchmark's own Spec."""

    kind: str  # "pairs" (bench_trl.Spec) or "rloo" (bench_trl_rloo.Spec)
    precision: str  # "bf16" or "no"
    profile_steps: int  # steady steps profiled on CUDA (0: none)
    rlxf_set: dict[str, Any]  # fields of rlxf's stage configs to override (e.g. pack_length_multiple=1)


# ---------------------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------------------


def _apply_settings(precision: str, rlxf_set: dict[str, Any]) -> None:
    """Both sides in `precision` (rlxf's engine resolves every mixed_precision to it, TRL's configs get bf16), and
    `rlxf_set` on rlxf's stage configs (fields that a config lacks are left out)."""
    import dataclasses

    import rlxf.engine
    from rlxf.trainers.dpo import DPOConfig
    from rlxf.trainers.rloo import RLOOConfig
    from rlxf.trainers.rm import RewardModelConfig

    rlxf.engine.resolve_mixed_precision = lambda choice: precision
    for cls in (DPOConfig, RewardModelConfig, RLOOConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        own = {k: v for k, v in rlxf_set.items() if k in names}
        if own:
            original_init = cls.__init__

            def init_with(self, *args, __original=original_init, __own=own, **kwargs):
                __original(self, *args, **(kwargs | __own))

            cls.__init__ = init_with
    if precision == "bf16":
        import trl

        for cls in (trl.DPOConfig, trl.RewardConfig, trl.RLOOConfig):
            original = cls.__init__

            def init(self, *args, __original=original, **kwargs):
                kwargs["bf16"] = True
                __original(self, *args, **kwargs)

            cls.__init__ = init


class Profiler:
    """GPU kernel time over `steps` steady optimiser steps (after `start_after`), from torch.profiler."""

    def __init__(self, start_after: int, steps: int):
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.start_after, self.steps, self.seen = start_after, steps, 0
        self.prof: Any = None
        self.times: list[float] = []
        self.result: dict[str, Any] = {}
        self._torch = torch
        if steps and torch.cuda.is_available():
            register_optimizer_step_post_hook(self._tick)

    def _tick(self, *_: Any) -> None:
        torch = self._torch
        self.seen += 1
        if self.seen == self.start_after:
            torch.cuda.synchronize()
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.times.append(time.perf_counter())
        elif self.prof is not None and self.seen == self.start_after + self.steps:
            torch.cuda.synchronize()
            self.times.append(time.perf_counter())
            self.prof.__exit__(None, None, None)
            try:
                kernels = [
                    e
                    for e in self.prof.events()
                    if e.device_type == torch.autograd.DeviceType.CUDA
                    and not getattr(e, "is_user_annotation", False)
                    and not e.name.startswith("ProfilerStep")
                ]
                gpu_us = sum(e.self_device_time_total for e in kernels)
                wall = self.times[1] - self.times[0]
                self.result = {
                    "profiled_steps": self.steps,
                    "gpu_kernel_ms_per_step": gpu_us / 1000 / self.steps,
                    "step_ms": 1000 * wall / self.steps,
                    "gpu_busy_fraction": gpu_us / 1e6 / wall,
                }
            except Exception as e:  # a profiler API change must not lose the timing of the run
                self.result = {"profile_error": repr(e)}
            self.prof = None


def child_main(spec_path: str) -> None:
    raw = json.loads(Path(spec_path).read_text())
    extras = RaceExtras(**{f.name: raw.pop(f.name) for f in fields(RaceExtras)})
    module = bench_trl if extras.kind == "pairs" else bench_trl_rloo
    spec = module.Spec(**raw)
    bench_trl._set_threads(spec.threads)
    import torch

    _apply_settings(extras.precision, extras.rlxf_set)
    t0 = time.perf_counter()
    clock = bench_trl.StepClock(spec.device)
    profiler = Profiler(spec.warmup, extras.profile_steps)
    memory = bench_trl.PeakMemory(spec.device)
    out = (module.run_rlxf if spec.side == "rlxf" else module.run_trl)(spec, memory)
    out |= memory.stop()
    out["step_end_times"] = clock.times
    out["optimizer"] = clock.optimizer
    out["profile"] = profiler.result
    out["wall_s_total"] = time.perf_counter() - t0
    out["torch_threads"] = torch.get_num_threads()
    if len(clock.times) != spec.steps:
        raise RuntimeError(f"{spec.side}: saw {len(clock.times)} optimiser steps, expected {spec.steps}")
    Path(spec.result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------


def build_inputs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """HH-RLHF pairs and prompts, tokenizer, Llamas from a config; rlxf's step order; per-step token counts."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlxf.data.formats import load_preferences
    from rlxf.data.packing import first_fit_decreasing
    from rlxf.data.tokenize import encode_preferences, encode_prompts
    from rlxf.engine import Engine, TrainConfig
    from rlxf.models.tiny import train_tokenizer

    transformers.logging.set_verbosity_error()
    work.mkdir(parents=True, exist_ok=True)
    rows = load_preferences(str(HH_FILE), on_bad_row="skip", rejected_path=work / "rejected_rows.jsonl")
    rows = rows[: args.source_rows] if args.source_rows else rows
    tokenizer = train_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], args.vocab_size)
    enc = encode_preferences(rows, tokenizer)  # no limit: the lengths decide which pairs fit
    fits = [
        i
        for i, e in enumerate(enc)
        if len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= args.max_length
    ]
    n = args.steps * args.batch_size
    if n > len(fits):
        raise SystemExit(f"steps × batch = {n} pairs, only {len(fits)} of {len(rows)} fit --max-length")
    pairs = [{k: rows[i][k] for k in ("prompt", "chosen", "rejected")} for i in fits[:n]]
    with (work / "pairs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in pairs)

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, 2 * args.max_length),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    n_params = {}
    for name, seed, cls, extra in (
        ("ref", args.seed, LlamaForCausalLM, {}),
        ("policy", args.seed + 1, LlamaForCausalLM, {}),
        ("rm", args.seed, LlamaForSequenceClassification, {"num_labels": 1}),
    ):
        torch.manual_seed(seed)
        config = LlamaConfig(**common, **extra)
        config._attn_implementation = "sdpa"
        model = cls(config).float()
        embed = model.get_input_embeddings().weight.numel()
        total = sum(p.numel() for p in model.parameters())
        # parameters a token's matmuls pass through: the tied LM head counts, the embedding lookup does not
        n_params[name] = {"total": total, "matmul": total if name != "rm" else total - embed}
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
        del model

    # rlxf's step order, from its own engine code; TRL gets the rows in that order.
    def order_of(batch: int, count: int, steps: int) -> list[int]:
        cfg = TrainConfig(batch_size=batch, per_device_batch_size=batch, seed=args.seed)
        stand_in = SimpleNamespace(cfg=cfg, num_examples=count, _perm_cache=None)
        stand_in._epoch_order = lambda epoch: Engine._epoch_order(stand_in, epoch)
        return [i for step in range(steps) for i in Engine.step_indices(stand_in, step)]

    order = order_of(args.batch_size, n, args.steps)
    encoded = encode_preferences(pairs, tokenizer, max_length=args.max_length, max_prompt_length=args.max_length)
    if any(r["_prompt_tokens_cut"] for r in encoded):
        raise SystemExit("a prompt was cut; the length filter is wrong")
    rows_o = [{k: encoded[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for i in order]
    (work / "ordered_ids.json").write_text(json.dumps({"order": order, "rows": rows_o}))
    b = args.batch_size
    step_tokens, trl_positions, rlxf_positions = [], [], []
    for k in range(args.steps):
        chunk = rows_o[k * b : (k + 1) * b]
        seg = [len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in chunk]
        step_tokens.append(
            sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in chunk)
        )
        longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in chunk)
        trl_positions.append(2 * b * longest)
        bins = first_fit_decreasing(seg, max(seg))
        rlxf_positions.append(len(bins) * max(sum(seg[i] for i in m) for m in bins))

    # RLOO: the first HH prompts that fit --max-prompt-length, in rlxf's order (the policy is also the reference).
    prompt_rows, seen = [], set()
    for r in rows:
        if r["prompt"] in seen:
            continue
        seen.add(r["prompt"])
        if len(tokenizer(r["prompt"])["input_ids"]) <= args.max_prompt_length:
            prompt_rows.append({"prompt": r["prompt"]})
        if len(prompt_rows) == args.rloo_steps * args.prompts_per_step:
            break
    n_prompts = args.rloo_steps * args.prompts_per_step
    if len(prompt_rows) < n_prompts:
        raise SystemExit(f"only {len(prompt_rows)} HH prompts fit --max-prompt-length {args.max_prompt_length}")
    with (work / "prompts.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in prompt_rows)
    p_order = order_of(args.prompts_per_step, n_prompts, args.rloo_steps)
    p_enc = encode_prompts(prompt_rows, tokenizer, max_prompt_length=args.max_prompt_length)
    ordered = {
        "prompts": [prompt_rows[i]["prompt"] for i in p_order],
        "prompt_ids": [p_enc[i]["prompt_ids"] for i in p_order],
    }
    (work / "ordered_prompts.json").write_text(json.dumps(ordered))
    return {
        "num_pairs": n,
        "vocab": len(tokenizer),
        "n_params": n_params,
        "step_tokens": step_tokens,
        "positions_per_step_mean": {
            "tokens": statistics.mean(step_tokens),
            "trl_padded": statistics.mean(trl_positions),
            "rlxf_packed_tight": statistics.mean(rlxf_positions),
        },
        "num_prompts": n_prompts,
    }


def pair_spec(args, side: str, task: str, work: Path, out: Path, device: str) -> dict[str, Any]:
    spec = bench_trl.Spec(
        side=side,
        task=task,
        work=str(work),
        out=str(out),
        result=str(out / "result.json"),
        steps=args.steps,
        warmup=args.warmup,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        max_length=args.max_length,
        max_prompt_length=args.max_length,
        threads=args.threads,
        seed=args.seed,
        device=device,
    )
    return asdict(spec)


def rloo_spec(args, side: str, work: Path, out: Path, device: str) -> dict[str, Any]:
    spec = bench_trl_rloo.Spec(
        side=side,
        work=str(work),
        out=str(out),
        result=str(out / "result.json"),
        steps=args.rloo_steps,
        warmup=args.warmup,
        prompts_per_step=args.prompts_per_step,
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        kl_coef=0.05,
        lr=args.lr,
        max_prompt_length=args.max_prompt_length,
        threads=args.threads,
        seed=args.seed,
        device=device,
    )
    return asdict(spec)


def run_one(spec: dict[str, Any], extras: RaceExtras, env: dict[str, str]) -> dict[str, Any]:
    """One side of one task in a fresh process (`race_gpu.py --child spec.json`); returns its result JSON."""
    import subprocess

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec | asdict(extras)))
    log_path = out / "child.log"
    with log_path.open("w") as log:
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(out / "spec.json")],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(ROOT),
        )
    if proc.returncode != 0:
        label = f"{spec['side']}/{spec.get('task', 'rloo')}"
        raise SystemExit(f"{label} failed (exit {proc.returncode}); log {log_path}:\n{log_path.read_text()[-3000:]}")
    return json.loads(Path(spec["result"]).read_text())


def summarise(args, task: str, result: dict[str, Any], info: dict[str, Any], device: str) -> dict[str, Any]:
    times = result["step_end_times"]
    prof = result.get("profile") or {}
    skip = set(range(args.warmup, args.warmup + prof.get("profiled_steps", 0)))  # profiled steps run slower
    if task == "rloo":
        lengths = result["mean_length"]
        step_tokens = [args.prompts_per_step * args.k * x for x in lengths]
    else:
        step_tokens = info["step_tokens"]
    timed = [k for k in range(args.warmup, len(times)) if k not in skip]
    seconds = sum(times[k] - times[k - 1] for k in timed)
    tokens = sum(step_tokens[k] for k in timed)
    out = {"tokens_per_s": tokens / seconds, "timed_steps": len(timed), "step_ms_median": 1000 * statistics.median(
        times[k] - times[k - 1] for k in timed)}  # fmt: skip
    mem = result.get("peak_cuda_allocated_mib", result.get("peak_rss_train_mib"))
    out["peak_mem_mib"] = mem
    if task != "rloo":
        n = info["n_params"]["rm" if task == "rm" else "policy"]["matmul"]
        flops_per_token = 6 * n + (2 * n if task == "dpo" else 0)
        out["mfu"] = flops_per_token * out["tokens_per_s"] / (args.peak_tflops * 1e12) if device == "cuda" else None
    out["gpu_busy_fraction"] = prof.get("gpu_busy_fraction")
    out["gpu_kernel_ms_per_step"] = prof.get("gpu_kernel_ms_per_step")
    loss = (result.get("logged") or {}).get("loss")
    out["step0_loss"] = loss[0] if loss else None
    return out


def markdown(report: dict[str, Any]) -> str:
    fmt = lambda v, spec: "–" if v is None else format(v, spec)  # noqa: E731
    lines = [
        "| task | rlxf tok/s | TRL tok/s | rlxf / TRL | peak MiB rlxf / TRL | MFU rlxf / TRL | GPU busy rlxf / TRL "
        "| step-0 loss rlxf / TRL |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for task, sides in report["tasks"].items():
        r, t = sides.get("rlxf", {}), sides.get("trl", {})
        ratio = r["tokens_per_s"] / t["tokens_per_s"] if r and t else None
        lines.append(
            f"| {TITLES[task]} | {fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(t.get('tokens_per_s'), ',.0f')} | "
            f"{fmt(ratio, '.2f')}× | {fmt(r.get('peak_mem_mib'), ',.0f')} / {fmt(t.get('peak_mem_mib'), ',.0f')} | "
            f"{fmt(r.get('mfu'), '.1%')} / {fmt(t.get('mfu'), '.1%')} | "
            f"{fmt(r.get('gpu_busy_fraction'), '.0%')} / {fmt(t.get('gpu_busy_fraction'), '.0%')} | "
            f"{fmt(r.get('step0_loss'), '.6f')} / {fmt(t.get('step0_loss'), '.6f')} |"
        )
    s = report["settings"]
    lines.append(
        f"\n{s['device']}, {s['precision']}, Llama {s['layers']}×{s['hidden_size']} ({report['inputs']['n_params']['policy']['total'] / 1e6:.3g}M "
        f"parameters), BPE {report['inputs']['vocab']}, {report['inputs']['num_pairs']} HH-RLHF pairs, "
        f"{s['batch_size']} pairs per step, {s['steps']} steps ({s['warmup']} warm-up), RLOO {s['rloo_steps']} steps × "
        f"{s['prompts_per_step']} prompts × K {s['k']}, {s['max_new_tokens']} new tokens; {report['versions']}."
    )  # fmt: skip
    return "\n".join(lines) + "\n"


def _parse_value(item: str) -> tuple[str, Any]:
    """FIELD=VALUE with VALUE read as JSON (numbers, true/false) when it is JSON, else as a string."""
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def parent_main(args: argparse.Namespace) -> int:
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    precision = args.precision if device == "cuda" else "no"
    out = Path(args.out)
    work = out / "work"
    info = build_inputs(args, work)
    env = bench_trl.child_env(args.threads, out / "hf_cache", device)
    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    sides = ["rlxf"] + (["trl"] if trl_version and not args.no_trl else [])
    report: dict[str, Any] = {"tasks": {}, "inputs": info, "settings": vars(args) | {"device": device,
              "precision": precision}}  # fmt: skip
    report["versions"] = (
        f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl_version or 'not installed'}, "
        f"Python {platform.python_version()}"
    )
    profile_steps = args.profile_steps if device == "cuda" else 0
    rlxf_set = dict(_parse_value(x) for x in args.rlxf_set)
    for task in args.tasks:
        report["tasks"][task] = {}
        for side in sides:
            if side == "trl" and args.trl_tasks and task not in args.trl_tasks:
                continue
            run_dir = out / "runs" / f"{side}_{task}"
            if task == "rloo":
                spec, kind = rloo_spec(args, side, work, run_dir, device), "rloo"
            else:
                spec, kind = pair_spec(args, side, task, work, run_dir, device), "pairs"
            result = run_one(spec, RaceExtras(kind, precision, profile_steps, rlxf_set), env)
            report["tasks"][task][side] = summarise(args, task, result, info, device)
            print(f"{side} {task}: {report['tasks'][task][side]}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "race_gpu.json").write_text(json.dumps(report, indent=2))
    (out / "race_gpu.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/gpu")
    p.add_argument("--tiny", action="store_true", help="CPU, fp32, a tiny Llama, a few steps (what the test runs)")
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    p.add_argument("--trl-tasks", nargs="*", default=None, help="run TRL only on these tasks (default: all)")
    p.add_argument("--no-trl", action="store_true", help="rlxf only")
    p.add_argument(
        "--rlxf-set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="override fields of rlxf's DPO / RM / RLOO configs, e.g. pack_length_multiple=1 packed_attention=efficient",
    )
    p.add_argument("--precision", choices=("bf16", "no"), default="bf16", help="on CUDA; the CPU runs fp32")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile-steps", type=int, default=4, help="steady steps under torch.profiler (CUDA)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=12000)
    p.add_argument("--source-rows", type=int, default=0, help="use only the first N HH rows (0: all)")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate-size", type=int, default=4096)
    p.add_argument("--rloo-steps", type=int, default=20)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        tiny = dict(steps=3, warmup=1, batch_size=4, max_length=256, vocab_size=600, source_rows=200, hidden_size=64,
                    layers=2, heads=4, intermediate_size=128, rloo_steps=2, prompts_per_step=2, k=2,
                    max_new_tokens=8, max_prompt_length=128, profile_steps=0)  # fmt: skip
        for k, v in tiny.items():
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    return args


if __name__ == "__main__":
    _args = parse_args()
    if _args.child:
        child_main(_args.child)
    else:
        raise SystemExit(parent_main(_args))
