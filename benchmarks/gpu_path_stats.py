"""What keeps a GPU waiting, counted on the CPU: distinct attention shapes per epoch and host syncs per step.

    .venv/bin/python benchmarks/gpu_path_stats.py --out benchmarks/results

The GPU race (`benchmarks/README.md`, "bf16 race") profiled rlxf's DPO on an H200 and found the GPU busy 51 ms of
a ~250 ms step: the host built a cuDNN attention plan for every new packed shape and waited on syncs. Both causes
can be counted without a GPU, on the same data and batches as the race:

* attention shapes: every `scaled_dot_product_attention` call of the training steps records (query shape, mask
  shape); distinct ones over one epoch are the plans a GPU builds (forward and backward);
* host syncs: a dispatch mode counts, inside `Engine.train_step`, the ops that make a CUDA host wait for the device
  (`aten._local_scalar_dense`, behind `.item()`, `float()`, `bool()`, `if tensor`; data-dependent shapes: `nonzero`,
  `masked_select`, boolean indexing, `unique`, `repeat_interleave` without `output_size`) and `.tolist()` /
  `.cpu()` / `.numpy()` of tensors. Steps that write metrics (`log_every`) are counted apart.

Data: the HH-RLHF sample in tests/data/hh_rlhf (harmless-base test), a byte-level BPE of --vocab-size tokens trained
on it, the first --pairs pairs whose prompt + longer response fits --max-length, --batch-size pairs per step (one
micro-batch), one epoch. Model: a tiny Llama (shapes and syncs do not depend on its width). Writes
`gpu_path_stats.json` and `.md` into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when it is imported

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

HH_FILE = ROOT / "tests" / "data" / "hh_rlhf" / "harmless-base" / "test.jsonl.gz"

SYNC_OPS = {
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten._unique2",
    "aten.unique_consecutive",
    "aten.unique_dim",
    "aten.equal",
    "aten.is_nonzero",
}


class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that block a CUDA host on the device (see the module docstring), by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.counts[name] += 1
        elif name == "aten.repeat_interleave" and (kwargs or {}).get("output_size") is None and len(args) == 1:
            self.counts[name] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or []
        ):
            self.counts[name + "(bool mask)"] += 1
        return func(*args, **(kwargs or {}))


class ToHostCounter(TorchFunctionMode):
    """Counts Tensor.tolist / .cpu / .numpy (copies to the host: a sync on CUDA)."""

    NAMES = ("tolist", "cpu", "numpy")

    def __init__(self, counts: Counter[str]) -> None:
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES and args and torch.is_tensor(args[0]):
            self.counts[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


class AttentionShapes:
    """Records (query shape, mask shape) of every SDPA call while active."""

    def __init__(self) -> None:
        self.seen: Counter[tuple] = Counter()
        self.active = False
        self._orig = torch.nn.functional.scaled_dot_product_attention

    def __enter__(self) -> AttentionShapes:
        def recorded(query, key, value, attn_mask=None, *args, **kwargs):
            if self.active:
                mask = None if attn_mask is None else tuple(attn_mask.shape)
                self.seen[(tuple(query.shape), mask)] += 1
            return self._orig(query, key, value, attn_mask, *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = recorded
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._orig


def build(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Pairs file, tokenizer and tiny policy / reference / reward model directories."""
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rlxf.data.formats import load_preferences
    from rlxf.data.tokenize import encode_preferences
    from rlxf.models.tiny import TinyModelConfig, build_tiny_model, train_tokenizer

    transformers.logging.set_verbosity_error()
    work.mkdir(parents=True, exist_ok=True)
    rows = load_preferences(str(HH_FILE), on_bad_row="skip", rejected_path=work / "rejected_rows.jsonl")
    tokenizer = train_tokenizer([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], args.vocab_size)
    enc = encode_preferences(rows, tokenizer)
    fits = [
        i
        for i, e in enumerate(enc)
        if len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) <= args.max_length
    ][: args.pairs]
    if len(fits) < args.pairs:
        raise SystemExit(f"only {len(fits)} pairs fit --max-length {args.max_length}")
    with (work / "pairs.jsonl").open("w", encoding="utf-8") as f:
        f.writelines(json.dumps({k: rows[i][k] for k in ("prompt", "chosen", "rejected")}) + "\n" for i in fits)
    tiny = TinyModelConfig(vocab_size=len(tokenizer), hidden_size=32, layers=2, heads=2, intermediate_size=64)
    for name, seed in (("ref", 0), ("policy", 1)):
        model = build_tiny_model(tokenizer, TinyModelConfig(**{**asdict(tiny), "seed": seed}))
        model.config.max_position_embeddings = max(model.config.max_position_embeddings, 2 * args.max_length)
        model.save_pretrained(work / name)
        tokenizer.save_pretrained(work / name)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(
        work / "ref", config=AutoConfig.from_pretrained(work / "ref", num_labels=1)
    )
    rm.save_pretrained(work / "rm")
    tokenizer.save_pretrained(work / "rm")
    return {"pairs": len(fits), "vocab": len(tokenizer)}


