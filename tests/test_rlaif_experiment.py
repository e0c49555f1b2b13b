"""The judge recipe of experiments/rlaif (issue 7 part 7): its SFT rows are the labeller's own prompts, in both
orders, answered with the simulated human's label, and never show a pair the judge will label."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import rlxf.feedback.label as label_module  # noqa: E402
from experiments.common import read_jsonl  # noqa: E402
from experiments.rlaif.judge import (  # noqa: E402
    alignment_by_length,
    assert_disjoint,
    build_judge_rows,
    check_context,
    deepen,
    judge_label_config,
    pair_key,
    pair_keys,
    prepare_judge_data,
    same_length,
    self_check_marks,
    self_check_rationale,
    simulated_human_pairs,
    write_preamble,
)
from rlxf.backends import BackendStats, as_prompt  # noqa: E402


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def judge_rows(factworld_dir, tmp_path):
    cfg = judge_label_config(write_preamble(tmp_path / "preamble.txt"))
    rows, counts = build_judge_rows(cfg, factworld_dir / "preferences_train.jsonl")
    return cfg, rows, counts


def test_rows_in_both_orders_with_the_human_label(factworld_dir, judge_rows):
    _, rows, counts = judge_rows
    raw = read_jsonl(factworld_dir / "preferences_train.jsonl")
    assert counts == {"pairs": len(raw), "excluded": 0, "rows": 2 * len(raw)}
    by_pair: dict[int, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair_index"], []).append(r)
    assert sorted(by_pair) == list(range(len(raw)))
    for i, (first, second) in by_pair.items():
        chosen, rejected = raw[i]["chosen"].strip(), raw[i]["rejected"].strip()
        # the human chose `chosen`: "1" when it is shown in slot 1, "2" when it is shown in slot 2
        assert (first["completion"], first["response_1"], first["response_2"]) == ("1", chosen, rejected)
        assert (second["completion"], second["response_1"], second["response_2"]) == ("2", rejected, chosen)
        assert first["prompt"].endswith("Preferred Response=") and first["prompt"] != second["prompt"]
    # balanced slots: a constant answer fits exactly half of the rows
    assert sum(r["completion"] == "1" for r in rows) == len(rows) // 2


class RecordingBackend:
    """A stand-in labeller LLM that records what `run_label` asks it and answers with the judge rows' labels."""

    kind, model_id = "fake", "fake"

    def __init__(self, answers: dict[str, set[str]]):
        self.answers, self.asked, self.stats = answers, [], BackendStats()

    def prompt_key(self, prompt):
        return as_prompt(prompt).text

    def single_token(self, text):
        return None

    def iter_next_token_logprobs(self, prompts, k, labels=()):
        for i, p in enumerate(prompts):
            text = as_prompt(p).text
            self.asked.append(text)
            want = self.answers.get(text, set())
            p1 = 0.9 if want == {"1"} else 0.1 if want == {"2"} else 0.5
            yield i, {"1": math.log(p1), "2": math.log(1 - p1)}

    def close(self):
        pass


def test_prompts_are_what_the_labeller_builds(factworld_dir, judge_rows, tmp_path, monkeypatch):
    cfg, rows, _ = judge_rows
    answers: dict[str, set[str]] = {}
    for r in rows:
        answers.setdefault(r["prompt"], set()).add(r["completion"])
    fake = RecordingBackend(answers)
    monkeypatch.setattr(label_module, "build_backend", lambda *a, **kw: fake)
    cfg.input = str(factworld_dir / "preferences_train.jsonl")
    cfg.out = str(tmp_path / "labels.jsonl")
    cfg.progress = False
    label_module.run_label(cfg)
    # every prompt the labeller reads is a judge training prompt and vice versa (identical requests are sent once)
    assert set(fake.asked) == set(answers)
    # a judge that answers its training prompts exactly reproduces the human label of every unambiguous pair
    out = read_jsonl(tmp_path / "labels.jsonl")
    unambiguous = [
        o
        for o, r in zip(out, rows[::2])
        if len(answers[r["prompt"]]) == 1 and len(answers[rows[2 * r["pair_index"] + 1]["prompt"]]) == 1
    ]
    assert unambiguous and all(o["human_agrees"] for o in unambiguous)


