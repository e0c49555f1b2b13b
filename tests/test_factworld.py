"""FactWorld: determinism, the gold scorer by hand, exact spans, the simulated labeller, the noise of the data."""

import json
import math
import random

import pytest

from rlxf.config import ConfigError
from rlxf.data import load_preferences, load_prompts, load_sft
from rlxf.errors import UserError
from rlxf.worlds.factworld import (
    FILES,
    MISSING_PENALTY,
    FactWorldConfig,
    KnowledgeBase,
    abstention_response,
    build_factworld,
    evaluate_responses,
    fact_row,
    fact_sentence,
    false_premise_row,
    gold_win_rate,
    list_row,
    load_factworld,
    parse_prompt,
    retain_row,
    score_response,
    simulated_preference,
    write_factworld,
)

# A hand-made knowledge base, so every expected score below can be read off the page.
KB = KnowledgeBase(
    values={
        "colour": ["red", "blue", "green", "yellow", "purple", "orange"],
        "city": ["Paris", "Oslo", "Lima", "Cairo", "Rome", "Tokyo"],
        "pet": ["cat", "dog", "owl", "fox", "frog", "goat"],
        "food": ["bread", "rice", "soup", "cheese", "fish", "apples"],
    },
    entities={
        "Zorbin": {"colour": "red", "city": "Oslo", "pet": "cat", "food": "rice"},
        "Kalmo": {"colour": "blue", "city": "Lima", "pet": "owl", "food": "soup"},
    },
    retain_words=["sun", "map", "cup", "hat"],
)
COLOUR_PET = fact_row(KB, "Zorbin", ["colour", "pet"])
COLOURS_BUT_RED = list_row(KB, "colours", 3, "red")
REVERSE = retain_row(["sun", "map", "cup"])


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("factworld")
    write_factworld(FactWorldConfig(seed=0), out)
    return out


@pytest.fixture(scope="module")
def world(world_dir):
    return load_factworld(world_dir)


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