def measure(task: str, length_multiple: int, rows_multiple: int, args: argparse.Namespace, work: Path) -> dict:
    """One epoch of `task` (dpo_cached, dpo_live, rm); attention shapes and syncs of the training steps."""
    from rlxf.engine import Engine, TrainConfig

    train = TrainConfig(
        batch_size=args.batch_size,
        per_device_batch_size=args.batch_size,
        epochs=1.0,
        lr=1e-5,
        lr_schedule="constant",
        log_every=args.log_every,
        report_to="none",
        progress=False,
        mixed_precision="no",
        overwrite=True,
        seed=0,
    )
    out = work / "runs" / f"{task}_{length_multiple}_{rows_multiple}"
    common = dict(
        train_file=str(work / "pairs.jsonl"),
        out=str(out),
        max_length=args.max_length,
        max_prompt_length=args.max_length,
        pack_length_multiple=length_multiple,
        pack_rows_multiple=rows_multiple,
        train=train,
    )
    shapes = AttentionShapes()
    per_step: list[tuple[bool, Counter[str]]] = []
    original = Engine.train_step

    def counted(self, micro_batches, loss_fn):
        counts = SyncCounter()
        logs = not (self.step + 1) % self.cfg.log_every or self.step + 1 == self.total_steps
        shapes.active = True
        try:
            with ToHostCounter(counts.counts), counts:
                return original(self, micro_batches, loss_fn)
        finally:
            shapes.active = False
            per_step.append((logs, counts.counts))

    Engine.train_step = counted
    t0 = time.perf_counter()
    try:
        with shapes:
            if task == "rm":
                from rlxf.trainers.rm import RewardModelConfig, train_reward_model

                train_reward_model(RewardModelConfig(model=str(work / "rm"), **common))
            else:
                from rlxf.trainers.dpo import DPOConfig, train_dpo

                reference = "live" if task == "dpo_live" else "cached"
                train_dpo(
                    DPOConfig(model=str(work / "policy"), ref_model=str(work / "ref"), reference=reference, **common)
                )
    finally:
        Engine.train_step = original
    quiet = [sum(c.values()) for logs, c in per_step if not logs]
    logged = [sum(c.values()) for logs, c in per_step if logs]
    by_op: Counter[str] = Counter()
    for logs, c in per_step:
        if not logs:
            by_op.update(c)
    n_quiet = max(len(quiet), 1)
    row_lengths = sorted({q[2] for q, _ in shapes.seen})
    return {
        "task": task,
        "length_multiple": length_multiple,
        "rows_multiple": rows_multiple,
        "steps": len(per_step),
        "distinct_attention_shapes": len(shapes.seen),
        "distinct_row_lengths": len(row_lengths),
        # token positions per forward (R·L), padding included: what the buckets cost
        "positions_per_forward": sum(q[0] * q[2] * n for (q, _mask), n in shapes.seen.items())
        / max(sum(shapes.seen.values()), 1),
        "shapes": sorted(f"q{q} mask{m}" for q, m in shapes.seen),
        "syncs_per_step": max(quiet) if quiet else None,
        "syncs_per_step_min": min(quiet) if quiet else None,
        "syncs_per_logged_step": max(logged) if logged else None,
        "syncs_by_op_per_step": {k: v / n_quiet for k, v in sorted(by_op.items())},
        "wall_s": time.perf_counter() - t0,
    }


def markdown(results: list[dict[str, Any]], info: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "| task | row length multiple | rows multiple | distinct attention shapes / epoch | host syncs / step "
        "(not logging) | host syncs / logging step | syncs by op, per step | positions / forward |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        ops = ", ".join(f"{k} {v:g}" for k, v in r["syncs_by_op_per_step"].items()) or "none"
        lines.append(
            f"| {r['task']} | {r['length_multiple']} | {r['rows_multiple']} | {r['distinct_attention_shapes']} | "
            f"{r['syncs_per_step']} | {r['syncs_per_logged_step']} | {ops} | {r['positions_per_forward']:,.0f} |"
        )
    lines.append(
        f"\n{info['pairs']} HH-RLHF pairs, BPE {info['vocab']}, {args.batch_size} pairs per step (one micro-batch), "
        f"max_length {args.max_length}, one epoch ({results[0]['steps']} steps), log_every {args.log_every}, "
        f"torch {torch.__version__}."
    )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="directory for gpu_path_stats.json / .md")
    p.add_argument("--work", default="", help="scratch directory (default: OUT/gpu_path_stats_work)")
    p.add_argument("--pairs", type=int, default=480)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=12000)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--tasks", nargs="+", default=["dpo_cached", "dpo_live", "rm"])
    p.add_argument(
        "--buckets",
        nargs="+",
        default=["1x1", "256x2"],
        help="row length multiple x rows multiple; 1x1 is the tight packing (the CPU default), 256x2 the GPU default",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    work = Path(args.work) if args.work else out / "gpu_path_stats_work"
    info = build(args, work)
    results = []
    for bucket in args.buckets:
        length_multiple, rows_multiple = (int(x) for x in bucket.split("x"))
        for task in args.tasks:
            results.append(measure(task, length_multiple, rows_multiple, args, work))
            r = results[-1]
            print(
                f"{task} {bucket}: {r['distinct_attention_shapes']} shapes/epoch, {r['syncs_per_step']} syncs/step, "
                f"{r['syncs_per_logged_step']} per logging step ({r['wall_s']:.0f} s)",
                flush=True,
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_path_stats.json").write_text(json.dumps({"info": info, "results": results}, indent=2))
    (out / "gpu_path_stats.md").write_text(markdown(results, info, args))
    print(markdown(results, info, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