def test_pairs_to_label_are_left_out(factworld_dir, judge_rows, tmp_path):
    cfg, rows, _ = judge_rows
    raw = read_jsonl(factworld_dir / "preferences_train.jsonl")
    shared = [raw[0], {**raw[3], "chosen": raw[3]["rejected"], "rejected": raw[3]["chosen"]}]  # either order counts
    fresh = {"prompt": raw[0]["prompt"], "chosen": " a new answer.", "rejected": " another new answer."}
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [*shared, fresh])
    with pytest.raises(AssertionError, match="in the judge's training rows"):
        assert_disjoint(rows, pairs)
    kept, counts = build_judge_rows(cfg, factworld_dir / "preferences_train.jsonl", exclude_pairs=[pairs])
    key = lambda r: (r["prompt"].strip(), frozenset((r["chosen"].strip(), r["rejected"].strip())))  # noqa: E731
    n_shared = sum(key(r) in {key(s) for s in shared} for r in raw)  # ≥ 2: a pair may be drawn twice
    assert counts["excluded"] == n_shared >= 2 and len(kept) == 2 * (len(raw) - n_shared)
    assert_disjoint(kept, pairs)
    triples = {(r["context"], r["response_1"], r["response_2"]) for r in kept}
    for s in shared:
        c, a, b = s["prompt"].strip(), s["chosen"].strip(), s["rejected"].strip()
        assert (c, a, b) not in triples and (c, b, a) not in triples


def test_judge_trains_on_the_token_ids_the_labeller_reads(factworld_model_dir, judge_rows):
    from rlxf.data.tokenize import encode_sft
    from rlxf.hf import load_tokenizer

    _, rows, _ = judge_rows
    tok = load_tokenizer(factworld_model_dir)
    encoded = encode_sft(rows[:8], tok)
    for r, e in zip(rows[:8], encoded):
        prompt_ids = tok.encode(r["prompt"], add_special_tokens=True)  # as LocalBackend encodes a completions prompt
        label_id = tok.encode(r["completion"], add_special_tokens=False)
        assert len(label_id) == 1  # the label is one token, read right after "Preferred Response="
        assert e["input_ids"] == prompt_ids + label_id + [tok.eos_token_id]
    positions = 512
    assert check_context(tok, positions, [r["prompt"] for r in rows])["max_prompt_tokens"] + 2 <= positions
    with pytest.raises(ValueError, match="does not fit"):
        check_context(tok, 16, [r["prompt"] for r in rows])


def test_extra_pairs_are_new_draws_labelled_by_the_simulated_human(factworld_dir):
    from rlxf.worlds.factworld import load_factworld

    fw = load_factworld(factworld_dir)
    rows = simulated_human_pairs(factworld_dir, 3, seed=0)
    assert rows == simulated_human_pairs(factworld_dir, 3, seed=0)  # seeded
    assert rows != simulated_human_pairs(factworld_dir, 3, seed=1)
    assert rows[:20] != read_jsonl(factworld_dir / "preferences_train.jsonl")[:20]  # not the world's own draws
    # training prompts only (retain prompts never enter preference data), never a test prompt
    prompts = [r["prompt"] for r in fw.read("prompts_train") if r["kind"] != "retain"]
    assert {r["prompt"] for r in rows} <= set(prompts)  # a one-fact prompt may draw only identical pairs
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in fw.read("prompts_test")}
    assert 2 * len(prompts) < len(rows) <= 3 * len(prompts)  # 3 draws per prompt, identical pairs dropped
    temperature = fw.config.temperature
    assert fw.config.length_bias == 0
    for r in rows:
        g_chosen, g_rejected = fw.score(r, r["chosen"]).score, fw.score(r, r["rejected"]).score
        assert (r["gold_chosen"], r["gold_rejected"]) == (g_chosen, g_rejected)
        # the simulated human (Bradley-Terry on the gold score, no length bias): P(chosen > rejected) =
        # sigmoid((g(chosen) - g(rejected)) / T), and the row keeps that probability as its label_prob
        assert math.isclose(r["label_prob"], 1 / (1 + math.exp(-(g_chosen - g_rejected) / temperature)))
    # sampled labels, not the gold order: some pairs go to the response the gold score ranks lower
    assert any(r["gold_chosen"] < r["gold_rejected"] for r in rows)


