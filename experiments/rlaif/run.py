"""RLAIF vs RLHF on FactWorld: a fine-tuned tiny judge labels the pairs, then RM, DPO and PPO as in RLHF.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/rlaif/run.py --base runs/demo     # ~15 min on 2 CPU cores
    OMP_NUM_THREADS=1 .venv/bin/python experiments/rlaif/run.py --smoke              # ~1-2 min, tiny settings

1. The shared FactWorld base (`experiments/common.py`: world, tiny Llama, SFT policy, `pairs.jsonl` = SFT samples
   labelled by the simulated human, and the RLHF reward model trained on them); reused when it exists.
2. The judge (`judge.py`): the SFT policy fine-tuned to answer the `rlxf label` prompt with the simulated human's
   label, on the world's `preferences_train.jsonl` (disjoint from `pairs.jsonl`), in both presentation orders.
3. `rlxf label` (`run_label`, local backend) relabels `pairs.jsonl` with the judge: both orders, soft labels.
   The judge also labels the world's held-out `preferences_test.jsonl` and a sample of its own training pairs (fit).
   With `--http`, a slice of the pairs is labelled again through `rlxf serve` on loopback (the OpenAI-compatible
   path), and the two sets of labels are compared.
4. Labeller metrics: alignment with the simulated human's labels, agreement with the gold ordering, position-bias
   rate, calibration (ECE).
5. A soft-label reward model on the AI labels (`label_prob`), against the base's RLHF reward model: pairwise accuracy
   on the world's held-out human pairs.
6. DPO on AI labels vs DPO on human labels; PPO with the AI reward model vs the human reward model (`gold_world`
   logs the gold score of the rollouts, never trained on).
7. Held-out evaluation (`rlxf eval`) of every policy against SFT; results.json, figures/rlaif.png and the results
   block of README.md (between its markers; not with --smoke or --no-readme).

Every stage reuses its output when it exists (delete a directory under --out to redo that stage).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import factworld_base, implicit_rm, mean_sd, read_jsonl, write_results_block  # noqa: E402
from experiments.judges.implicit_rm import pair_accuracy as implicit_pair_accuracy  # noqa: E402
from experiments.rlaif.judge import (  # noqa: E402
    RATIONALES,
    SELF_CHECK_MAX_TOKENS,
    check_context,
    deepen,
    judge_label_config,
    labelling_prompts,
    prepare_judge_data,
    train_judge,
)
from rlxf.backends import BackendConfig  # noqa: E402
from rlxf.data.formats import write_jsonl  # noqa: E402
from rlxf.engine import TrainConfig  # noqa: E402
from rlxf.errors import BackendError  # noqa: E402
from rlxf.evaluation import EvalConfig, reward_model_accuracy, run_eval  # noqa: E402
from rlxf.feedback.label import as_text, run_label  # noqa: E402
from rlxf.sampling import GenerationSettings  # noqa: E402
from rlxf.trainers.dpo import DPOConfig, train_dpo  # noqa: E402
from rlxf.trainers.ppo import PPOConfig, train_ppo  # noqa: E402
from rlxf.trainers.rm import RewardModelConfig, train_reward_model  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
logger = logging.getLogger("rlaif")

FEEDBACK = {"RLHF": "simulated human", "RLAIF": "tiny judge", "d-RLAIF": "SFT policy scoring 1-10 (0-shot)"}
REUSED_SECONDS: dict[str, float] = {}
"""Wall time that earlier invocations spent on the stages this one reuses, so the reported total is the whole
experiment's even when a run was resumed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="", help="run directory (default runs/experiments/rlaif, or rlaif-smoke)")
    p.add_argument("--base", default="runs/experiments/base", help="shared FactWorld base (built if missing)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the DPO and PPO runs")
    p.add_argument("--judge-epochs", type=float, default=3.0, help="passes of the judge over its rows")
    p.add_argument("--judge-lr", type=float, default=1e-3, help="judge learning rate")
    p.add_argument(
        "--judge-extra-pairs",
        type=int,
        default=0,
        help="new human-labelled pairs per training prompt for the judge, from the world's generator and simulated "
        "human (judge.simulated_human_pairs; 0: the world's preferences_train only)",
    )
    p.add_argument(
        "--judge-extra-layers",
        type=int,
        default=0,
        help="decoder blocks added on top of the SFT policy before the judge's fine-tune (judge.deepen: identity "
        "initialised, so the start computes what SFT computes)",
    )
    p.add_argument(
        "--judge-val-pairs",
        type=int,
        default=0,
        help="fresh pairs of the judge's own distribution held out of its rows and labelled to choose a recipe by",
    )
    p.add_argument(
        "--judge-cot",
        choices=("none", *RATIONALES),
        default="none",
        help="the judge's chain of thought (judge.RATIONALES; docs/methods/rlaif.md): none labels straight after the "
        "pair; reference writes its own answer first; self-check marks each claim of both answers first",
    )
    p.add_argument(
        "--judge-model",
        default="",
        metavar="DIR",
        help="use this trained judge (e.g. one of experiments/rlaif/judge_study.py, trained with the same "
        "--judge-cot) instead of training one here",
    )
    p.add_argument("--fit-pairs", type=int, default=400, help="judge training pairs relabelled to measure its fit")
    p.add_argument(
        "--reward-model",
        choices=("bt", "likelihood-ratio"),
        default="bt",
        help="the PPO arms' reward models: bt, a scalar-head Bradley-Terry RM (RLHF: the base's; RLAIF: trained on "
        "the AI's soft labels); likelihood-ratio, r = β·log π/π_sft trained by DPO on each arm's pairs "
        "(experiments/judges/README.md: the stronger judge; read as dpo:DIR:SFT)",
    )
    p.add_argument(
        "--d-rlaif",
        action="store_true",
        help="add d-RLAIF-PPO: the reward is the expected 1-10 score of an off-the-shelf labeller, the SFT policy "
        "0-shot (the paper's setting: no reward model, no fine-tuning; rlaif:SFT?task=helpful)",
    )
    p.add_argument("--rm-epochs", type=float, default=2.0, help="AI reward-model passes (the base RM's setting)")
    p.add_argument("--rm-lr", type=float, default=1e-3, help="AI reward-model learning rate (the base RM's)")
    p.add_argument("--dpo-epochs", type=float, default=2.0, help="DPO passes over the pairs (demo setting)")
    p.add_argument("--dpo-beta", type=float, default=0.1, help="DPO β (demo setting)")
    p.add_argument("--dpo-lr", type=float, default=1e-4, help="DPO learning rate (demo setting)")
    p.add_argument("--steps", type=int, default=30, help="PPO rollouts (optimiser steps of the engine) per run")
    p.add_argument("--prompts-per-step", type=int, default=32, help="PPO prompts per rollout")
    p.add_argument("--k", type=int, default=2, help="PPO responses per prompt")
    p.add_argument("--lr", type=float, default=1e-4, help="PPO policy learning rate")
    p.add_argument("--value-lr", type=float, default=1e-3, help="PPO critic (shared value head) learning rate")
    p.add_argument("--kl-coef", type=float, default=0.05, help="PPO β of the per-token KL penalty")
    p.add_argument("--eval-samples", type=int, default=4, help="held-out responses per prompt and policy")
    p.add_argument("--http", action="store_true", help="also label a slice of the pairs through `rlxf serve`")
    p.add_argument("--http-pairs", type=int, default=100, help="pairs labelled through the HTTP path with --http")
    p.add_argument("--smoke", action="store_true", help="tiny settings, own out dir, README untouched (~1-2 min)")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the results block of README.md")
    p.add_argument("--progress", action="store_true", help="progress bars")
    args = p.parse_args(argv)
    args.out = args.out or ("runs/experiments/rlaif-smoke" if args.smoke else "runs/experiments/rlaif")
    if args.smoke:
        args.steps, args.prompts_per_step, args.eval_samples = 2, 8, 1
        args.fit_pairs, args.http_pairs = 24, 16
        args.no_readme = True
        args.seeds = args.seeds[:1]
    return args