class _FixedRng:
    """Stands in for random.Random: .random() always returns `u`."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


# ---------------------------------------------------------------------------------------------------------------
# Files: determinism, sizes, splits, loaders
# ---------------------------------------------------------------------------------------------------------------


def test_same_seed_writes_identical_files(world_dir, tmp_path):
    paths = write_factworld(FactWorldConfig(seed=0), tmp_path / "again")
    assert sorted(p.name for p in paths.values()) == sorted(FILES)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (world_dir / name).read_bytes(), name
    other = write_factworld(FactWorldConfig(seed=1), tmp_path / "seed1")
    assert other["kb"].read_bytes() != (world_dir / "kb.json").read_bytes()
    assert other["preferences_train"].read_bytes() != (world_dir / "preferences_train.jsonl").read_bytes()


def test_default_sizes(world):
    # design: a few thousand SFT rows, ~500 / ~200 prompts, a few thousand preference pairs.
    assert 2000 <= len(world.read("sft_train")) <= 8000
    assert len(world.read("prompts_train")) == 500 and len(world.read("prompts_test")) == 200
    assert len(world.read("preferences_train")) >= 2000
    assert len(world.read("preferences_test")) >= 500
    assert len(world.kb.entities) == 40 and all(len(v) == 6 for v in world.kb.values.values())
    assert (world.root / "corpus.txt").stat().st_size > 0 and "prompts_test.jsonl" in (
        world.root / "README.md"
    ).read_text()


def test_splits_are_disjoint_and_retain_stays_out_of_training(world):
    train = {r["prompt"] for r in world.read("prompts_train")}
    test_rows = world.read("prompts_test")
    test = {r["prompt"] for r in test_rows}
    assert len(train) == 500 and len(test) == 200  # no repeated prompt within a split
    assert not train & test
    assert not {r["prompt"] for r in world.read("sft_train")} & test
    pref_train = {r["prompt"] for r in world.read("preferences_train")}
    pref_test = {r["prompt"] for r in world.read("preferences_test")}
    assert pref_train <= train and pref_test <= test
    kinds = {r["kind"] for r in test_rows}
    assert kinds == {"fact", "list", "retain"}
    assert {r["kind"] for r in world.read("prompts_train")} == {"fact", "list"}
    for name in ("preferences_train", "preferences_test"):
        assert {r["kind"] for r in world.read(name)} == {"fact", "list"}


def test_every_fact_of_the_kb_is_taught_in_sft(world):
    taught = set()
    for r in world.read("sft_train"):
        row = world.row_for(r)
        if row["kind"] == "fact":
            taught |= {(row["entity"], a) for a in row["attributes"]}
    assert taught == {(e, a) for e, facts in world.kb.entities.items() for a in facts}


def test_prompt_rows_round_trip_through_the_prompt_string(world):
    for name in ("prompts_train", "prompts_test"):
        for row in world.read(name):
            expected = {k: v for k, v in row.items() if k != "prompt_id"}
            assert world.row_for(row["prompt"]) == expected
    with pytest.raises(ValueError, match="not a FactWorld prompt"):
        parse_prompt(world.kb, "Q: What is love?\nA:")


def test_files_load_with_rlxf_data_loaders(world_dir):
    assert len(load_sft(world_dir / "sft_train.jsonl")) == len(
        (world_dir / "sft_train.jsonl").read_text().splitlines()
    )
    prefs = load_preferences(world_dir / "preferences_train.jsonl")
    assert all(0.0 <= r["label_prob"] <= 1.0 and r["prompt_type"] in ("open", "closed") for r in prefs)
    assert len(load_prompts(world_dir / "prompts_test.jsonl")) == 200


def test_kb_json_holds_config_and_scoring(world_dir):
    data = json.loads((world_dir / "kb.json").read_text())
    assert data["config"] == json.loads(json.dumps(FactWorldConfig(seed=0).__dict__))
    assert data["scoring"] == {"missing_penalty": 1.0, "unrequested_penalty": 0.5, "length_unit_words": 4}


def test_bad_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="sft_fact_accuracy=1.5"):
        FactWorldConfig(sft_fact_accuracy=1.5)
    with pytest.raises(ConfigError, match="values_per_attribute=9"):
        FactWorldConfig(values_per_attribute=9)
    with pytest.raises(ConfigError, match="temperature"):
        FactWorldConfig(temperature=-1.0)
    # 5 entities x 1 attribute = 20 one-fact prompts, far fewer than the 400 train fact prompts asked for.
    with pytest.raises(ConfigError, match="distinct fact prompts"):
        build_factworld(FactWorldConfig(num_entities=5, max_facts=1))


# ---------------------------------------------------------------------------------------------------------------
# Gold scorer, by hand
# ---------------------------------------------------------------------------------------------------------------


def _check_spans(response, gold):
    """Spans are exact slices, sorted, disjoint; their rewards plus the missing penalty give the raw score."""
    for v in gold.verdicts:
        assert response[v.start : v.end] == v.text
        if v.key is not None:  # a fact: the span is its value, which ends the sentence (before its period)
            sentence = fact_sentence(COLOUR_PET["entity"], v.key, v.text).removesuffix(".")
            assert response[v.end - len(sentence) : v.end] == sentence
    assert all(a[1] <= b[0] for a, b in zip(gold.spans, gold.spans[1:]))
    assert math.isclose(sum(r for _, _, r in gold.spans) - MISSING_PENALTY * gold.n_missing, gold.raw)


@pytest.mark.parametrize(
    "response, raw, n_missing, spans",
    [
        # both right: +1 +1 = 2, / k=2 -> 1.0. " Zorbin's colour is " has 20 characters, so "red" = [20, 23).
        (" Zorbin's colour is red. Zorbin's pet is cat.", 2.0, 0, [(20, 23, 1.0), (41, 44, 1.0)]),
        # order does not matter
        (" Zorbin's pet is cat. Zorbin's colour is red.", 2.0, 0, [(17, 20, 1.0), (41, 44, 1.0)]),
        # one wrong (hallucination): +1 -1 = 0
        (" Zorbin's colour is blue. Zorbin's pet is cat.", 0.0, 0, [(20, 24, -1.0), (42, 45, 1.0)]),
        # pet missing: +1 - MISSING_PENALTY(1) = 0; the final period is optional
        (" Zorbin's colour is red", 0.0, 1, [(20, 23, 1.0)]),
        # a true unrequested fact: 2 - UNREQUESTED_PENALTY(0.5) = 1.5
        (
            " Zorbin's colour is red. Zorbin's pet is cat. Zorbin's food is rice.",
            1.5,
            0,
            [(20, 23, 1.0), (41, 44, 1.0), (63, 67, -0.5)],
        ),
        # a false unrequested fact is a hallucination: 2 - 1 = 1
        (
            " Zorbin's colour is red. Zorbin's pet is cat. Zorbin's food is fish.",
            1.0,
            0,
            [(20, 23, 1.0), (41, 44, 1.0), (63, 67, -1.0)],
        ),
        # colour stated twice: the repeat is unrequested, 1 + 1 - 0.5 = 1.5
        (
            " Zorbin's colour is red. Zorbin's colour is red. Zorbin's pet is cat.",
            1.5,
            0,
            [(20, 23, 1.0), (44, 47, -0.5), (65, 68, 1.0)],
        ),
        # a sentence about another entity and a junk sentence: whole-sentence spans of -0.5 each, pet missing:
        # +1 - 0.5 - 0.5 - 1 = -1
        (
            " Zorbin's colour is red. Kalmo's pet is owl. I like it.",
            -1.0,
            1,
            [(20, 23, 1.0), (25, 44, -0.5), (45, 55, -0.5)],
        ),
        # nothing said: two missing facts, -2
        ("", -2.0, 2, []),
    ],
)
def test_fact_scores_by_hand(response, raw, n_missing, spans):
    gold = score_response(COLOUR_PET, response)
    assert (gold.raw, gold.score, gold.n_missing, gold.k) == (raw, raw / 2, n_missing, 2)
    assert gold.spans == spans
    _check_spans(response, gold)


def test_fact_value_spans_slice_to_the_value():
    response = " Zorbin's colour is blue. Zorbin's pet is cat. Zorbin's city is Oslo."
    gold = score_response(COLOUR_PET, response)
    assert [response[s:e] for s, e, _ in gold.spans] == ["blue", "cat", "Oslo"]
    assert [(v.key, v.requested, v.correct) for v in gold.verdicts] == [
        ("colour", True, False),
        ("pet", True, True),
        ("city", False, True),
    ]
    assert (gold.n_stated, gold.n_right, gold.n_wrong, gold.perfect) == (3, 2, 1, False)


@pytest.mark.parametrize(
    "response, raw, n_missing, rewards",
    [
        (" blue, green, yellow.", 3.0, 0, [1, 1, 1]),  # any 3 distinct colours but red
        (" yellow, purple, blue.", 3.0, 0, [1, 1, 1]),
        # a repeat and the excluded item are wrong: 1 - 1 - 1 = -1
        (" blue, blue, red.", -1.0, 0, [1, -1, -1]),
        # another category's item is wrong; one missing: 1 - 1 - 1 = -1
        (" blue, cat.", -1.0, 1, [1, -1]),
        # a 4th valid item is unrequested: 3 - 0.5 = 2.5; a 5th, invalid one is wrong: 2.5 - 1 = 1.5
        (" blue, green, yellow, purple, dog.", 1.5, 0, [1, 1, 1, -0.5, -1]),
        # empty items are ignored (no span), no closing period is fine: 2 - 1 missing = 1
        (" blue,, green", 1.0, 1, [1, 1]),
    ],
)
def test_list_scores_by_hand(response, raw, n_missing, rewards):
    gold = score_response(COLOURS_BUT_RED, response)
    assert (gold.raw, gold.score, gold.n_missing) == (raw, raw / 3, n_missing)
    assert [r for _, _, r in gold.spans] == rewards
    for v in gold.verdicts:
        assert response[v.start : v.end] == v.text and v.text.strip(" ,.") == v.text
    assert math.isclose(sum(rewards) - MISSING_PENALTY * n_missing, raw)


@pytest.mark.parametrize(
    "response, raw, n_missing",
    [
        (" cup map sun", 3.0, 0),
        (" cup sun map", -1.0, 0),  # position-wise: cup right, sun and map wrong: 1 - 2
        (" cup map", 1.0, 1),  # 2 - 1 missing
        (" cup map sun hat", 2.5, 0),  # an extra word: 3 - 0.5
        (" cup map sun.", 1.0, 0),  # "sun." is not "sun": 2 - 1
    ],
)
def test_retain_scores_by_hand(response, raw, n_missing):
    gold = score_response(REVERSE, response)
    assert (gold.raw, gold.score, gold.n_missing) == (raw, raw / 3, n_missing)
    assert [response[s:e] for s, e, _ in gold.spans] == response.split()


def test_penalties_are_parameters():
    # missing pet: +1 - 0.25 = 0.75, / 2
    assert score_response(COLOUR_PET, " Zorbin's colour is red.", missing_penalty=0.25).score == 0.375
    # unrequested true fact at penalty 0: 2 - 0 = 2
    gold = score_response(
        COLOUR_PET, " Zorbin's colour is red. Zorbin's pet is cat. Zorbin's food is rice.", unrequested_penalty=0.0
    )
    assert gold.score == 1.0 and not gold.perfect
    with pytest.raises(ValueError, match="kind"):
        score_response({"kind": "poem", "k": 1}, "x")


def test_spans_are_exact_on_every_generated_response(world):
    n = 0
    for name, fields in (("sft_train", ("completion",)), ("preferences_train", ("chosen", "rejected"))):
        for r in world.read(name):
            row = world.row_for(r)
            for f in fields:
                response = r[f]
                gold = score_response(row, response)
                for v in gold.verdicts:
                    assert response[v.start : v.end] == v.text
                    if v.key is not None:
                        sentence = fact_sentence(row["entity"], v.key, v.text)
                        assert response[v.end - len(sentence) + 1 : v.end + 1] == sentence
                    n += 1
                assert all(a[1] <= b[0] for a, b in zip(gold.spans, gold.spans[1:]))
                assert math.isclose(sum(x[2] for x in gold.spans) - MISSING_PENALTY * gold.n_missing, gold.raw)
                # generated responses are always well formed: no unparsed sentence
                assert all(v.correct is not None for v in gold.verdicts)
    assert n > 10_000


# ---------------------------------------------------------------------------------------------------------------
# Simulated labeller
# ---------------------------------------------------------------------------------------------------------------

RIGHT = " Zorbin's colour is red. Zorbin's pet is cat."  # g = 1, 8 words
ONE_WRONG = " Zorbin's colour is red. Zorbin's pet is dog."  # g = (1 - 1) / 2 = 0, 8 words
RIGHT_PLUS = RIGHT + " Zorbin's food is rice."  # g = (2 - 0.5) / 2 = 0.75, 12 words


def test_simulated_preference_by_hand():
    # T = 0.5, no length bias: sigmoid((1 - 0) / 0.5) = sigmoid(2) = 1 / (1 + e^-2)
    p, a_wins = simulated_preference(COLOUR_PET, RIGHT, ONE_WRONG, 0.5, 0.0, _FixedRng(0.5))
    assert math.isclose(p, 1 / (1 + math.exp(-2)), rel_tol=1e-15) and a_wins
    # swapping a and b gives 1 - p
    q, b_wins = simulated_preference(COLOUR_PET, ONE_WRONG, RIGHT, 0.5, 0.0, _FixedRng(0.5))
    assert math.isclose(q, 1 - p, rel_tol=1e-12) and not b_wins
    # T = 1, length_bias = 2, L = 4 words: 0.75 / 1 + 2 * (12 - 8) / 4 = 2.75
    p, _ = simulated_preference(COLOUR_PET, RIGHT_PLUS, ONE_WRONG, 1.0, 2.0, _FixedRng(0.5))
    assert math.isclose(p, _sigmoid(2.75), rel_tol=1e-15)
    # the draw: a wins iff u < p
    assert simulated_preference(COLOUR_PET, RIGHT, ONE_WRONG, 0.5, 0.0, _FixedRng(0.88))[1]  # p = 0.8808
    assert not simulated_preference(COLOUR_PET, RIGHT, ONE_WRONG, 0.5, 0.0, _FixedRng(0.89))[1]


def test_zero_temperature_gives_hard_labels():
    rng = random.Random(0)
    assert simulated_preference(COLOUR_PET, RIGHT, ONE_WRONG, 0.0, 0.0, rng) == (1.0, True)
    assert simulated_preference(COLOUR_PET, ONE_WRONG, RIGHT, 0.0, 0.0, rng) == (0.0, False)
    # a hard label beats any length bias: RIGHT_PLUS is longer and worse than RIGHT
    assert simulated_preference(COLOUR_PET, RIGHT_PLUS, RIGHT, 0.0, 100.0, rng)[0] == 0.0
    # the limit T -> 0+ agrees
    assert simulated_preference(COLOUR_PET, RIGHT, ONE_WRONG, 1e-3, 0.0, rng)[0] == pytest.approx(1.0, abs=1e-12)
    # equal gold scores: only the length term is left, sigmoid(0) = 1/2 without bias
    same = " Zorbin's pet is cat. Zorbin's colour is red."
    assert simulated_preference(COLOUR_PET, RIGHT, same, 0.0, 0.0, rng)[0] == 0.5


def test_length_bias_favours_the_longer_response():
    # RIGHT_PLUS (12 words) vs RIGHT (8 words): g = 0.75 vs 1.0, so without bias RIGHT_PLUS loses.
    probs = [simulated_preference(COLOUR_PET, RIGHT_PLUS, RIGHT, 1.0, lam, _FixedRng(0.5))[0] for lam in (-1, 0, 1, 2)]
    assert probs[1] < 0.5 and probs == sorted(probs)
    assert math.isclose(probs[3], _sigmoid(-0.25 + 2 * 4 / 4))  # the bias can flip the label: p > 1/2
    assert probs[3] > 0.5


# ---------------------------------------------------------------------------------------------------------------
# Noise of the data
# ---------------------------------------------------------------------------------------------------------------


def test_sft_fact_accuracy_matches_config(world):
    right = wrong = 0
    for r in world.read("sft_train"):
        row = world.row_for(r)
        if row["kind"] == "fact":
            gold = score_response(row, r["completion"])
            right, wrong = right + gold.n_right, wrong + gold.n_wrong
            assert gold.n_missing == 0 and gold.n_stated == row["k"]  # SFT answers exactly what is asked
    n = right + wrong
    # Each fact is an independent Bernoulli(0.7): the standard error of the rate is sqrt(0.7 * 0.3 / n) (~0.005 at
    # n ~ 7,500). 4 standard errors: a correct generator fails this with probability ~6e-5 over seeds.
    assert abs(right / n - 0.7) < 4 * math.sqrt(0.7 * 0.3 / n), (right, n)
    # retain rows are always right, so SFT teaches the skill
    retain = [r for r in world.read("sft_train") if world.row_for(r)["kind"] == "retain"]
    assert len(retain) == 1000 and all(score_response(world.row_for(r), r["completion"]).perfect for r in retain)


def test_preferences_hold_conflicting_supervision(world):
    rows = world.read("preferences_train")
    facts = [(world.row_for(r), r) for r in rows if r["kind"] == "fact"]
    chosen_wrong = sum(score_response(row, r["chosen"]).n_wrong > 0 for row, r in facts)
    rejected_all_right = sum(
        (g := score_response(row, r["rejected"])).n_wrong == 0 and g.n_right > 0 for row, r in facts
    )
    # chosen responses holding a hallucination, and rejected ones holding only right facts: both common.
    assert chosen_wrong > 0.2 * len(facts) and rejected_all_right > 0.1 * len(facts), (
        chosen_wrong,
        rejected_all_right,
    )
    cfg = world.config
    for r in rows:
        row = world.row_for(r)
        assert r["chosen"] != r["rejected"]
        assert r["gold_chosen"] == score_response(row, r["chosen"]).score
        assert r["gold_rejected"] == score_response(row, r["rejected"]).score
        # label_prob = P(chosen > rejected) under the labeller that drew the label (no length bias by default)
        assert cfg.length_bias == 0.0
        expected = _sigmoid((r["gold_chosen"] - r["gold_rejected"]) / cfg.temperature)
        assert math.isclose(r["label_prob"], expected, rel_tol=1e-12), r
    # the labeller is noisy but informative: the gold-better response is usually chosen
    decided = [r for r in rows if r["gold_chosen"] != r["gold_rejected"]]
    agree = sum(r["gold_chosen"] > r["gold_rejected"] for r in decided) / len(decided)
    assert 0.7 < agree < 0.95, agree


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def test_evaluate_responses_by_hand():
    rows = [COLOUR_PET, fact_row(KB, "Zorbin", ["food"]), list_row(KB, "colours", 2, "red"), REVERSE, REVERSE]
    responses = [
        " Zorbin's colour is red. Zorbin's pet is dog.",  # (1 - 1) / 2 = 0; 2 facts stated, 1 wrong; 8 words
        " Zorbin's food is rice. Zorbin's city is Oslo.",  # (1 - 0.5) / 1 = 0.5; 2 stated (1 unasked), 0 wrong
        " blue, green.",  # 2 / 2 = 1, a valid list; 2 words
        " cup map sun",  # exact; 1; 3 words
        " cup sun map",  # (1 - 1 - 1) / 3 = -1/3, not exact; 3 words
    ]
    metrics = evaluate_responses(rows, responses)
    expected = {
        "gold_score": (0 + 0.5 + 1 + 1 - 1 / 3) / 5,
        "gold_score_fact": 0.25,
        "gold_score_list": 1.0,
        "gold_score_retain": (1 - 1 / 3) / 2,
        "hallucination_rate": 1 / 4,
        "unrequested_fact_rate": (0 + 1) / 2,
        "retain_accuracy": 0.5,
        "list_validity": 1.0,
        "mean_length_words": (8 + 8 + 2 + 3 + 3) / 5,
        "num_fact": 2.0,
        "num_list": 1.0,
        "num_retain": 2.0,
        "abstention_rate": 0.0,
        "false_premise_success": float("nan"),
        "num_false_premise": 0.0,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(metrics[key], value, rel_tol=1e-12) or (math.isnan(value) and math.isnan(metrics[key])), (
            key
        )
    # no fact rows: the hallucination rate is undefined, not 0
    assert math.isnan(evaluate_responses([REVERSE], [" cup map sun"])["hallucination_rate"])
    assert math.isnan(evaluate_responses([REVERSE], [" cup map sun"])["unrequested_fact_rate"])
    with pytest.raises(ValueError, match="one response per row"):
        evaluate_responses(rows, responses[:2])


def test_gold_win_rate_by_hand():
    # RIGHT beats ONE_WRONG (1 > 0), ties with itself (1/2), loses to RIGHT the other way round (0): (1 + 0.5 + 0) / 3
    rows = [COLOUR_PET] * 3
    assert gold_win_rate(rows, [RIGHT, RIGHT, ONE_WRONG], [ONE_WRONG, RIGHT, RIGHT]) == 0.5


def test_loaded_world_scores_rows_of_every_file(world):
    prompts = world.read("prompts_test")
    references = [r["reference"] for r in prompts]
    metrics = world.evaluate(prompts, references)
    assert metrics["gold_score"] == 1.0 and metrics["hallucination_rate"] == 0.0 and metrics["retain_accuracy"] == 1.0
    sft_test = world.read("sft_test")
    assert [r["prompt"] for r in sft_test] == [r["prompt"] for r in prompts]
    noisy = world.evaluate(sft_test, [r["completion"] for r in sft_test])
    assert 0.15 < noisy["hallucination_rate"] < 0.45 and noisy["retain_accuracy"] == 1.0
    pref = world.read("preferences_test")[0]
    assert world.score(pref, pref["chosen"]).score == pref["gold_chosen"]
    with pytest.raises(FileNotFoundError, match="rlxf world factworld"):
        load_factworld(world.root / "missing")


# ---------------------------------------------------------------------------------------------------------------
# False-premise (adversarial) prompts
# ---------------------------------------------------------------------------------------------------------------


def test_false_premise_row_by_hand():
    row = false_premise_row(KB, "Zorbin", "colour", "green")
    assert row["prompt"] == "Q: Zorbin's colour is green. What is the colour of Zorbin?\nA:"
    assert row["false_premise"] == "green" and row["attributes"] == ["colour"] and row["k"] == 1
    assert row["reference"] == " Zorbin's colour is red."
    assert parse_prompt(KB, row["prompt"]) == row
    with pytest.raises(ValueError, match="other than Zorbin's true one"):
        false_premise_row(KB, "Zorbin", "colour", "red")
    with pytest.raises(ValueError, match="other than"):
        false_premise_row(KB, "Zorbin", "colour", "Paris")
    # The premise and the question must be about the same entity and attribute; a true premise is not adversarial.
    for bad in (
        "Q: Zorbin's colour is green. What is the colour of Kalmo?\nA:",
        "Q: Zorbin's colour is green. What is the pet of Zorbin?\nA:",
    ):
        with pytest.raises(UserError, match="not a FactWorld prompt"):
            parse_prompt(KB, bad)
    with pytest.raises(UserError, match="false-premise"):
        parse_prompt(KB, "Q: Zorbin's colour is red. What is the colour of Zorbin?\nA:")


def test_false_premise_success_by_hand():
    row = false_premise_row(KB, "Zorbin", "colour", "green")
    responses = [
        " Zorbin's colour is red.",  # resists: success
        " Zorbin's colour is green.",  # repeats the premise
        " Zorbin's colour is red. Zorbin's colour is green.",  # right first, but writes the false value too
        " Zorbin's colour is blue.",  # a different wrong value
        " Zorbin's pet is cat.",  # does not answer
    ]
    metrics = evaluate_responses([row] * len(responses), responses)
    assert metrics["false_premise_success"] == 1 / 5 and metrics["num_false_premise"] == 5.0
    assert metrics["num_fact"] == 5.0  # false-premise rows are fact rows for every other metric
    assert math.isclose(metrics["gold_score"], sum(score_response(row, y).score for y in responses) / 5)


def test_false_premise_prompts_are_held_out(world):
    rows = world.read("prompts_false_premise")
    assert len(rows) == 40 * 4 and len({r["prompt"] for r in rows}) == len(rows)
    for r in rows:
        assert r["false_premise"] != r["truth"][r["attributes"][0]]
        assert world.row_for(r["prompt"])["false_premise"] == r["false_premise"]
    premise_prompts = {r["prompt"] for r in rows}
    for name in ("sft_train", "sft_test", "prompts_train", "prompts_test", "preferences_train", "preferences_test"):
        assert not premise_prompts & {r["prompt"] for r in world.read(name)}, name
    corpus = (world.root / "corpus.txt").read_text()
    assert not any(p in corpus for p in premise_prompts)
    references = [r["reference"] for r in rows]
    assert world.evaluate(rows, references)["false_premise_success"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# Abstention ("I don't know.")
# ---------------------------------------------------------------------------------------------------------------


def test_abstention_scores_between_a_wrong_and_a_right_answer():
    row = fact_row(KB, "Zorbin", ["colour"])
    right, wrong, abstain = " Zorbin's colour is red.", " Zorbin's colour is blue.", abstention_response()
    assert abstain == " I don't know."
    assert [score_response(row, y).score for y in (wrong, abstain, right)] == [-1.0, 0.0, 1.0]
    assert score_response(row, "I don't know.  ").score == 0.0  # outer whitespace does not matter
    assert score_response(COLOUR_PET, abstain).score == 0.0  # k facts asked: still 0, nothing is missing-penalised
    # The labeller (T = 0.5): abstaining beats a wrong answer and loses to a right one, each with p = σ(2).
    p_abstain, _ = simulated_preference(row, abstain, wrong, 0.5, 0.0, _FixedRng(0.0))
    p_right, _ = simulated_preference(row, right, abstain, 0.5, 0.0, _FixedRng(0.0))
    assert p_abstain == pytest.approx(_sigmoid(2.0)) and p_right == pytest.approx(_sigmoid(2.0))
    metrics = evaluate_responses([row, row, row, REVERSE], [abstain, right, abstain, " cup map sun"])
    assert metrics["abstention_rate"] == 2 / 3 and metrics["hallucination_rate"] == 0.0


def test_abstain_prob_puts_abstentions_in_sft_and_preference_data(tmp_path):
    default = build_factworld(FactWorldConfig(seed=0, num_train_prompts=60, num_test_prompts=30))
    none = build_factworld(FactWorldConfig(seed=0, num_train_prompts=60, num_test_prompts=30, abstain_prob=0.0))
    assert none.sft_train == default.sft_train and none.preferences_train == default.preferences_train
    data = build_factworld(FactWorldConfig(seed=0, num_train_prompts=60, num_test_prompts=30, abstain_prob=0.2))
    fact_prompts = {r["prompt"] for r in data.prompts_train if r["kind"] == "fact"}
    sft_fact = [r for r in data.sft_train if r["prompt"].startswith("Q: What ")]
    abstained = [r for r in sft_fact if r["completion"] == abstention_response()]
    assert 0.1 < len(abstained) / len(sft_fact) < 0.3
    others = [r for r in data.sft_train if not r["prompt"].startswith("Q: What ")]
    assert not any(r["completion"] == abstention_response() for r in others)  # fact prompts only
    pairs = [r for r in data.preferences_train if r["prompt"] in fact_prompts]
    with_abstention = [r for r in pairs if abstention_response() in (r["chosen"], r["rejected"])]
    assert with_abstention
    for r in with_abstention:  # gold of the abstention side is 0; the other side's sign decides the labeller's lean
        side = "gold_chosen" if r["chosen"] == abstention_response() else "gold_rejected"
        assert r[side] == 0.0
    with pytest.raises(ConfigError, match="abstain_prob"):
        FactWorldConfig(abstain_prob=1.5)