def test_extra_and_validation_pairs_stay_out_of_the_pairs_to_label(factworld_dir, tmp_path):
    draws = simulated_human_pairs(factworld_dir, 2, seed=0)  # the extra pairs' first draws: shared on purpose
    pairs = write_jsonl(tmp_path / "pairs.jsonl", draws[:6])
    data = prepare_judge_data(factworld_dir, pairs, tmp_path / "judge", extra_pairs_per_prompt=2, val_pairs=10)
    rows = read_jsonl(data["train_file"])
    val = read_jsonl(data["val_file"])
    world = read_jsonl(factworld_dir / "preferences_train.jsonl")
    counts = data["counts"]
    assert counts["extra_pairs"] == len(draws) and counts["pairs"] == len(world) + len(draws)
    assert counts["excluded"] >= 6 and counts["rows"] == len(rows) == 2 * (counts["pairs"] - counts["excluded"])
    assert len(val) == 10
    assert_disjoint(rows, pairs)
    assert_disjoint(rows, data["val_file"])
    key = lambda r: pair_key(r["prompt"].strip(), r["chosen"].strip(), r["rejected"].strip())  # noqa: E731
    assert not {key(r) for r in val} & (pair_keys(pairs) | {key(r) for r in world})  # fresh validation pairs
    # every extra draw not shown in pairs.jsonl or the validation pairs is a judge pair, labelled by the human
    trained = {(r["context"], r["response_1"], r["response_2"]) for r in rows if r["order"] == "chosen_first"}
    held = pair_keys(pairs) | pair_keys(data["val_file"])
    assert all(
        (r["prompt"].strip(), r["chosen"].strip(), r["rejected"].strip()) in trained
        for r in draws
        if key(r) not in held
    )


