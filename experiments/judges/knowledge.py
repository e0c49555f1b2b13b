"""How much of FactWorld's knowledge base does each model know? The "before" table of the stronger-judges work.

A judge that does not know the facts cannot judge them, so this measures knowledge first, per model:

- **Causal LMs** (SFT policy, a labeller, an RM's starting point): greedy accuracy on every one-attribute question
  "Q: What is the {attribute} of {entity}?" (every entity × attribute of the world). An answer is right when its
  first statement of the asked attribute has the true value (the gold scorer's verdict); the table also gives the
  rate of answers stating no value for it.
- **Reward models**: pairwise accuracy on the world's held-out pairs (`preferences_test.jsonl`, which no training
  step sees) against the simulated human's labels (ties ½) and against gold (pairs with equal gold scores left out),
  by pair type: `value` (same word count: the answers can only differ in what they state), `length` (the shorter
  answer's words all appear in the longer one: it states more or repeats), `both` (the rest).

    python experiments/judges/knowledge.py --world runs/demo/world --lm sft=runs/demo/sft/final \\
        --rm rm=runs/demo/rm/final --out runs/experiments/judges/knowledge_demo.json

Writes the JSON and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from any directory: import the rlxf of this checkout
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rlxf.data.tokenize import encode_prompts  # noqa: E402
from rlxf.evaluation import RewardModelScorer  # noqa: E402
from rlxf.hf import default_device, load_policy  # noqa: E402
from rlxf.losses import pairwise_accuracy  # noqa: E402
from rlxf.sampling import GenerationSettings, decode_samples, generate  # noqa: E402
from rlxf.worlds.factworld import ATTRIBUTES, fact_row, load_factworld, score_response  # noqa: E402

PAIR_TYPES = ("value", "length", "both")


def pair_type(a: str, b: str) -> str:
    """'value' (same word count), 'length' (the shorter's words all in the longer) or 'both'."""
    wa, wb = a.split(), b.split()
    if len(wa) == len(wb):
        return "value"
    short, long_ = (wa, wb) if len(wa) < len(wb) else (wb, wa)
    return "length" if set(short) <= set(long_) else "both"


def question_rows(world) -> list[dict[str, Any]]:
    """One prompt row per entity × attribute, in the knowledge base's order."""
    return [fact_row(world.kb, entity, [attribute]) for entity in world.kb.entities for attribute in ATTRIBUTES]


def judge_answer(row: dict[str, Any], answer: str) -> tuple[bool, bool]:
    """(states the asked attribute, its first statement is true) for a one-attribute question row."""
    attribute = row["attributes"][0]
    verdicts = [v for v in score_response(row, answer).verdicts if v.key == attribute and v.requested]
    return bool(verdicts), bool(verdicts) and verdicts[0].correct is True


@torch.no_grad()
def lm_knowledge(model_dir: str, rows: list[dict[str, Any]], max_new_tokens: int = 24) -> dict[str, Any]:
    """Greedy accuracy of a causal LM on one-attribute questions, overall and per attribute."""
    model, tokenizer = load_policy(model_dir)
    model = model.to(default_device()).eval()
    encoded = encode_prompts(rows, tokenizer)
    samples = generate(
        model,
        [r["prompt_ids"] for r in encoded],
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        settings=GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0),
    )
    answers = [texts[0] for texts in decode_samples(tokenizer, samples)]
    right: dict[str, list[float]] = defaultdict(list)
    stated: list[float] = []
    for row, answer in zip(rows, answers):
        says, correct = judge_answer(row, answer)
        right[row["attributes"][0]].append(float(correct))
        stated.append(float(says))
    every = [x for xs in right.values() for x in xs]
    return {
        "model": model_dir,
        "questions": len(rows),
        "greedy_accuracy": sum(every) / len(every),
        "stated_rate": sum(stated) / len(stated),
        "by_attribute": {a: sum(xs) / len(xs) for a, xs in right.items()},
        "examples": [{"prompt": r["prompt"], "answer": a} for r, a in list(zip(rows, answers))[:3]],
    }


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rm_knowledge(rm_dir: str, pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """Pairwise accuracy against the human labels and against gold, overall and by pair type."""
    scorer = RewardModelScorer(rm_dir)
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    outcomes = pairwise_accuracy(torch.tensor(chosen), torch.tensor(rejected), reduction="none").tolist()
    return {"model": rm_dir, "pairs": len(pairs), **accuracy_by_type(pairs, outcomes)}


def accuracy_by_type(pairs: list[dict[str, Any]], outcomes: list[float]) -> dict[str, Any]:
    """A judge's per-pair outcomes (1 right, 0 wrong, ½ tie, as `pairwise_accuracy`) as accuracy against the human
    labels and against gold (pairs with equal gold scores left out), overall and by pair type."""
    human: dict[str, list[float]] = defaultdict(list)
    gold: dict[str, list[float]] = defaultdict(list)
    for p, outcome in zip(pairs, outcomes):
        kind = pair_type(p["chosen"], p["rejected"])
        human[kind].append(outcome)
        if p["gold_chosen"] != p["gold_rejected"]:
            gold[kind].append(outcome if p["gold_chosen"] > p["gold_rejected"] else 1.0 - outcome)
    every_h = [x for xs in human.values() for x in xs]
    every_g = [x for xs in gold.values() for x in xs]
    return {
        "accuracy_human": _mean(every_h),
        "accuracy_gold": _mean(every_g),
        "gold_pairs": len(every_g),
        "by_type": {
            t: {"pairs": len(human[t]), "accuracy_human": _mean(human[t]), "accuracy_gold": _mean(gold[t])}
            for t in PAIR_TYPES
        },
    }


def gold_ceiling(pairs: list[dict[str, Any]]) -> dict[str, Any]:
    """The gold scorer as a judge: its agreement with the human labels (what label noise leaves), by pair type."""
    gold = pairwise_accuracy(
        torch.tensor([p["gold_chosen"] for p in pairs]), torch.tensor([p["gold_rejected"] for p in pairs]), "none"
    ).tolist()
    out: dict[str, list[float]] = defaultdict(list)
    for p, g in zip(pairs, gold):
        out[pair_type(p["chosen"], p["rejected"])].append(g)
    every = [x for xs in out.values() for x in xs]
    return {"accuracy_human": _mean(every), "by_type": {t: _mean(out[t]) for t in PAIR_TYPES}}


def _named(specs: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"{flag} takes NAME=DIR, got {spec!r}")
        out.append((name, path))
    return out


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| causal LM | greedy fact accuracy | states the asked attribute | " + " | ".join(ATTRIBUTES) + " |",
        "|---|---:|---:|" + "---:|" * len(ATTRIBUTES),
    ]
    for name, r in result["lms"].items():
        per = " | ".join(_fmt(r["by_attribute"].get(a)) for a in ATTRIBUTES)
        lines.append(f"| {name} | {_fmt(r['greedy_accuracy'])} | {_fmt(r['stated_rate'])} | {per} |")
    lines += [
        "",
        "| judge | vs human (all) | vs gold (all) | " + " | ".join(f"{t}: human / gold" for t in PAIR_TYPES) + " |",
        "|---|---:|---:|" + "---:|" * len(PAIR_TYPES),
    ]
    ceiling = result["gold_ceiling"]
    per = " | ".join(f"{_fmt(ceiling['by_type'][t])} / 1" for t in PAIR_TYPES)
    lines.append(f"| gold scorer | {_fmt(ceiling['accuracy_human'])} | 1 | {per} |")
    for name, r in result["rms"].items():
        per = " | ".join(
            f"{_fmt(r['by_type'][t]['accuracy_human'])} / {_fmt(r['by_type'][t]['accuracy_gold'])}" for t in PAIR_TYPES
        )
        lines.append(f"| {name} | {_fmt(r['accuracy_human'])} | {_fmt(r['accuracy_gold'])} | {per} |")
    counts = ", ".join(f"{t} {n}" for t, n in result["pair_counts"].items())
    lines.append(f"\nHeld-out pairs by type: {counts}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--world", required=True, help="a FactWorld directory (rlxf world factworld --out DIR)")
    p.add_argument("--lm", action="append", default=[], help="NAME=DIR of a causal LM to quiz (repeatable)")
    p.add_argument("--rm", action="append", default=[], help="NAME=DIR of a reward model to test (repeatable)")
    p.add_argument("--pairs", default="", help="held-out pairs (default WORLD/preferences_test.jsonl)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N questions and pairs (0: all)")
    p.add_argument("--out", default="", help="write the result as JSON here")
    args = p.parse_args(argv)

    world = load_factworld(args.world)
    rows = question_rows(world)
    pairs_path = Path(args.pairs or Path(args.world) / "preferences_test.jsonl")
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines() if line.strip()]
    if args.limit:
        rows, pairs = rows[: args.limit], pairs[: args.limit]
    result: dict[str, Any] = {
        "world": args.world,
        "pairs_file": str(pairs_path),
        "pair_counts": {t: sum(pair_type(q["chosen"], q["rejected"]) == t for q in pairs) for t in PAIR_TYPES},
        "gold_ceiling": gold_ceiling(pairs),
        "lms": {name: lm_knowledge(path, rows) for name, path in _named(args.lm, "--lm")},
        "rms": {name: rm_knowledge(path, pairs) for name, path in _named(args.rm, "--rm")},
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