# --- helpers ---------------------------------------------------------------------------------------------------------


def head_file(src: Path, dst: Path, n: int) -> Path:
    """The first n rows of a JSONL file (smoke-sized inputs)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_jsonl(dst, read_jsonl(src)[:n])
    return dst


def train_cfg(args, epochs: float, lr: float, seed: int, smoke_steps: int, **kw: Any) -> TrainConfig:
    """The base's optimisation settings (batch 32, 10 warm-up steps); --smoke caps the steps."""
    return TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=32,
        per_device_batch_size=32,
        warmup_steps=2 if args.smoke else 10,
        max_steps=smoke_steps if args.smoke else 0,
        seed=seed,
        progress=args.progress,
        report_to="none",
        **kw,
    )


def finished(run_dir: Path) -> bool:
    return (run_dir / "final" / "config.json").exists()


def timed(times: dict[str, float], name: str, fn, *a, **kw):
    start = time.perf_counter()
    result = fn(*a, **kw)
    times[name] = times.get(name, 0.0) + time.perf_counter() - start
    logger.info("%s: %.0f s", name, time.perf_counter() - start)
    return result


# --- stages ----------------------------------------------------------------------------------------------------------


def stage_judge(args, base: dict[str, Path], out: Path) -> dict[str, Any]:
    """Judge data (disjoint from the pairs), a context check over every prompt it will see, and the fine-tune."""
    from transformers import AutoConfig

    from rlxf.hf import load_tokenizer

    jdir = out / "judge"
    data = prepare_judge_data(
        base["world"],
        base["pairs"],
        jdir,
        extra_pairs_per_prompt=args.judge_extra_pairs,
        val_pairs=args.judge_val_pairs,
        reference_model=None if args.judge_cot == "none" else base["sft"],
        rationale="reference" if args.judge_cot == "none" else args.judge_cot,
    )
    rows = read_jsonl(data["train_file"])
    if args.smoke:  # a few hundred rows, both orders of each pair kept together
        rows = rows[:256]
        write_jsonl(data["train_file"], rows)
        data["counts"]["rows"] = len(rows)
    positions = AutoConfig.from_pretrained(base["sft"]).max_position_embeddings
    cfg = judge_label_config(data["preamble"])
    to_label = [
        p
        for f in (base["pairs"], base["world"] / "preferences_test.jsonl")
        for r in read_jsonl(f)
        for p in labelling_prompts(cfg, r["prompt"].strip(), r["chosen"].strip(), r["rejected"].strip())
    ]
    context = check_context(load_tokenizer(base["sft"]), positions, [r["prompt"] for r in rows] + to_label)
    logger.info("judge prompts: %s", context)
    model_dir = Path(args.judge_model).parent if args.judge_model else jdir / "sft"
    seconds = 0.0
    if args.judge_model:
        if not (Path(args.judge_model) / "config.json").exists():
            raise SystemExit(f"--judge-model {args.judge_model}: no model there (expected a save_pretrained dir)")
        logger.info("judge: %s (trained elsewhere; its training time is not counted here)", args.judge_model)
    elif not finished(model_dir):
        start = time.perf_counter()
        start_model = deepen(base["sft"], jdir / "start", args.judge_extra_layers) if args.judge_extra_layers else None
        train_judge(
            start_model or base["sft"],
            data["train_file"],
            model_dir,
            train_cfg(args, args.judge_epochs, args.judge_lr, 0, 12),
            positions,
        )
        seconds = time.perf_counter() - start
        (jdir / "seconds.json").write_text(json.dumps({"seconds": seconds}))
    elif (jdir / "seconds.json").exists():
        seconds = json.loads((jdir / "seconds.json").read_text())["seconds"]
        REUSED_SECONDS["judge"] = seconds
    history = read_jsonl(model_dir / "metrics.jsonl")
    nll = [r["loss/nll"] for r in history if "loss/nll" in r]
    return {
        "model": Path(args.judge_model) if args.judge_model else model_dir / "final",
        "preamble": data["preamble"],
        "counts": data["counts"],
        "context": context,
        "train_nll_last20": sum(nll[-20:]) / len(nll[-20:]),
        "seconds": seconds,
        "val_file": data.get("val_file"),
    }