def test_deepened_judge_starts_as_the_model_it_deepens(factworld_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from rlxf.hf import load_tokenizer

    out = deepen(factworld_model_dir, tmp_path / "deep", 2)
    base, deep = (AutoModelForCausalLM.from_pretrained(d) for d in (factworld_model_dir, out))
    n = base.config.num_hidden_layers
    assert deep.config.num_hidden_layers == len(deep.model.layers) == n + 2
    assert load_tokenizer(out).get_vocab() == load_tokenizer(factworld_model_dir).get_vocab()
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    # the new blocks add o_proj(...) = 0 and down_proj(...) = 0 to the residual stream: the same logits
    torch.testing.assert_close(deep(input_ids=ids).logits, base(input_ids=ids).logits)
    # ... and they are not dead: their zeroed output projections get a gradient
    deep(input_ids=ids, labels=ids).loss.backward()
    for block in deep.model.layers[n:]:
        assert block.self_attn.o_proj.weight.grad.abs().sum() > 0 and block.mlp.down_proj.weight.grad.abs().sum() > 0


def test_alignment_split_by_response_length():
    # "same length" = the same number of whitespace-separated words, whatever the spacing or the words
    assert same_length(" Ab's pet is fox.", "Ab's  pet is\towl. ")
    assert not same_length(" Ab's pet is fox.", " Ab's pet is fox. Ab's city is Oslo.")
    rows = [
        {"chosen": " a b c.", "rejected": " a b d.", "human_agrees": True},  # 3 vs 3 words: same length
        {"chosen": " a b c.", "rejected": " x y z.", "human_agrees": False},  # same length
        {"chosen": " a b c.", "rejected": " a b.", "human_agrees": False},  # 3 vs 2: different length
        {"chosen": " a.", "rejected": " a b c d.", "human_agrees": True},  # 1 vs 4: different length
        {"chosen": " a b.", "rejected": " a b c d.", "human_agrees": True},  # 2 vs 4: different length
        {"chosen": " a b c d.", "rejected": " w x y z.", "human_agrees": True},  # same length
    ]
    # same length: rows 0, 1, 5 -> 2 agree of 3; different length: rows 2, 3, 4 -> 2 agree of 3
    split = alignment_by_length(rows)
    assert split == {
        "same_length": {"alignment": 2 / 3, "n": 3},
        "different_length": {"alignment": 2 / 3, "n": 3},
    }
    # the two classes partition the rows: their counts add up and the weighted alignments give the overall one
    overall = sum(r["human_agrees"] for r in rows) / len(rows)
    assert math.isclose(sum(v["alignment"] * v["n"] for v in split.values()) / len(rows), overall)
    # a class with no rows has no alignment (not 0)
    assert alignment_by_length(rows[:2])["different_length"] == {"alignment": None, "n": 0}


class ReferenceBackend(RecordingBackend):
    """A labeller that writes the judge rows' rationale after the CoT lead, then answers their labels."""

    def __init__(self, answers: dict[str, set[str]], rationales: dict[str, str]):
        super().__init__(answers)
        self.rationales, self.asked_rationale = rationales, []

    def iter_generate(self, prompts, max_new_tokens, temperature=0.0, top_k=0, seed=0):
        for i, p in enumerate(prompts):
            text = as_prompt(p).text
            self.asked_rationale.append(text)
            yield i, self.rationales[text] + "\nPreferred Response=1"  # run_label cuts the rationale at the ending


def test_reference_cot_rows_are_the_labellers_two_steps(factworld_dir, tmp_path, monkeypatch):
    cfg = judge_label_config(write_preamble(tmp_path / "preamble.txt"), cot=True)
    raw = read_jsonl(factworld_dir / "preferences_train.jsonl")
    references = {r["prompt"].strip(): f"{r['prompt'].split()[-2]} reference answer." for r in raw}
    rows, counts = build_judge_rows(cfg, factworld_dir / "preferences_train.jsonl", references=references)
    assert counts["rows"] == 4 * len(raw)  # two orders × (rationale step, label step)
    steps = [r["step"] for r in rows]
    assert steps[:4] == ["rationale", "label", "rationale", "label"]
    for rationale_row, label_row in zip(rows[::2], rows[1::2]):
        assert rationale_row["prompt"].endswith("Rationale:")
        assert rationale_row["completion"] == " " + references[rationale_row["context"]]
        assert label_row["prompt"] == rationale_row["prompt"] + rationale_row["completion"] + "\nPreferred Response="
        assert label_row["completion"] in ("1", "2")
    assert sum(r["completion"] == "1" for r in rows if r["step"] == "label") == len(raw)
    with pytest.raises(ValueError, match="reference answer"):
        build_judge_rows(cfg, factworld_dir / "preferences_train.jsonl", references={})

    answers: dict[str, set[str]] = {}
    for r in rows[1::2]:
        answers.setdefault(r["prompt"], set()).add(r["completion"])
    rationales = {r["prompt"]: r["completion"] for r in rows[::2]}
    fake = ReferenceBackend(answers, rationales)
    monkeypatch.setattr(label_module, "build_backend", lambda *a, **kw: fake)
    cfg.input, cfg.out, cfg.progress = str(factworld_dir / "preferences_train.jsonl"), str(tmp_path / "l.jsonl"), False
    label_module.run_label(cfg)
    # The labeller asks exactly the judge's step-1 prompts, then exactly its step-2 prompts.
    assert set(fake.asked_rationale) == set(rationales) and set(fake.asked) == set(answers)
    out = read_jsonl(tmp_path / "l.jsonl")
    assert all(o["rationale_ab"] == " " + references[o["prompt"].strip()] for o in out)


def test_judges_json_gets_the_labeller_alignment_by_size(tmp_path, monkeypatch):
    import experiments.rlaif.judge_study as study

    path = tmp_path / "judges.json"
    path.write_text(json.dumps({"commands": {"rm_accuracy_human_heldout": "x"}, "rm_accuracy_human_heldout": 0.5}))
    monkeypatch.setattr(study, "JUDGES_JSON", path)
    records = [
        {"name": "small", "pairs_alignment": 0.51234, "command": "python s --name small --also-pairs"},
        {"name": "large", "pairs_alignment": 0.6, "command": "python s --name large --also-pairs"},
        {"name": "no-pairs", "val_alignment": 0.7},
    ]
    study.write_judges_json(records, ["small", "large"])
    judges = json.loads(path.read_text())
    assert judges["labeller_alignment_by_size"] == [0.5123, 0.6] and judges["labeller_alignment"] == 0.6
    assert judges["rm_accuracy_human_heldout"] == 0.5  # other figures are kept
    assert judges["commands"]["labeller_alignment"] == "python s --name large --also-pairs"
    with pytest.raises(SystemExit, match="no-pairs"):
        study.write_judges_json(records, ["small", "no-pairs"])


def test_self_check_rationale_discusses_both_answers_in_the_order_shown():
    marks_1 = [("Ab's pet is fox", False), ("Ab's city is Oslo", True)]
    marks_2 = [("cheese", True)]
    assert self_check_rationale(marks_1, marks_2) == (
        " Response 1: Ab's pet is fox (no), Ab's city is Oslo (ok). Response 2: cheese (ok)."
    )
    assert self_check_rationale([], marks_2) == " Response 1: nothing. Response 2: cheese (ok)."


def test_self_check_marks_are_the_models_own_greedy_tokens(factworld_sft_dir, factworld_dir):
    """Each claim's verdict equals a naive check: run the model on the text up to the claim's last word and ask
    whether its argmax is the word's first token."""
    import torch

    from rlxf.hf import load_policy

    pairs = read_jsonl(factworld_dir / "preferences_train.jsonl")[:12]
    answers = sorted({(r["prompt"].strip(), r[k].strip()) for r in pairs for k in ("chosen", "rejected")})
    marks = self_check_marks(factworld_sft_dir, answers)
    model, tokenizer = load_policy(str(factworld_sft_dir))
    n_claims = 0
    for context, answer in answers:
        response = " " + answer
        claims = [c.strip() for c in response.replace(",", ".").split(".") if c.strip()]
        assert [c for c, _ in marks[(context, answer)]] == claims
        enc = tokenizer(context + response, return_offsets_mapping=True, add_special_tokens=True)
        position = len(context)
        for claim, ok in marks[(context, answer)]:
            position = response.index(claim, position - len(context)) + len(context)
            word_start = position + claim.rindex(claim.split()[-1])
            token = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a <= word_start][-1]
            with torch.no_grad():
                greedy = model(torch.tensor([enc["input_ids"][:token]])).logits[0, -1].argmax().item()
            assert ok == (greedy == enc["input_ids"][token]), (context, answer, claim)
            n_claims += 1
    assert set(marks) == set(answers) and 0 < n_claims == sum(len(m) for m in marks.values())


