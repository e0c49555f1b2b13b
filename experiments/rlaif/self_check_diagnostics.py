"""Why the self-check judge does (not) work: three measurements on a trained `judge_study.py --self-check-cot` run.

1. **Signal in the marks.** A labeller that only counts its start model's marks (ok +1, no −1 per claim; the higher
   total wins, ties ½) and never reads a label: its alignment with the simulated human on the run's validation pairs
   and on BASE/pairs.jsonl. The ceiling of any judge that learns the label from these rationales.
2. **The copy.** The share of the judge's own rationales (both orders, from its label files) that reproduce every
   claim of both responses, in order.
3. **The label step alone.** The judge's alignment on the validation pairs when it reads the target rationale (the
   start model's marks) instead of writing its own (teacher forcing; debiased over both orders as `rlxf label` does).

    .venv/bin/python experiments/rlaif/self_check_diagnostics.py --run runs/experiments/rlaif-judge-study/selfcheck-2ep \\
        --base runs/experiments/base          # ≈ 1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from experiments.common import read_jsonl  # noqa: E402
from experiments.rlaif.judge import (  # noqa: E402
    CLAIM,
    judge_label_config,
    label_triple,
    self_check_marks,
    self_check_rationale,
)
from rlxf.data.formats import load_label_pairs  # noqa: E402

RATIONALE = re.compile(r"\s*Response 1: (.*)\. Response 2: (.*)\.\s*$")
MARK = re.compile(r" \((ok|no)\)$")


def claims(text: str) -> list[str]:
    return [c.strip() for c in CLAIM.findall(text) if c.strip()]


def mark_count_alignment(triples: list[tuple[str, str, str]], marks: dict) -> float:
    """Alignment of the mark-counting labeller with the human (each triple's first answer is the human's choice)."""
    score = lambda c, a: sum(1 if ok else -1 for _, ok in marks[(c, a)])  # noqa: E731
    outcomes = [
        1.0 if score(c, a) > score(c, b) else 0.5 if score(c, a) == score(c, b) else 0.0 for c, a, b in triples
    ]
    return sum(outcomes) / len(outcomes)


def exact_copy_rate(labels_file: Path) -> float:
    """Share of rationales (both orders) whose copied claims equal the two responses' claims, in the order shown."""
    hits = n = 0
    for r in read_jsonl(labels_file):
        a, b = claims(r["chosen"]), claims(r["rejected"])
        for rationale in (r["rationale_ab"], r["rationale_ba"]):
            n += 1
            m = RATIONALE.match(rationale)
            if m:
                copied = tuple([MARK.sub("", c) for c in part.split(", ")] for part in m.groups())
                hits += copied in ((a, b), (b, a))
    return hits / n


def label_step_alignment(run: Path, triples: list[tuple[str, str, str]], marks: dict) -> float:
    """The judge's debiased choice after the target rationale, against the human's (first answer of each triple)."""
    import torch

    from rlxf.feedback.label import build_template
    from rlxf.feedback.label_math import alignment, debias, label_logprobs, label_token_ids, preference_from_logprobs
    from rlxf.feedback.prompts import build_cot_scoring_prompt
    from rlxf.hf import load_policy

    template = build_template(judge_label_config(run / "preamble.txt", cot=True))
    model, tokenizer = load_policy(str(run / "sft" / "final"))
    token_ids = label_token_ids(tokenizer)
    p_first: dict[str, list[float]] = {"ab": [], "ba": []}
    for c, a, b in triples:
        for order, (x, y) in (("ab", (a, b)), ("ba", (b, a))):
            prompt = build_cot_scoring_prompt(template, c, x, y, self_check_rationale(marks[(c, x)], marks[(c, y)]))
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=True)["input_ids"]], device=model.device)
            with torch.inference_mode():
                logp = label_logprobs(model(ids).logits[:, -1].float().log_softmax(-1), token_ids)  # (1, 2)
            p_first[order].append(preference_from_logprobs(logp[0, 0], logp[0, 1]).item())
    p_a = debias(p_first["ab"], p_first["ba"])
    return alignment(p_a, [True] * len(triples))["accuracy"].item()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a judge_study.py run directory trained with --self-check-cot")
    p.add_argument("--base", default="runs/experiments/base", help="the FactWorld base the run used")
    args = p.parse_args(argv)
    run, base = Path(args.run), Path(args.base)
    val = [label_triple(r) for r in load_label_pairs(str(run / "judge_val.jsonl"))]
    pairs = [label_triple(r) for r in load_label_pairs(str(base / "pairs.jsonl"))]
    marks = self_check_marks(base / "sft" / "final", [(c, x) for c, *ab in val + pairs for x in ab])
    result: dict[str, Any] = {
        "mark_count_alignment_val": mark_count_alignment(val, marks),
        "mark_count_alignment_pairs": mark_count_alignment(pairs, marks),
    }
    for split in ("val", "pairs"):
        if (run / f"{split}_labels.jsonl").exists():
            result[f"exact_copy_rate_{split}"] = exact_copy_rate(run / f"{split}_labels.jsonl")
    result["label_step_alignment_val"] = label_step_alignment(run, val, marks)
    print(json.dumps(result, indent=1))
    (run / "self_check_diagnostics.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
