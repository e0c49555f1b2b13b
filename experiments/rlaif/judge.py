"""A FactWorld judge: fine-tune the tiny SFT policy to answer the RLAIF labelling prompt (issue 7, part 7).

FactWorld has no real LLM judge, so this recipe makes one from simulated-human labels:

1. The judge's training pairs are the world's own human-labelled `preferences_train.jsonl` (noisy responses written
   by the world, labelled by the simulated human). The pairs the judge will label later are the base's `pairs.jsonl`
   (fresh samples of the SFT policy): any pair that occurs in both (same prompt, same two responses, in either
   order) is removed from the training data, and the two sets are then asserted disjoint.
2. Every training pair becomes two SFT rows, one per presentation order. The prompt is the exact labelling prompt
   that `rlxf label` builds (`rlxf.feedback.label.build_template` + `rlxf.feedback.prompts.build_prompt`, on the text
   triples `run_label` makes: `as_text(...).strip()`), with a short FactWorld preamble (a preamble file), task
   "helpful", no chain of thought, 0-shot. The completion is the label token of the slot the simulated human chose:
   "1" when the chosen response is shown first, "2" when it is shown second. With both orders in the data, a rule
   such as "always answer 1" scores exactly chance, so the judge can only fit the labels by reading the answers.
3. The judge is `rlxf.trainers.sft.train_sft` from the base SFT policy (which already knows the world's facts, with
   SFT's noise), with `max_length` = the model's context (`max_position_embeddings`); prompts that would not fit are
   an error, never silently truncated.

    .venv/bin/python experiments/rlaif/judge.py --base runs/demo --out runs/experiments/rlaif/judge

The labeller then reads P("1") and P("2") after "Preferred Response=" in both orders (`rlxf label`, spec §2.2–2.3).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from rlxf.backends import BackendConfig  # noqa: E402
from rlxf.data.formats import (
    load_label_pairs,  # noqa: E402
    write_jsonl,  # noqa: E402
)
from rlxf.engine import TrainConfig  # noqa: E402
from rlxf.feedback.label import LabelConfig, as_text, build_template  # noqa: E402
from rlxf.feedback.prompts import build_cot_scoring_prompt, build_prompt, build_rationale_prompt  # noqa: E402
from rlxf.trainers.sft import SFTConfig, train_sft  # noqa: E402
from rlxf.worlds.factworld import load_factworld  # noqa: E402
from rlxf.worlds.factworld.world import _preferences  # noqa: E402

logger = logging.getLogger("rlaif.judge")

FACTWORLD_PREAMBLE = (
    "You are an expert rater of answers to factual questions. Given a question and two answers, output 1 or 2 to "
    "indicate which answer is more correct."
)
"""The judge's task preamble (a preamble file for `rlxf label --preamble-file`; asks for the better answer, so no
inversion)."""

LABEL_TOKENS = ("1", "2")


def write_preamble(path: str | Path) -> Path:
    """Write FACTWORLD_PREAMBLE to `path` (the `preamble_file` of the judge's label config)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FACTWORLD_PREAMBLE + "\n", encoding="utf-8")
    return path


REFERENCE_MAX_TOKENS = 64
"""Longest rationale the reference-guided judge writes (its own answer to the question: ≤ 4 facts, ~45 tokens)."""

SELF_CHECK_MAX_TOKENS = 128
"""Longest rationale the self-checking judge writes (both answers copied with a mark per claim: ≤ 110 tokens on the base world)."""

RATIONALES = ("reference", "self-check")
"""The judge's chain-of-thought recipes: `reference` writes its own answer first; `self-check` copies each answer's
claims and marks each one with whether the judge would have written it (docs/methods/rlaif.md)."""


def judge_label_config(
    preamble_file: str | Path,
    input: str = "",
    out: str = "",
    backend: BackendConfig | None = None,
    cot: bool = False,
    rationale_max_tokens: int | None = None,
    **kw: Any,
) -> LabelConfig:
    """The labelling config of this experiment: task "helpful" layout (Context / Response 1 / Response 2, ending
    "Preferred Response="), the FactWorld preamble from a file, 0-shot. Without `cot` the label is read straight after
    the sample; with it, the paper's two-step chain of thought (the helpful CoT ending of its Table 21, then
    "Rationale:"), where the reference-guided judge writes its own answer to the question as the rationale. The
    judge is trained on the prompts of this config and labels with it. The rationale's length cap defaults to the
    reference-guided judge's (REFERENCE_MAX_TOKENS) with `cot`, and to LabelConfig's otherwise."""
    if rationale_max_tokens is None and cot:
        rationale_max_tokens = REFERENCE_MAX_TOKENS
    if rationale_max_tokens is not None:
        kw["rationale_max_tokens"] = rationale_max_tokens
    return LabelConfig(
        input=input,
        out=out or "runs/labels.jsonl",
        backend=backend or BackendConfig(),
        task="helpful",
        preamble_file=str(preamble_file),
        cot=cot,
        **kw,
    )


def reference_answers(model_dir: str | Path, contexts: Iterable[str], batch_size: int = 32) -> dict[str, str]:
    """The greedy answer of the causal LM at `model_dir` to each context ("Q: ...\nA:"), as it answers a user.

    These are the reference-guided judge's rationale targets (docs/methods/rlaif.md, "reference-guided chain of
    thought"): the judge learns to write down what *it* believes the answer is before it compares two answers, as an
    LLM judge that solves the question first (Zheng et al. 2023, arXiv 2306.05685, §3.4). The answers come from the
    SFT policy the judge starts from, never from the world's knowledge base, so they carry the policy's own mistakes.
    """
    from experiments.common import greedy_answers

    return greedy_answers(model_dir, contexts, max_new_tokens=REFERENCE_MAX_TOKENS - 1, batch_size=batch_size)


CLAIM = re.compile(r"[^.,]+")
"""A claim of a FactWorld answer as a reader splits it: a sentence ("Zorbin's colour is red") or a list item."""


def self_check_marks(
    model_dir: str | Path, answers: Iterable[tuple[str, str]]
) -> dict[tuple[str, str], list[tuple[str, bool]]]:
    """Each claim of each (context, answer) with the causal LM's own verdict on it: True when the claim's last word
    (the stated value, or the list item) starts with the token the model would have written there itself, reading
    the context and the answer up to that word (teacher-forced greedy agreement; no knowledge base is read).

    These verdicts are the self-checking judge's rationale targets (docs/methods/rlaif.md, "self-check chain of
    thought"): the judge learns to copy each claim and say whether it agrees, so the comparison it must make at the
    label is between nearby marks, not between values 100 tokens apart. They come from the SFT policy the judge starts
    from, so they carry its mistakes."""
    import torch

    from rlxf.hf import load_policy

    model, tokenizer = load_policy(str(model_dir))  # eval mode
    out: dict[tuple[str, str], list[tuple[str, bool]]] = {}
    for context, answer in sorted(set(answers)):
        response = " " + answer
        enc = tokenizer(context + response, return_offsets_mapping=True, add_special_tokens=True)
        ids = enc["input_ids"]
        with torch.inference_mode():
            predicted = model(torch.tensor([ids], device=model.device)).logits[0].argmax(-1).tolist()
        starts = {a: i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a}
        marks = []
        for m in CLAIM.finditer(response):
            claim = m.group().strip()
            if not claim:
                continue
            word_start = len(context) + m.start() + m.group().rstrip().rfind(claim.split()[-1])
            # The token holding the word's first character (BPE tokens usually carry the space before a word).
            token = max(i for a, i in starts.items() if a <= word_start)
            marks.append((claim, token > 0 and predicted[token - 1] == ids[token]))
        out[(context, answer)] = marks
    return out


def self_check_rationale(marks_1: Sequence[tuple[str, bool]], marks_2: Sequence[tuple[str, bool]]) -> str:
    """The self-checking judge's rationale for a pair, in the order shown:
    " Response 1: Zorbin's colour is red (no), Zorbin's pet is cat (ok). Response 2: ..." """

    def discuss(slot: int, marks: Sequence[tuple[str, bool]]) -> str:
        claims = ", ".join(f"{claim} ({'ok' if ok else 'no'})" for claim, ok in marks) or "nothing"
        return f"Response {slot}: {claims}."

    return f" {discuss(1, marks_1)} {discuss(2, marks_2)}"


def label_triple(row: dict[str, Any]) -> tuple[str, str, str]:
    """(context, a, b) of a row from `load_label_pairs`, as `run_label` hands it to the labeller."""
    return (
        as_text(row["prompt"]).strip(),
        as_text(row["response_a"], True).strip(),
        as_text(row["response_b"], True).strip(),
    )


def labelling_prompts(cfg: LabelConfig, context: str, a: str, b: str) -> tuple[str, str]:
    """The two scoring prompts the labeller reads for the pair (a, b): a in slot 1, then b in slot 1."""
    template = build_template(cfg)
    return build_prompt(template, context, a, b), build_prompt(template, context, b, a)


def pair_key(context: str, a: str, b: str) -> tuple[str, frozenset[str]]:
    """A pair's identity regardless of order (the labeller shows both orders anyway)."""
    return context, frozenset((a, b))


def pair_keys(path: str | Path) -> set[tuple[str, frozenset[str]]]:
    """Unordered keys of every pair in a preference / label-input file (as the labeller's text triples)."""
    return {pair_key(*label_triple(r)) for r in load_label_pairs(str(path))}


def build_judge_rows(
    cfg: LabelConfig,
    preferences_file: str | Path,
    exclude_pairs: Iterable[str | Path] = (),
    references: dict[str, str] | None = None,
    self_checks: dict[tuple[str, str], list[tuple[str, bool]]] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """SFT rows that teach a model to answer the labelling prompt of `cfg` like the simulated human.

    Each human-labelled pair (chosen, rejected) of `preferences_file` gives two rows: prompt(chosen, rejected) with
    completion "1" and prompt(rejected, chosen) with completion "2". Pairs also present in any `exclude_pairs` file
    (same context and the same two responses, either order) are left out. Returns the rows (both orders of a pair
    next to each other; extra columns context / response_1 / response_2 / pair_index / order / step) and counts
    {pairs, excluded, rows}.

    With chain of thought (`cfg.cot`), every order gives two rows: step 1, the rationale prompt whose completion is the
    rationale, and step 2, the scoring prompt with that rationale whose completion is the label. The rationale is
    " " + the judge's own answer when `references` maps each context to it (`reference_answers`), or the pair's
    `self_check_rationale` when `self_checks` holds each (context, answer)'s marks (`self_check_marks`).
    """
    excluded = set()
    for path in exclude_pairs:
        excluded |= pair_keys(path)
    template = build_template(cfg)
    rows, n_excluded = [], 0
    pairs = load_label_pairs(str(preferences_file))
    for i, row in enumerate(pairs):
        context, chosen, rejected = label_triple(row)  # a = the human's choice
        if pair_key(context, chosen, rejected) in excluded:
            n_excluded += 1
            continue
        for order, (first, second, label) in enumerate(((chosen, rejected, "1"), (rejected, chosen, "2"))):
            meta = {
                "context": context,
                "response_1": first,
                "response_2": second,
                "pair_index": i,
                "order": "chosen_first" if order == 0 else "chosen_second",
            }
            if not template.cot:
                rows.append({"prompt": build_prompt(template, context, first, second), "completion": label, **meta})
                continue
            if self_checks is not None:
                rationale = self_check_rationale(self_checks[(context, first)], self_checks[(context, second)])
            elif references is not None and context in references:
                rationale = " " + references[context]
            else:
                raise ValueError(f"chain of thought needs the judge's reference answer or self-checks for {context!r}")
            rows.append(
                {"prompt": build_rationale_prompt(template, context, first, second), "completion": rationale}
                | meta
                | {"step": "rationale"}
            )
            scoring = build_cot_scoring_prompt(template, context, first, second, rationale)
            rows.append({"prompt": scoring, "completion": label} | meta | {"step": "label"})
    return rows, {"pairs": len(pairs), "excluded": n_excluded, "rows": len(rows)}


def assert_disjoint(rows: Iterable[dict[str, Any]], label_pairs_file: str | Path) -> None:
    """Raise when a judge training row shows a pair of `label_pairs_file` (same context and responses, either order)."""
    keys = pair_keys(label_pairs_file)
    shared = {pair_key(r["context"], r["response_1"], r["response_2"]) for r in rows} & keys
    if shared:
        context, responses = next(iter(shared))
        raise AssertionError(
            f"{len(shared)} pairs of {label_pairs_file} are in the judge's training rows, e.g. {context!r}: "
            f"{sorted(responses)!r}"
        )


def check_context(tokenizer: Any, max_positions: int, prompts: Sequence[str]) -> dict[str, int]:
    """Token lengths of the labelling prompts (with BOS, as the labeller encodes them) against the model's context:
    prompt + label + EOS must fit. Returns {max_prompt_tokens, mean_prompt_tokens, context}."""
    lengths = [len(ids) for ids in tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
    longest = max(lengths)
    if longest + 2 > max_positions:
        raise ValueError(
            f"the longest labelling prompt is {longest} tokens; with the label and EOS it does not fit the judge's "
            f"context of {max_positions} tokens (max_position_embeddings); shorten the preamble"
        )
    return {
        "max_prompt_tokens": longest,
        "mean_prompt_tokens": round(sum(lengths) / len(lengths)),
        "context": max_positions,
    }


def deepen(model_dir: str | Path, out: str | Path, extra_layers: int) -> Path:
    """A deeper copy of a Llama-style causal LM that computes exactly what the original computes: `extra_layers`
    decoder blocks are appended on top, each a copy of the top block with its output projections (attention o_proj,
    MLP down_proj) set to zero, so it adds nothing to the residual stream until fine-tuning moves them (identity
    initialisation, as in net2net, Chen et al. 2016, arXiv 1511.05641, §3.2). The new blocks read the original's
    final residual stream, where the SFT policy's knowledge (the next fact it would write) is already computed.
    Writes the model and tokenizer to `out`; returns `out`."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from rlxf.hf import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    layers = model.model.layers
    top = layers[-1]
    for _ in range(extra_layers):
        block = copy.deepcopy(top)
        block.self_attn.layer_idx = len(layers)  # the KV-cache slot of this block
        with torch.no_grad():
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        layers.append(block)
    model.config.num_hidden_layers = len(layers)
    out = Path(out)
    model.save_pretrained(out)
    load_tokenizer(model_dir).save_pretrained(out)
    return out


def train_judge(
    sft_model: str | Path, train_file: str | Path, out: str | Path, train: TrainConfig, max_positions: int
) -> Path:
    """Fine-tune `sft_model` on the judge rows (next-token NLL on the label token and EOS); returns `out/final`."""
    train_sft(
        SFTConfig(
            model=str(sft_model),
            train_file=str(train_file),
            out=str(out),
            max_length=max_positions,
            max_prompt_length=max_positions - 2,
            train=train,
        )
    )
    return Path(out) / "final"


def simulated_human_pairs(
    world: str | Path, pairs_per_prompt: int, seed: int, stream: str = "extra"
) -> list[dict[str, Any]]:
    """New human-labelled pairs from the world's own generator and simulated human, on `prompts_train.jsonl` only.

    The world's `_preferences` (the code that wrote `preferences_train.jsonl`: two noisy responses per draw, identical
    pairs dropped, labelled by the simulated human with the world's temperature and length bias) runs again with
    `pairs_per_prompt` draws per prompt and its own random streams "rlaif-judge/{seed}/{stream}/..." (the world's are
    "factworld/{seed}/..."), so the draws are new; short answers repeat, so some pairs equal pairs of the world's
    files. Returns preference rows in the world's format (prompt, chosen, rejected, label_prob, gold_chosen, ...).
    """
    fw = load_factworld(world)
    cfg = dataclasses.replace(fw.config, pairs_per_prompt=pairs_per_prompt)
    rows, _ = _preferences(
        fw.kb,
        fw.read("prompts_train"),
        cfg,
        random.Random(f"rlaif-judge/{seed}/{stream}/responses"),
        random.Random(f"rlaif-judge/{seed}/{stream}/labels"),
    )
    return rows


def validation_pairs(
    world: str | Path, n: int, seed: int, exclude_pairs: Iterable[str | Path] = ()
) -> list[dict[str, Any]]:
    """`n` human-labelled pairs of the judge's training distribution to choose a judge recipe by (never the pairs
    it will label, never the world's test files): fresh draws of `simulated_human_pairs` (stream "validation"), one
    per (prompt, unordered pair), none in `exclude_pairs`, in a seeded random order."""
    excluded = set()
    for path in exclude_pairs:
        excluded |= pair_keys(path)
    draws = simulated_human_pairs(world, 2, seed, stream="validation")
    random.Random(f"rlaif-judge/{seed}/validation/order").shuffle(draws)
    out, seen = [], set()
    for row in draws:
        key = pair_key(row["prompt"].strip(), row["chosen"].strip(), row["rejected"].strip())
        if key not in excluded and key not in seen:
            seen.add(key)
            out.append(row)
    if len(out) < n:
        raise ValueError(f"only {len(out)} new validation pairs could be drawn, {n} asked; ask for fewer")
    return out[:n]


def same_length(a: str, b: str) -> bool:
    """True when two responses have the same number of whitespace-separated words (`str.split`). In FactWorld such
    pairs state the same number of facts and differ only in the values they state, so the length of an answer tells
    nothing about which one is better (the judge-recipe study's "same-length" pairs)."""
    return len(a.split()) == len(b.split())


def alignment_by_length(rows: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Alignment of labelled rows (`rlxf label` output: chosen, rejected, human_agrees) split by `same_length`.

    Returns {"same_length": {"alignment", "n"}, "different_length": {"alignment", "n"}}: the share of rows with
    `human_agrees` (ties already count as disagreement there) and the number of rows; alignment is None when n = 0.
    """
    agrees: dict[str, list[bool]] = {"same_length": [], "different_length": []}
    for r in rows:
        key = "same_length" if same_length(r["chosen"], r["rejected"]) else "different_length"
        agrees[key].append(bool(r["human_agrees"]))
    return {k: {"alignment": sum(v) / len(v) if v else None, "n": len(v)} for k, v in agrees.items()}


def prepare_judge_data(
    world: str | Path,
    pairs: str | Path,
    out: str | Path,
    preferences_file: str | Path | None = None,
    extra_pairs_per_prompt: int = 0,
    val_pairs: int = 0,
    seed: int = 0,
    reference_model: str | Path | None = None,
    rationale: str = "reference",
) -> dict[str, Any]:
    """Write out/preamble.txt and out/judge_train.jsonl from the world's preferences_train.jsonl, excluding the
    pairs of `pairs`; assert disjointness. Returns paths and counts.

    `extra_pairs_per_prompt` > 0 adds that many new draws per training prompt from the world's generator and simulated
    human (`simulated_human_pairs`, written to out/extra_preferences.jsonl; out/judge_preferences.jsonl holds all the
    judge's pairs). `val_pairs` > 0 writes out/judge_val.jsonl, that many fresh pairs of the same distribution kept out
    of the training rows (and of the world's preferences_train and `pairs`), to choose a recipe by.
    `reference_model` switches on chain of thought, with the rationales that `rationale` names (RATIONALES), made by
    that model: "reference", its greedy answers (`reference_answers`, written to out/references.json); "self-check",
    its marks on each claim of both answers (`self_check_marks`, written to out/self_checks.jsonl).
    """
    out = Path(out)
    preamble = write_preamble(out / "preamble.txt")
    cfg = judge_label_config(preamble, cot=reference_model is not None)
    prefs = Path(preferences_file or Path(world) / "preferences_train.jsonl")
    exclude: list[str | Path] = [pairs]
    result: dict[str, Any] = {"preamble": preamble}
    if val_pairs:
        val_file = out / "judge_val.jsonl"
        write_jsonl(val_file, validation_pairs(world, val_pairs, seed, exclude_pairs=[pairs, prefs]))
        exclude.append(val_file)
        result["val_file"] = val_file
    extra: list[dict[str, Any]] = []
    if extra_pairs_per_prompt:
        extra = simulated_human_pairs(world, extra_pairs_per_prompt, seed)
        write_jsonl(out / "extra_preferences.jsonl", extra)
        combined = out / "judge_preferences.jsonl"
        write_jsonl(combined, [json.loads(line) for line in prefs.read_text().splitlines() if line.strip()] + extra)
        prefs = combined
    if rationale not in RATIONALES:
        raise ValueError(f"rationale must be one of {RATIONALES}, got {rationale!r}")
    references = self_checks = None
    if reference_model is not None and rationale == "reference":
        references = reference_answers(reference_model, (label_triple(r)[0] for r in load_label_pairs(str(prefs))))
        (out / "references.json").write_text(json.dumps(references, indent=1), encoding="utf-8")
    elif reference_model is not None:
        triples = [label_triple(r) for r in load_label_pairs(str(prefs))]
        self_checks = self_check_marks(reference_model, [(c, a) for c, *ab in triples for a in ab])
        write_jsonl(
            out / "self_checks.jsonl", [{"context": c, "answer": a, "marks": m} for (c, a), m in self_checks.items()]
        )
    rows, counts = build_judge_rows(cfg, prefs, exclude_pairs=exclude, references=references, self_checks=self_checks)
    for path in exclude:
        assert_disjoint(rows, path)
    counts["extra_pairs"] = len(extra)
    train_file = out / "judge_train.jsonl"
    write_jsonl(train_file, rows)
    logger.info(
        "judge data: %d rows from %d human-labelled pairs of %s (%d new draws; %d pairs shared with %s%s excluded)",
        counts["rows"],
        counts["pairs"],
        prefs,
        counts["extra_pairs"],
        counts["excluded"],
        pairs,
        f" or the {val_pairs} validation pairs" if val_pairs else "",
    )
    return result | {"train_file": train_file, "counts": counts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="runs/experiments/base", help="FactWorld base (experiments/common.py layout)")
    p.add_argument("--out", default="runs/experiments/rlaif/judge", help="where the judge data and model go")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the judge rows")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--batch-size", type=int, default=32, help="rows per optimiser step")
    p.add_argument("--seed", type=int, default=0, help="data-order seed")
    p.add_argument(
        "--extra-pairs",
        type=int,
        default=0,
        help="new human-labelled pairs per training prompt from the world's generator (simulated_human_pairs)",
    )
    p.add_argument("--extra-layers", type=int, default=0, help="identity-initialised blocks added on top (deepen)")
    p.add_argument("--val-pairs", type=int, default=0, help="fresh pairs held out of the rows to choose a recipe by")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from transformers import AutoConfig

    from rlxf.hf import load_tokenizer

    base = Path(args.base)
    data = prepare_judge_data(
        base / "world",
        base / "pairs.jsonl",
        args.out,
        extra_pairs_per_prompt=args.extra_pairs,
        val_pairs=args.val_pairs,
    )
    sft = base / "sft" / "final"
    positions = AutoConfig.from_pretrained(sft).max_position_embeddings
    rows = [json.loads(line) for line in Path(data["train_file"]).read_text().splitlines()]
    print(check_context(load_tokenizer(sft), positions, [r["prompt"] for r in rows]))
    train = TrainConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        per_device_batch_size=args.batch_size,
        warmup_steps=10,
        seed=args.seed,
        report_to="none",
    )
    start = deepen(sft, Path(args.out) / "start", args.extra_layers) if args.extra_layers else sft
    print(train_judge(start, data["train_file"], Path(args.out) / "sft", train, positions))


if __name__ == "__main__":
    main()