def test_self_check_cot_rows_carry_the_marks_of_the_answers_shown(factworld_dir, tmp_path):
    cfg = judge_label_config(write_preamble(tmp_path / "preamble.txt"), cot=True)
    raw = read_jsonl(factworld_dir / "preferences_train.jsonl")
    checks = {
        (r["prompt"].strip(), r[k].strip()): [(r[k].strip(), len(r[k]) % 2 == 0)]
        for r in raw
        for k in ("chosen", "rejected")
    }
    rows, counts = build_judge_rows(cfg, factworld_dir / "preferences_train.jsonl", self_checks=checks)
    assert counts["rows"] == 4 * len(raw)
    for rationale_row, label_row in zip(rows[::2], rows[1::2]):
        first, second = rationale_row["response_1"], rationale_row["response_2"]
        expected = self_check_rationale(
            checks[(rationale_row["context"], first)], checks[(rationale_row["context"], second)]
        )
        assert rationale_row["completion"] == expected
        assert label_row["prompt"] == rationale_row["prompt"] + expected + "\nPreferred Response="
    # both orders of a pair: the same two answers, swapped, and the label follows the human's choice
    for chosen_first, chosen_second in zip(rows[1::4], rows[3::4]):
        assert (chosen_first["response_1"], chosen_first["response_2"]) == (
            chosen_second["response_2"],
            chosen_second["response_1"],
        )
        assert (chosen_first["completion"], chosen_second["completion"]) == ("1", "2")


def test_self_check_diagnostics_by_hand(tmp_path):
    from scripts import load_script

    diag = load_script("experiments/rlaif/self_check_diagnostics.py", "self_check_diagnostics")
    marks = {
        ("Q", "A is x."): [("A is x", True)],
        ("Q", "A is y."): [("A is y", False)],
        ("Q", "A is x. A is z."): [("A is x", True), ("A is z", False)],
    }
    # +1 vs −1: right; 0 vs +1: wrong; 0 vs −1: right; +1 vs +1 (the same answer twice): a tie, ½
    triples = [("Q", "A is x.", "A is y."), ("Q", "A is x. A is z.", "A is x."),
               ("Q", "A is x. A is z.", "A is y."), ("Q", "A is x.", "A is x.")]  # fmt: skip
    assert diag.mark_count_alignment(triples, marks) == pytest.approx((1 + 0 + 1 + 0.5) / 4)
    rows = [
        {"chosen": " A is x.", "rejected": " A is y. A is z.",  # order ab copied right, order ba wrong
         "rationale_ab": " Response 1: A is x (ok). Response 2: A is y (no), A is z (ok).",
         "rationale_ba": " Response 1: A is x (ok), A is z (ok). Response 2: A is x (ok)."},
        {"chosen": " cheese, fish.", "rejected": " bread.",  # both orders right (list items are claims too)
         "rationale_ab": " Response 1: cheese (ok), fish (no). Response 2: bread (ok).",
         "rationale_ba": " Response 1: bread (ok). Response 2: cheese (no), fish (no)."},
    ]  # fmt: skip
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert diag.exact_copy_rate(labels) == 3 / 4