def label_with(judge: dict[str, Any], args, src: Path, out: Path, backend: BackendConfig | None = None) -> dict:
    """`run_label` with the judge's config (answers cached in SQLite beside `out`, so a rerun only reads them)."""
    cfg = judge_label_config(
        judge["preamble"],
        input=str(src),
        out=str(out),
        backend=backend or BackendConfig(kind="local", model=str(judge["model"]), batch_size=16),
        progress=args.progress,
        cot=args.judge_cot != "none",
        rationale_max_tokens=SELF_CHECK_MAX_TOKENS if args.judge_cot == "self-check" else None,
    )
    summary = run_label(cfg)
    summary["metrics_full"] = json.loads(Path(summary["metrics"]).read_text())
    stats = json.loads(Path(summary["stats"]).read_text())
    first = out.with_name(out.name + ".first_run.json")  # the stats of the run that asked the backend
    if stats["requests_sent"] or not first.exists():
        first.write_text(json.dumps(stats))
    else:
        REUSED_SECONDS[f"label {out.name}"] = json.loads(first.read_text())["seconds"]
    summary["stats_full"] = json.loads(first.read_text())
    return summary


def serve_and_label(judge: dict[str, Any], args, src: Path, out: Path) -> dict[str, Any]:
    """Label `src` through `rlxf serve` (a subprocess on 127.0.0.1, free port) with the OpenAI completions client."""
    ready = out.with_name(out.name + ".ready")
    ready.unlink(missing_ok=True)
    log = out.with_name(out.name + ".serve.log")
    with log.open("w") as log_file:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(
            [sys.executable, "-m", "rlxf.cli", "serve", "--model", str(judge["model"]), "--port", "0"]
            + ["--ready_file", str(ready)],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.time() + 120
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"rlxf serve exited with {proc.returncode}: {log.read_text()[-2000:]}")
            if time.time() > deadline:
                raise TimeoutError("rlxf serve did not become ready in 120 s")
            time.sleep(0.2)
        url = ready.read_text().strip()
        logger.info("rlxf serve (pid %d) at %s", proc.pid, url)
        return label_with(
            judge,
            args,
            src,
            out,
            BackendConfig(kind="openai", base_url=url, api="completions", max_retries=2, backoff=0.5),
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gold_agreement(rows: list[dict[str, Any]]) -> tuple[float, int]:
    """Share of pairs with different gold scores whose `chosen` has the higher gold score, and their number."""
    decided = [r for r in rows if abs(r["gold_chosen"] - r["gold_rejected"]) > 1e-9]
    return sum(r["gold_chosen"] > r["gold_rejected"] for r in decided) / len(decided), len(decided)


def by_kind(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Rows of list prompts ("Q: Name 3 foods ...") and of fact prompts ("Q: What are the pet and city of ...")."""
    out: dict[str, list[dict[str, Any]]] = {"fact": [], "list": []}
    for r in rows:
        out["list" if r["prompt"].startswith("Q: Name") else "fact"].append(r)
    return out


@torch.no_grad()
def likelihood_judge(sft: Path, path: Path, batch_size: int = 64) -> dict[str, float]:
    """A diagnostic, not a labeller of the pipeline: prefer the response with the higher summed log-likelihood under
    the SFT policy (the judge's starting point). Returns its agreement with the human labels of `path` (ties in
    likelihood count as wrong) and with the gold order on pairs of different gold score. It shows how much of the
    answer the judge's weights hold before they are taught the labelling prompt."""
    from rlxf.data import load_preferences
    from rlxf.data.tokenize import encode_preferences, pad
    from rlxf.hf import load_policy
    from rlxf.logprobs import sequence_logprobs, shift_for_next_token

    model, tok = load_policy(str(sft))
    rows = encode_preferences(load_preferences(str(path)), tok)
    scores = []  # (chosen, rejected) summed log-probs per pair
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        seqs = [r["prompt_ids"] + r[f"{side}_ids"] for side in ("chosen", "rejected") for r in chunk]
        masks = [
            [0] * len(r["prompt_ids"]) + [1] * len(r[f"{side}_ids"]) for side in ("chosen", "rejected") for r in chunk
        ]
        ids, attention = pad(seqs, tok.pad_token_id, side="right")  # (2B, L)
        mask, _ = pad(masks, 0, side="right")
        logits = model(input_ids=ids.to(model.device), attention_mask=attention.to(model.device)).logits
        lp = sequence_logprobs(*shift_for_next_token(logits, ids.to(model.device), mask.to(model.device)))  # (2B,)
        scores += list(zip(lp[: len(chunk)].tolist(), lp[len(chunk) :].tolist()))
    raw = read_jsonl(path)
    decided = [(c, r, x) for (c, r), x in zip(scores, raw) if abs(x["gold_chosen"] - x["gold_rejected"]) > 1e-9]
    return {
        "alignment": sum(c > r for c, r in scores) / len(scores),
        "gold_agreement": sum((c > r) == (x["gold_chosen"] > x["gold_rejected"]) for c, r, x in decided)
        / len(decided),
    }


def labeller_metrics(ai: dict[str, Any], human_pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The judge's metrics on the pairs it labelled, and the simulated human's reference values."""
    m = ai["metrics_full"]
    ai_rows = read_jsonl(ai["out"])
    gold_ai, n_decided = gold_agreement(ai_rows)
    gold_human, _ = gold_agreement(human_pairs)
    return {
        "alignment": m["alignment"]["accuracy"],
        "n_ties": m["alignment"]["n_ties"],
        "n": m["alignment"]["n"],
        "position_bias_rate": m["position_bias"]["rate"],
        "slot1_share": m["position_bias"]["slot1_share"],
        "position_binomial_p": m["position_bias"]["binomial_p"],
        "ece": m["calibration"]["ece"],
        "calibration_bins": m["calibration"]["bins"],
        "mean_label_prob": m["mean_label_prob"],
        "gold_agreement": gold_ai,
        "n_gold_decided": n_decided,
        "human_gold_agreement": gold_human,
        # a noiseless gold judge agrees with a sampled human label with probability max(p, 1 − p): the ceiling
        "oracle_alignment": sum(max(r["label_prob"], 1 - r["label_prob"]) for r in human_pairs) / len(human_pairs),
        "n_dropped": ai["n_dropped"],
        # position vs content: the mean P(slot 1) over both orders, and how far the debiased P(a ≻ b) is from ½
        "mean_p_slot1": sum(r["p_first_ab"] + r["p_first_ba"] for r in ai_rows) / (2 * len(ai_rows)),
        "mean_abs_p_a_minus_half": sum(abs(r["p_a"] - 0.5) for r in ai_rows) / len(ai_rows),
        "alignment_by_kind": {
            kind: sum(r["human_agrees"] for r in rows) / len(rows) for kind, rows in by_kind(ai_rows).items() if rows
        },
    }


def compare_http(local_out: str, http_out: str) -> dict[str, Any]:
    """Labels of the same pairs through the local and the HTTP backend: max |Δp_a|, same AI choice, imputed labels."""
    local = {(r["prompt"], frozenset((r["chosen"], r["rejected"]))): r for r in read_jsonl(local_out)}
    diffs, same, imputed, n = [], 0, 0, 0
    for r in read_jsonl(http_out):
        twin = local[(r["prompt"], frozenset((r["chosen"], r["rejected"])))]
        diffs.append(abs(r["p_a"] - twin["p_a"]))  # p_a = P(input's a ≻ b) in both files (a = the human's choice)
        same += r["chosen"] == twin["chosen"]
        imputed += bool(r["imputed"])
        n += 1
    return {"n": n, "max_abs_diff_p_a": max(diffs), "same_choice": same / n, "n_imputed": imputed}


def direct_score_accuracy(spec: str, pairs: list[dict[str, Any]]) -> float:
    """Pairwise accuracy of a d-RLAIF scorer against the human labels of `pairs` (the higher expected score wins,
    ties ½): how well the reward the d-RLAIF arm optimises orders held-out answers."""
    from rlxf.rewards.rlaif import DirectScoreSource

    source = DirectScoreSource.from_spec(spec.removeprefix("rlaif:"))
    contexts = [as_text(r["prompt"]).strip() for r in pairs]
    chosen = source.score(contexts, [as_text(r["chosen"], True).strip() for r in pairs]).tolist()
    rejected = source.score(contexts, [as_text(r["rejected"], True).strip() for r in pairs]).tolist()
    # an unscored answer (NaN: no score token among the top-k) leaves the pair a tie, as it gets reward 0 in PPO
    outcomes = [0.5 if math.isnan(c) or math.isnan(r) or c == r else float(c > r) for c, r in zip(chosen, rejected)]
    return sum(outcomes) / len(outcomes)


def ppo_run(args, base: dict[str, Path], reward: str, seed: int, out: Path, prompts: Path) -> dict:
    cfg = PPOConfig(
        model=str(base["sft"]),
        prompts_file=str(prompts),
        reward=reward,
        out=str(out),
        gold_world=str(base["world"]),  # logged only: the policy never sees the gold score
        shared_value_head=True,
        value_lr=args.value_lr,
        k=args.k,
        generation=GenerationSettings(max_new_tokens=48, temperature=1.0, batch_size=64),
        kl_coef=args.kl_coef,
        train=TrainConfig(
            lr=args.lr,
            batch_size=args.prompts_per_step,
            per_device_batch_size=min(16, args.prompts_per_step),
            max_steps=args.steps,
            lr_schedule="constant",
            seed=seed,
            progress=args.progress,
            report_to="none",
        ),
    )
    done = out / "run.json"
    if done.exists() and finished(out):  # finished earlier: reuse (delete to redo)
        record = json.loads(done.read_text())
        REUSED_SECONDS[out.name] = record["seconds"]
        return record
    start = time.perf_counter()
    result = train_ppo(cfg)
    record = {"history": result["history"], "seconds": time.perf_counter() - start}
    done.write_text(json.dumps(record))
    return record


def dpo_run(args, base: dict[str, Path], pairs: Path, seed: int, out: Path) -> dict:
    done = out / "run.json"
    if done.exists() and finished(out):
        record = json.loads(done.read_text())
        REUSED_SECONDS[out.name] = record["seconds"]
        return record
    start = time.perf_counter()
    train_dpo(
        DPOConfig(
            model=str(base["sft"]),
            train_file=str(pairs),
            out=str(out),
            beta=args.dpo_beta,
            train=train_cfg(args, args.dpo_epochs, args.dpo_lr, seed, 4),
        )
    )
    record = {"seconds": time.perf_counter() - start}
    done.write_text(json.dumps(record))
    return record


# --- main ------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("rlxf", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    # 1. base
    base = timed(times, "base", factworld_base, args.base, seed=0, progress=args.progress)
    world = base["world"]
    pairs, heldout, prompts = base["pairs"], world / "preferences_test.jsonl", world / "prompts_train.jsonl"
    eval_prompts = world / "prompts_test.jsonl"
    if args.smoke:
        pairs = head_file(base["pairs"], out / "inputs" / "pairs.jsonl", 64)
        heldout = head_file(heldout, out / "inputs" / "preferences_test.jsonl", 48)
        eval_prompts = head_file(eval_prompts, out / "inputs" / "prompts_test.jsonl", 16)

    # 2. judge
    logger.info("judge: data and fine-tune")
    judge = timed(times, "judge", stage_judge, args, base, out)

    # 3. labels: the pairs (used for training), the held-out human pairs and a sample of the judge's own pairs
    labels = out / "labels"
    fit_src = labels / "inputs" / "judge_fit_pairs.jsonl"
    fit_src.parent.mkdir(parents=True, exist_ok=True)
    trained = [  # the pairs the judge was trained on, as human-labelled pairs (chosen = the human's choice)
        {"prompt": r["context"], "chosen": r["response_1"], "rejected": r["response_2"]}
        for r in read_jsonl(out / "judge" / "judge_train.jsonl")
        if r["order"] == "chosen_first"
    ]
    step = max(1, len(trained) // args.fit_pairs)
    write_jsonl(fit_src, trained[::step][: args.fit_pairs])
    logger.info("labelling with the judge")
    ai = timed(times, "label pairs", label_with, judge, args, pairs, labels / "ai_pairs.jsonl")
    ai_heldout = timed(times, "label held-out", label_with, judge, args, heldout, labels / "heldout.jsonl")
    ai_fit = timed(times, "label fit", label_with, judge, args, fit_src, labels / "judge_fit.jsonl")
    ai_val = None
    if judge["val_file"]:
        ai_val = timed(times, "label val", label_with, judge, args, judge["val_file"], labels / "judge_val.jsonl")
    http = None
    if args.http:
        http_src = head_file(pairs, labels / "inputs" / "http_pairs.jsonl", args.http_pairs)
        try:
            http_sum = timed(times, "label http", serve_and_label, judge, args, http_src, labels / "http_pairs.jsonl")
        except BackendError as e:
            # rlxf serve drops a greedy EOS from `top_logprobs`, so a judge whose most likely next token is EOS gets
            # an empty list back, which the client reads as a malformed body (see the README)
            http = {"error": str(e)[:300]}
            logger.warning("HTTP path failed: %s", e)
        else:
            http = compare_http(ai["out"], http_sum["out"]) | {
                "calls": http_sum["calls"],
                "retries": http_sum["retries"],
                "requests_cached": http_sum["requests_cached"],
            }
            logger.info("HTTP path vs local: %s", http)

    # 4. labeller metrics
    lab = labeller_metrics(ai, read_jsonl(pairs))
    lab["heldout_alignment"] = ai_heldout["alignment"]
    lab["heldout_oracle_alignment"] = labeller_metrics(ai_heldout, read_jsonl(heldout))["oracle_alignment"]
    lab["heldout_position_bias_rate"] = ai_heldout["position_bias_rate"]
    lab["fit_alignment"] = ai_fit["alignment"]
    if ai_val:
        lab["val_alignment"] = ai_val["alignment"]
        lab["val_oracle_alignment"] = labeller_metrics(ai_val, read_jsonl(judge["val_file"]))["oracle_alignment"]
    lab["label_seconds"] = ai["stats_full"]["seconds"]
    lab["likelihood_judge"] = likelihood_judge(base["sft"], pairs)
    lab["likelihood_judge_heldout"] = likelihood_judge(base["sft"], heldout)
    logger.info(
        "judge: alignment %.3f (held-out %.3f, own training pairs %.3f), gold agreement %.3f, position bias %.3f, "
        "ECE %.3f",
        lab["alignment"], lab["heldout_alignment"], lab["fit_alignment"], lab["gold_agreement"],
        lab["position_bias_rate"], lab["ece"],
    )  # fmt: skip

    # 5. the reward models of the PPO arms, each scored on the held-out human pairs
    if args.reward_model == "bt":  # RLHF: the base's scalar RM; RLAIF: a scalar RM on the AI's soft labels
        rm_ai_dir = out / "rm_ai"
        if not finished(rm_ai_dir):
            logger.info("reward model on AI labels")
            timed(
                times,
                "rm",
                train_reward_model,
                RewardModelConfig(
                    model=str(base["sft"]),
                    train_file=str(ai["out"]),
                    out=str(rm_ai_dir),
                    use_label_prob=True,
                    train=train_cfg(args, args.rm_epochs, args.rm_lr, 0, 4),
                ),
            )
            (rm_ai_dir / "seconds.json").write_text(json.dumps({"seconds": times["rm"]}))
        elif (rm_ai_dir / "seconds.json").exists():
            REUSED_SECONDS["rm"] = json.loads((rm_ai_dir / "seconds.json").read_text())["seconds"]
        rms = {"RLHF": f"rm:{base['rm']}", "RLAIF": f"rm:{rm_ai_dir / 'final'}"}
        rm_acc = {"RLHF": reward_model_accuracy(str(base["rm"]), str(heldout)),
                  "RLAIF": reward_model_accuracy(str(rm_ai_dir / "final"), str(heldout))}  # fmt: skip
    else:  # the likelihood-ratio RM of each arm's pairs (hard labels: the human's choice, or the judge's)
        rms, rm_acc = {}, {}
        for name, train_file in (("RLHF", pairs), ("RLAIF", Path(ai["out"]))):
            rm_dir = out / f"rm_{name.lower()}_likelihood_ratio"
            judge_dir = timed(times, "rm", implicit_rm, base["sft"], train_file, rm_dir, 0, args.progress)
            rms[name] = f"dpo:{judge_dir}:{base['sft']}"
            rm_acc[name] = implicit_pair_accuracy(judge_dir, str(base["sft"]), read_jsonl(heldout))["accuracy_human"]
    if args.d_rlaif:  # d-RLAIF: no reward model; its "RM accuracy" is the scorer's pairwise accuracy
        rms["d-RLAIF"] = f"rlaif:{base['sft']}?task=helpful&cache={out / 'd_rlaif_scores.sqlite'}"
        rm_acc["d-RLAIF"] = direct_score_accuracy(rms["d-RLAIF"], read_jsonl(heldout))
    logger.info("RM pairwise accuracy on held-out human pairs: %s", rm_acc)

    # 6. policies
    train_pairs = {"RLHF": pairs, "RLAIF": Path(ai["out"])}
    runs: dict[str, dict[int, dict]] = {}
    policies = {"SFT": [base["sft"]]}
    for name in ("RLHF", "RLAIF"):
        for seed in args.seeds:
            logger.info("%s-DPO, seed %d", name, seed)
            d = out / f"dpo-{name.lower()}-seed{seed}"
            runs.setdefault(f"{name}-DPO", {})[seed] = timed(
                times, "dpo", dpo_run, args, base, train_pairs[name], seed, d
            )
            policies.setdefault(f"{name}-DPO", []).append(d / "final")
    ppo_prompts = head_file(prompts, out / "inputs" / "prompts_train.jsonl", 64) if args.smoke else prompts
    for name in rms:
        for seed in args.seeds:
            logger.info("%s-PPO, seed %d", name, seed)
            d = out / f"ppo-{name.lower()}-seed{seed}"
            arm = f"{name}-PPO"
            runs.setdefault(arm, {})[seed] = timed(times, "ppo", ppo_run, args, base, rms[name], seed, d, ppo_prompts)
            h = runs[arm][seed]["history"]
            logger.info(
                "  gold %.3f -> %.3f, KL %.2f", h["rewards/gold"][0], h["rewards/gold"][-1], h["objective/kl"][-1]
            )
            policies.setdefault(arm, []).append(d / "final")

    # 7. held-out evaluation
    flat = [(name, i, path) for name, paths in policies.items() for i, path in enumerate(paths)]
    logger.info("held-out evaluation of %d policies", len(flat))
    summary = timed(
        times,
        "eval",
        run_eval,
        EvalConfig(
            policies=[str(p) for _, _, p in flat],
            names=[f"{name}-{i}" for name, i, _ in flat],
            world=str(world),
            prompts_file=str(eval_prompts),
            out=str(out / "eval"),
            samples_per_prompt=args.eval_samples,
            generation=GenerationSettings(max_new_tokens=48, temperature=1.0, batch_size=64),
            seed=0,
        ),
    )
    evals = {name: [summary["policies"][f"{name}-{i}"] for i in range(len(paths))] for name, paths in policies.items()}

    table = {}
    for name, results in evals.items():
        kind = name.rsplit("-", 1)[0]  # "RLHF-DPO" -> "RLHF", "d-RLAIF-PPO" -> "d-RLAIF"
        table[name] = {
            "labels": "–" if name == "SFT" else FEEDBACK[kind],
            "rm_accuracy": rm_acc[kind] if name.endswith("PPO") else None,
            **{
                key: mean_sd([r[key] for r in results])
                for key in ("win_rate", "gold_score", "hallucination_rate", "retain_accuracy", "kl_to_reference")
            },
        }
    curves = {
        name: [runs[name][s]["history"]["rewards/gold"] for s in args.seeds] for name in runs if name.endswith("PPO")
    }
    figure = out / "rlaif.png" if args.smoke else HERE / "figures" / "rlaif.png"
    figure.parent.mkdir(exist_ok=True)
    p_a = [r["p_a"] for r in read_jsonl(ai["out"])]  # a = the human's choice in every input pair
    plot(lab, p_a, curves, args.prompts_per_step * args.k, figure)

    results = {
        "table": table,
        "labeller": lab,
        "rm_accuracy": rm_acc,
        "judge": {k: str(v) if isinstance(v, Path) else v for k, v in judge.items()},
        "http_check": http,
        "per_policy": evals,
        "ppo_history": {n: {s: runs[n][s]["history"] for s in args.seeds} for n in runs if n.endswith("PPO")},
        "settings": vars(args),
        "seconds": times,
        "reused_seconds": REUSED_SECONDS,
        "total_seconds": time.perf_counter() - t0 + sum(REUSED_SECONDS.values()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {os.cpu_count()} cores",
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    block = render(results, args)
    print(block)
    if not args.no_readme:
        write_results_block(HERE / "README.md", "results", block)
    return results


def plot(
    lab: dict[str, Any], p_a: list[float], curves: dict[str, list[list[float]]], per_step: int, path: Path
) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    ax1.hist(p_a, bins=40, color="C2")
    ax1.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    ax1.set_xlabel("judge's debiased P(human's choice ≻ the other)")
    ax1.set_ylabel("pairs")
    ax1.set_title(f"Judge on {len(p_a)} pairs: alignment {lab['alignment']:.3f}, ECE {lab['ece']:.3f}", fontsize=10)
    for i, (name, runs) in enumerate(curves.items()):
        x = [(s + 1) * per_step for s in range(len(runs[0]))]
        for run in runs:
            ax2.plot(x, run, color=f"C{i}", alpha=0.3 if len(runs) > 1 else 1.0, linewidth=0.8)
        mean = [sum(r[s] for r in runs) / len(runs) for s in range(len(runs[0]))]
        ax2.plot(x, mean, color=f"C{i}", label=f"{name} (mean of {len(runs)} seed{'s' * (len(runs) > 1)})")
    ax2.set_xlabel("responses sampled (rollouts seen)")
    ax2.set_ylabel("gold score of the rollout's responses")
    ax2.set_title("PPO: reward model from human vs AI labels", fontsize=10)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def fmt(ms: tuple[float, float] | float | None, n_seeds: int) -> str:
    if ms is None:
        return "–"
    if isinstance(ms, tuple):
        return f"{ms[0]:.3f} ± {ms[1]:.3f}" if n_seeds > 1 else f"{ms[0]:.3f}"
    return f"{ms:.3f}"


def render(results: dict[str, Any], args) -> str:
    lab, judge, table, n = results["labeller"], results["judge"], results["table"], len(args.seeds)
    lines = [
        "| policy | labels | RM accuracy (held-out human pairs) | gold win rate vs SFT | gold score | "
        "hallucination rate | retain accuracy | KL to SFT |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        cells = [row["labels"], fmt(row["rm_accuracy"], 1)]
        cells += [
            fmt(row[k], 1 if name == "SFT" else n)  # one SFT policy, evaluated once
            for k in ("win_rate", "gold_score", "hallucination_rate", "retain_accuracy")
        ]
        cells.append(fmt(row["kl_to_reference"], n) if name != "SFT" else "0")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lab_lines = [
        "| labeller | alignment with human labels | held-out alignment | agreement with gold order | position bias "
        "(slot-1 share) | ECE | mean label_prob |",
        "|---|---|---|---|---|---|---|",
        f"| tiny judge | {lab['alignment']:.3f} | {lab['heldout_alignment']:.3f} | {lab['gold_agreement']:.3f} | "
        f"{lab['position_bias_rate']:.3f} ({fmt(lab['slot1_share'], 1)}) | {lab['ece']:.3f} | "
        f"{lab['mean_label_prob']:.3f} |",
        f"| simulated human (itself) | 1 | 1 | {lab['human_gold_agreement']:.3f} | – | – | – |",
        f"| noiseless gold judge (ceiling) | {lab['oracle_alignment']:.3f} | {lab['heldout_oracle_alignment']:.3f} "
        "| 1 | 0 | – | – |",
        f"| SFT log-likelihood (diagnostic, not a labeller) | {lab['likelihood_judge']['alignment']:.3f} | "
        f"{lab['likelihood_judge_heldout']['alignment']:.3f} | {lab['likelihood_judge']['gold_agreement']:.3f} | "
        "– | – | – |",
    ]
    rm = results["rm_accuracy"]
    http = results["http_check"]
    http_line = (
        f"HTTP check (`rlxf serve` on loopback) failed: {http['error']}\n\n"
        if http and "error" in http
        else f"HTTP check (`rlxf serve` on loopback, {http['n']} pairs): max |Δp_a| vs the local backend "
        f"{http['max_abs_diff_p_a']:.2e}, same choice on {100 * http['same_choice']:.0f}% of pairs, "
        f"{http['n_imputed']} imputed labels.\n\n"
        if http
        else ""
    )
    c = judge["counts"]
    extra = (
        f": the world's preferences_train plus {c['extra_pairs']} new draws of its generator and simulated human"
        if c.get("extra_pairs")
        else ""
    )
    layers = f"; SFT policy + {args.judge_extra_layers} identity-initialised blocks" if args.judge_extra_layers else ""
    val = (
        f" On {args.judge_val_pairs} validation pairs of its own distribution (held out of its rows) its alignment is "
        f"{lab['val_alignment']:.3f} (noiseless gold judge {lab['val_oracle_alignment']:.3f})."
        if "val_alignment" in lab
        else ""
    )
    seeds = f"seed {args.seeds[0]}" if n == 1 else f"seeds {args.seeds} (mean ± sd)"
    return (
        f"Base `{args.base}`; judge: {c['rows']} rows ({c['pairs'] - c['excluded']} human-labelled pairs × 2 orders"
        f"{extra}; {c['excluded']} pairs shared with `pairs.jsonl`"
        f"{' or the validation pairs' if args.judge_val_pairs else ''} left out){layers}, "
        f"prompts ≤ {judge['context']['max_prompt_tokens']} "
        f"of {judge['context']['context']} tokens, {args.judge_epochs:g} epochs at lr {args.judge_lr:g}, final train "
        f"NLL/token {judge['train_nll_last20']:.3f}. The judge relabelled {lab['n']} pairs "
        f"({lab['n_ties']} ties, {lab['n_dropped']} dropped) in {lab['label_seconds']:.0f} s; its alignment with the "
        f"human labels of {args.fit_pairs} of its own training pairs is {lab['fit_alignment']:.3f}.{val}\n\n"
        + "\n".join(lab_lines)
        + f"\n\nThe judge's P(slot 1) averages {lab['mean_p_slot1']:.3f} over both orders, while the debiased P(a ≻ b) "
        f"is on average {lab['mean_abs_p_a_minus_half']:.3f} from ½; alignment on fact prompts "
        f"{lab['alignment_by_kind'].get('fact', math.nan):.3f}, on list prompts "
        f"{lab['alignment_by_kind'].get('list', math.nan):.3f}."
        + f"\n\n{'Scalar Bradley–Terry' if args.reward_model == 'bt' else 'Likelihood-ratio'} reward models "
        f"(`--reward-model {args.reward_model}`), pairwise accuracy on the held-out human pairs (`preferences_test.jsonl`): "
        f"RLHF {rm['RLHF']:.3f}, RLAIF {rm['RLAIF']:.3f}"
        + (
            f"; the d-RLAIF scorer (the SFT policy's expected 1-10 score) orders them right on {rm['d-RLAIF']:.3f}"
            if "d-RLAIF" in rm
            else ""
        )
        + ".\n\n"
        + http_line
        + f"DPO β {args.dpo_beta}, lr {args.dpo_lr}, {args.dpo_epochs:g} epochs; PPO {args.steps} rollouts of "
        f"{args.prompts_per_step} prompts × k={args.k}, lr {args.lr}, critic lr {args.value_lr}, β {args.kl_coef}; "
        f"{seeds}; held-out: {args.eval_samples} samples per test prompt. Total "
        f"{results['total_seconds'] / 60:.1f} min.\n\n"
        + "\n".join(lines)
        + "\n\n![judge labels and PPO gold curves](figures/rlaif.png)\n"
    )


if __name__ == "__main__":
    main()
