"""LoRA DPO against full DPO: peak memory and tokens/s on a ~0.4B Llama and real HH-RLHF pairs.

    .venv/bin/python benchmarks/bench_lora.py                  # 0.4B Llama; CPU fp32 here (≈ 25 min on 2 cores), bf16 on a GPU
    .venv/bin/python benchmarks/bench_lora.py --tiny           # a tiny Llama, seconds (what the test runs)

Each mode runs `rlxf.trainers.dpo.train_dpo` in its own process on the same pairs, model and settings:
- full: every weight trains (AdamW state for all of them), the reference is a second copy loaded from disk;
- lora: adapters on every linear layer (`lora.r`, all-linear), the reference is the policy with its adapters off.
Reference log-probs are `--reference live` by default: the case where full DPO holds two models. Peak memory is the
process's resident high-water mark on the CPU (model loading included: loading the reference is part of the cost)
and `torch.cuda.max_memory_allocated` on a GPU. tokens/s is the engine's own `perf/tokens_per_s` (non-pad tokens of
chosen + rejected per second), averaged over the logged steps after the first.

Inputs: the HH-RLHF sample in tests/data/hh_rlhf (harmless-base test split), a byte-level BPE trained on it, the first
steps × batch pairs that fit --max-length, and a Llama built from a config (random weights, saved once).
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HH_FILE = ROOT / "tests" / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"
MODES = ("full", "lora")


def build_inputs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlxf.data.formats import load_preferences
    from rlxf.data.tokenize import encode_preferences
    from rlxf.models.tiny import train_tokenizer

    transformers.logging.set_verbosity_error()
    work.mkdir(parents=True, exist_ok=True)
    rows = load_preferences(str(HH_FILE), on_bad_row="skip", rejected_path=work / "rejected_rows.jsonl")
    tokenizer = train_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], args.vocab_size)
    enc = encode_preferences(rows, tokenizer)
    fits = [i for i, e in enumerate(enc)
            if len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= args.max_length]  # fmt: skip
    n = args.steps * args.batch_size
    if n > len(fits):
        raise SystemExit(f"steps × batch = {n} pairs, only {len(fits)} fit --max-length {args.max_length}")
    with (work / "pairs.jsonl").open("w", encoding="utf-8") as f:
        for i in fits[:n]:
            f.write(json.dumps({k: rows[i][k] for k in ("prompt", "chosen", "rejected")}, ensure_ascii=False) + "\n")
    torch.manual_seed(args.seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size,
                         intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         max_position_embeddings=max(2048, 2 * args.max_length), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    return {"pairs": n, "parameters": params, "vocab": len(tokenizer)}


def child_main(spec_path: str) -> None:
    """One DPO run in this process; writes its peak memory and speed next to the spec."""
    spec = json.loads(Path(spec_path).read_text())
    import torch

    torch.set_num_threads(spec["threads"])
    from rlxf.engine import TrainConfig
    from rlxf.models.lora import LoraSettings
    from rlxf.trainers.dpo import DPOConfig, train_dpo

    on_gpu = torch.cuda.is_available()
    train = TrainConfig(batch_size=spec["batch_size"], per_device_batch_size=spec["batch_size"],
                        max_steps=spec["steps"], lr=1e-5, log_every=1, progress=False, report_to="none",
                        mixed_precision="bf16" if on_gpu else "no", seed=spec["seed"],
                        threads=spec["threads"], gradient_checkpointing=spec["gradient_checkpointing"])  # fmt: skip
    lora = LoraSettings(r=spec["lora_r"], alpha=2.0 * spec["lora_r"], dropout=0.0) if spec["mode"] == "lora" else None
    cfg = DPOConfig(model=spec["model"], train_file=spec["pairs"], out=spec["out"], reference=spec["reference"],
                    max_length=spec["max_length"], max_prompt_length=spec["max_length"], train=train,
                    **({"lora": lora} if lora else {}))  # fmt: skip
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    history = train_dpo(cfg)["history"]
    wall = time.perf_counter() - t0
    speeds = history.get("perf/tokens_per_s", [])[1:]  # the first step includes warm-up (allocator, kernels)
    result = {
        "mode": spec["mode"],
        "reference": spec["reference"],
        "tokens_per_s": statistics.mean(speeds) if speeds else float("nan"),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if on_gpu else None,
        "first_loss": history["loss/dpo"][0],
        "last_loss": history["loss/dpo"][-1],
        "wall_s": wall,
    }
    Path(spec["result"]).write_text(json.dumps(result))


def run_mode(args: argparse.Namespace, mode: str, work: Path, out: Path) -> dict[str, Any]:
    spec = {"mode": mode, "reference": args.reference, "model": str(work / "model"), "pairs": str(work / "pairs.jsonl"),
            "out": str(out / f"run-{mode}"), "result": str(out / f"{mode}.json"), "steps": args.steps,
            "batch_size": args.batch_size, "max_length": args.max_length, "lora_r": args.lora_r,
            "threads": args.threads, "seed": args.seed,
            "gradient_checkpointing": args.gradient_checkpointing}  # fmt: skip
    spec_path = out / f"{mode}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    done = subprocess.run([sys.executable, __file__, "--child", str(spec_path)], env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} run failed (exit {done.returncode})")
    return json.loads(Path(spec["result"]).read_text())


def markdown(report: dict[str, Any]) -> str:
    gpu = report["device"] == "cuda"
    unit = "peak CUDA MiB (allocated)" if gpu else "peak RSS MiB"
    lines = [
        f"# LoRA DPO vs full DPO ({report['parameters'] / 1e6:.1f}M-parameter Llama, {report['pairs']} HH-RLHF pairs, "
        f"reference {report['reference']}, {report['device']}"
        f"{', gradient checkpointing' if report['args']['gradient_checkpointing'] else ''})",
        "",
        f"| mode | tokens/s | {unit} | first → last loss | wall s |",
        "|---|---:|---:|---|---:|",
    ]
    for r in report["runs"]:
        peak = r["peak_cuda_mib"] if gpu else r["peak_rss_mib"]
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:,.0f} | {peak:,.0f} | "
                     f"{r['first_loss']:.4f} → {r['last_loss']:.4f} | {r['wall_s']:.0f} |")  # fmt: skip
    full, lora = (next(r for r in report["runs"] if r["mode"] == m) for m in MODES)
    key = "peak_cuda_mib" if gpu else "peak_rss_mib"
    lines += ["", f"LoRA / full: memory {lora[key] / full[key]:.2f}×, tokens/s "
              f"{lora['tokens_per_s'] / full['tokens_per_s']:.2f}×. {report['versions']}"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--out", default="benchmarks/results/lora", help="where the table and the runs go")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 64-wide Llama and 3 steps (the test)")
    p.add_argument("--reference", choices=("live", "cached"), default="live", help="DPO's reference log-probs")
    p.add_argument("--steps", type=int, default=6, help="optimiser steps per mode (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step")
    p.add_argument("--max-length", type=int, default=256, help="longest prompt + response in tokens")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r, all linear layers)")
    p.add_argument("--vocab-size", type=int, default=12000)
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--intermediate-size", type=int, default=4096)
    p.add_argument("--gradient-checkpointing", action="store_true", help="both modes recompute activations")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    if args.tiny:
        args.steps, args.batch_size, args.max_length, args.vocab_size = 3, 4, 128, 300
        args.hidden_size, args.layers, args.heads, args.intermediate_size = 64, 2, 4, 128
    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "inputs"
    info = build_inputs(args, work)
    runs = [run_mode(args, mode, work, out) for mode in MODES]
    report = {
        **info,
        "reference": args.reference,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "runs": runs,
        "args": vars(args),
        "versions": f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}",
    }
    (out / "lora.json").write_text(json.dumps(report, indent=2))
    (out / "lora.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
