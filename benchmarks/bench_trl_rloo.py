"""Side-by-side speed benchmark: rlxf's RLOO trainer against TRL's RLOOTrainer (rollout + update throughput).

    .venv/bin/python benchmarks/bench_trl_rloo.py --out benchmarks/results

One run builds the shared inputs once (FactWorld RL prompts, a BPE tokenizer, one tiny Llama saved with
`save_pretrained` that is both the starting policy and the KL reference), then trains each library in its own
subprocess with the same prompts per step in the same order, K samples per prompt, max new tokens, sampling
temperature 1 (no top-k / top-p), KL coefficient, reward function (`rloo_reward.py`), optimiser (fused AdamW,
constant LR, no weight decay, clip 1.0), fp32, number of steps and torch threads, and writes `trl_rloo.md` and
`trl_rloo.json` into --out. Sides alternate; the median of --repeats runs per side is reported.

Throughput = response tokens (EOS included) generated and trained on in the timed steps / their wall time. The
samples are random and differ between the libraries, so each side's count is its own: P·K × the step's mean
response length, as each library logs it (rlxf `response/length`, TRL `completions/mean_length`). Wall time runs
from the end of optimiser step --warmup to the end of the last step (a global `torch.optim` step hook, the same one
as `bench_trl.py`), so generation, reward, reference and old-policy log-probs, the update and logging all count.

Shapes: P prompts per step, K samples per prompt, N steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):  # this checkout's rlxf, and bench_trl / rloo_reward next to this file
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench_trl import PeakMemory, StepClock, _set_threads, child_env, parse_with_model_args, run_child  # noqa: E402

REWARD_RLXF = "callable:rloo_reward:rlxf_reward"


@dataclass
class Spec:
    """Everything a child process needs; written to JSON by the parent."""

    side: str  # "rlxf" or "trl"
    work: str
    out: str
    result: str
    steps: int
    warmup: int
    prompts_per_step: int
    k: int
    max_new_tokens: int
    kl_coef: float
    lr: float
    max_prompt_length: int
    threads: int
    seed: int
    device: str


# ---------------------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------------------


def run_rlxf(spec: Spec, memory: PeakMemory) -> dict[str, Any]:
    from rlxf.engine import TrainConfig
    from rlxf.sampling import GenerationSettings
    from rlxf.trainers.rloo import RLOOConfig, train_rloo

    work = Path(spec.work)
    cfg = RLOOConfig(
        model=str(work / "policy"),
        ref_model=str(work / "policy"),
        prompts_file=str(work / "prompts.jsonl"),
        reward=REWARD_RLXF,
        out=spec.out,
        k=spec.k,
        generation=GenerationSettings(
            max_new_tokens=spec.max_new_tokens, temperature=1.0, top_p=1.0, batch_size=spec.prompts_per_step
        ),  # one generate() call per step for all P·K samples, as TRL
        max_prompt_length=spec.max_prompt_length,
        kl_coef=spec.kl_coef,
        loss_units="sequence",  # −mean over sequences of A·Σ_t log π, as TRL's per_sequence_loss.mean()
        train=TrainConfig(
            batch_size=spec.prompts_per_step,
            per_device_batch_size=spec.prompts_per_step,  # one rollout and one forward/backward per step
            max_steps=spec.steps,
            lr=spec.lr,
            lr_schedule="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            mixed_precision="no",
            seed=spec.seed,
            log_every=1,
            report_to="none",
            progress=False,
        ),
    )
    memory.start()
    history = train_rloo(cfg)["history"]
    return {
        "mean_length": history["response/length"],
        "reward": history["rewards/mean"],
        "kl_seq": history["objective/kl"],
    }


def run_trl(spec: Spec, memory: PeakMemory) -> dict[str, Any]:
    from datasets import Dataset
    from rloo_reward import trl_reward
    from transformers import AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    work = Path(spec.work)
    expected = json.loads((work / "ordered_prompts.json").read_text())  # rlxf's prompts and ids, in its step order
    tokenizer = AutoTokenizer.from_pretrained(work / "policy")
    got = tokenizer(text=expected["prompts"])["input_ids"]  # what TRL's _tokenize_prompts computes
    if [list(g) for g in got] != expected["prompt_ids"]:
        raise RuntimeError("TRL tokenizes the prompts differently from rlxf; the sides would not see the same ids")
    dataset = Dataset.from_list([{"prompt": p} for p in expected["prompts"]])
    args = RLOOConfig(
        output_dir=spec.out,
        per_device_train_batch_size=spec.prompts_per_step * spec.k,  # TRL counts completions: P·K
        gradient_accumulation_steps=1,
        num_generations=spec.k,
        max_completion_length=spec.max_new_tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=spec.kl_coef,
        num_iterations=1,  # on-policy: one update per rollout (the PPO ratio is then 1, the clip inactive)
        normalize_advantages=False,
        shuffle_dataset=False,  # rows arrive already in rlxf's order
        max_steps=spec.steps,
        learning_rate=spec.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused",
        bf16=False,
        fp16=False,
        use_cpu=spec.device == "cpu",
        gradient_checkpointing=False,
        disable_dropout=True,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
        dataloader_num_workers=0,
        log_completions=False,
    )
    memory.start()
    trainer = RLOOTrainer(
        model=str(work / "policy"),
        reward_funcs=trl_reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    history = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    return {
        "mean_length": [h["completions/mean_length"] for h in history],
        "reward": [h["reward"] for h in history],
        "kl_token": [h.get("kl") for h in history],
        "num_tokens": [h.get("num_tokens") for h in history],
    }


def child_main(spec_path: str) -> None:
    spec = Spec(**json.loads(Path(spec_path).read_text()))
    _set_threads(spec.threads)
    import torch

    t0 = time.perf_counter()
    clock = StepClock(spec.device)
    memory = PeakMemory(spec.device)
    out = (run_rlxf if spec.side == "rlxf" else run_trl)(spec, memory)
    out |= memory.stop()
    out["step_end_times"] = clock.times
    out["optimizer"] = clock.optimizer
    out["wall_s_total"] = time.perf_counter() - t0
    out["torch_threads"] = torch.get_num_threads()
    if len(clock.times) != spec.steps or len(out["mean_length"]) != spec.steps:
        raise RuntimeError(
            f"{spec.side}: {len(clock.times)} optimiser steps and {len(out['mean_length'])} logged rollouts, "
            f"expected {spec.steps}"
        )
    Path(spec.result).write_text(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------


def build_inputs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """World, prompts file, tokenizer and the tiny policy (= reference), built once; rlxf's prompt order."""
    from rlxf.data.tokenize import encode_prompts
    from rlxf.engine import Engine, TrainConfig
    from rlxf.hf import load_tokenizer
    from rlxf.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer
    from rlxf.worlds.factworld import FactWorldConfig, write_factworld

    work.mkdir(parents=True, exist_ok=True)
    paths = write_factworld(FactWorldConfig(seed=args.seed), work / "world")
    with paths["prompts_train"].open(encoding="utf-8") as f:
        all_rows = [json.loads(line) for line in f]
    n = args.steps * args.prompts_per_step
    if n > len(all_rows):
        raise SystemExit(f"--steps × --prompts-per-step = {n} prompts, the world has {len(all_rows)}")
    rows = [{"prompt": r["prompt"]} for r in all_rows[:n]]  # one epoch, text only (the reward needs no metadata)
    with (work / "prompts.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)

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
    model = build_tiny_model(tokenizer, tiny)
    model.save_pretrained(work / "policy")
    tokenizer.save_pretrained(work / "policy")

    # rlxf's prompt order (its engine's seeded permutation), given to TRL as is with shuffle_dataset=False.
    cfg = TrainConfig(batch_size=args.prompts_per_step, per_device_batch_size=args.prompts_per_step, seed=args.seed)
    stand_in = SimpleNamespace(cfg=cfg, num_examples=n, _perm_cache=None)
    stand_in._epoch_order = lambda epoch: Engine._epoch_order(stand_in, epoch)
    order = [i for step in range(args.steps) for i in Engine.step_indices(stand_in, step)]
    encoded = encode_prompts(rows, load_tokenizer(work / "policy"), max_prompt_length=args.max_prompt_length)
    if any(r["_prompt_tokens_cut"] for r in encoded):
        raise SystemExit("some prompts were truncated; raise --max-prompt-length")
    ordered = {"prompts": [rows[i]["prompt"] for i in order], "prompt_ids": [encoded[i]["prompt_ids"] for i in order]}
    (work / "ordered_prompts.json").write_text(json.dumps(ordered))
    return {
        "num_prompts": n,
        "longest_prompt_tokens": max(len(ids) for ids in ordered["prompt_ids"]),
        "mean_prompt_tokens": statistics.mean(len(ids) for ids in ordered["prompt_ids"]),
    }


def summarise(result: dict[str, Any], responses_per_step: int, warmup: int) -> dict[str, Any]:
    times = result["step_end_times"]
    step_tokens = [round(m * responses_per_step) for m in result["mean_length"]]  # this side's own samples
    timed_tokens = sum(step_tokens[warmup:])
    seconds = times[-1] - times[warmup - 1]
    return {
        "tokens_per_s": timed_tokens / seconds,
        "timed_tokens": timed_tokens,
        "timed_seconds": seconds,
        "mean_response_length": timed_tokens / (responses_per_step * (len(times) - warmup)),
        "step_ms_median": 1000 * statistics.median(b - a for a, b in zip(times[warmup - 1 : -1], times[warmup:])),
    }


def compare(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for side, results in runs.items():
        summary[side] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
            "tokens_per_s_runs": [r["tokens_per_s"] for r in results],
            **{
                k: statistics.median(r[k] for r in results)
                for k in ("peak_rss_train_mib", "wall_s_total", "step_ms_median", "mean_response_length")
            },
            "first_run": {k: v for k, v in results[0].items() if k != "step_end_times"},
        }
    summary["ratio"] = summary["rlxf"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    return summary


def markdown(report: dict[str, Any]) -> str:
    r, s = report["result"], report["settings"]
    v = s["versions"]
    runs = {side: ", ".join(f"{x:,.0f}" for x in r[side]["tokens_per_s_runs"]) for side in ("rlxf", "trl")}
    lines = [
        "| rlxf tokens/s | TRL tokens/s | rlxf / TRL | rlxf peak RSS MiB | TRL peak RSS MiB "
        "| step ms, rlxf / TRL | mean response tokens, rlxf / TRL |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['rlxf']['tokens_per_s']:,.0f} | {r['trl']['tokens_per_s']:,.0f} | {r['ratio']:.2f}× "
        f"| {r['rlxf']['peak_rss_train_mib']:,.0f} | {r['trl']['peak_rss_train_mib']:,.0f} "
        f"| {r['rlxf']['step_ms_median']:.0f} / {r['trl']['step_ms_median']:.0f} "
        f"| {r['rlxf']['mean_response_length']:.1f} / {r['trl']['mean_response_length']:.1f} |",
        "",
        "| rlxf tokens/s per run | TRL tokens/s per run | wall s, imports + load + train: rlxf / TRL |",
        "|---|---|---:|",
        f"| {runs['rlxf']} | {runs['trl']} | {r['rlxf']['wall_s_total']:.1f} / {r['trl']['wall_s_total']:.1f} |",
        "",
        f"Settings: {s['num_prompts']} FactWorld RL prompts (seed {s['seed']}, longest {s['longest_prompt_tokens']} "
        f"tokens), {s['prompts_per_step']} prompts × K={s['k']} samples per step, {s['max_new_tokens']} max new "
        f"tokens at temperature 1, KL coefficient {s['kl_coef']}, {s['steps']} steps ({s['steps'] - s['warmup']} "
        f"timed), tiny Llama {s['layers']}×{s['hidden_size']} (vocab {s['vocab_size']}), lr {s['lr']} constant, "
        f"fused AdamW, fp32 on {s['device']}, {s['threads']} torch thread(s), median of {s['repeats']} run(s) per "
        f"side. torch {v['torch']}, transformers {v['transformers']}, TRL {v['trl']}, Python {v['python']}.",
    ]
    return "\n".join(lines)


def parent_main(args: argparse.Namespace) -> int:
    import torch
    import transformers
    import trl

    out = Path(args.out)
    work = out / "work_rloo"
    inputs = build_inputs(args, work)
    env = child_env(args.threads, work / "hf_datasets_cache", args.device)
    settings = {k: v for k, v in vars(args).items() if k != "child"} | inputs
    settings["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "python": platform.python_version(),
    }
    runs: dict[str, list[dict[str, Any]]] = {"rlxf": [], "trl": []}
    for rep in range(args.repeats):
        for side in ("rlxf", "trl") if rep % 2 == 0 else ("trl", "rlxf"):  # alternate who goes first
            run_dir = out / "runs" / f"rloo-{side}-{rep}"
            spec = Spec(
                side=side,
                work=str(work),
                out=str(run_dir),
                result=str(run_dir / "result.json"),
                steps=args.steps,
                warmup=args.warmup,
                prompts_per_step=args.prompts_per_step,
                k=args.k,
                max_new_tokens=args.max_new_tokens,
                kl_coef=args.kl_coef,
                lr=args.lr,
                max_prompt_length=args.max_prompt_length,
                threads=args.threads,
                seed=args.seed,
                device=args.device,
            )
            result = run_child(spec, env, __file__, spec.side)
            result |= summarise(result, args.prompts_per_step * args.k, args.warmup)
            print(f"run {rep + 1}/{args.repeats} {side}: {result['tokens_per_s']:,.0f} response tokens/s", flush=True)
            runs[side].append(result)
    report = {"settings": settings, "result": compare(runs)}
    (out / "trl_rloo.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    command = " ".join([".venv/bin/python", Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    (out / "trl_rloo.md").write_text(f"`{command}`\n\n{text}\n")
    print(f"\n{text}\nwritten: {out / 'trl_rloo.md'}, {out / 'trl_rloo.json'}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for trl_rloo.md, trl_rloo.json, the runs")
    p.add_argument("--steps", type=int, default=20, help="optimiser steps (= rollouts) per run")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing (>= 1)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (P); each sampled K times")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (K >= 2)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest response (temperature 1, no top-k/p)")
    p.add_argument("--kl-coef", type=float, default=0.05, help="β of the sequence-level k1 KL penalty")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, alternating sides; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads in every run (see README: shared machine)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (constant)")
    p.add_argument("--max-prompt-length", type=int, default=128, help="longest prompt (nothing may be cut)")
    p.add_argument("--seed", type=int, default=0, help="world, weights and prompt order")
    return parse_with_model_args(p, argv)


if __name__ == "__main__":
    parsed = parse_args()
    if parsed.child:
        child_main(parsed.child)
    else:
        sys.exit(parent_main(parsed))
