"""FactWorld: a seeded gold world for hallucination, credit assignment and dense rewards (design.md, "FactWorld").

A knowledge base of invented entities ("Zorbin", "Kalmo", ...) with four attributes (colour, city, pet, food),
each drawn from a small value set. Three kinds of prompt, all plain strings; a completion is appended to its
prompt as is (it starts with a space):

  kind    prompt                                             a correct completion
  fact    "Q: What are the colour and pet of Zorbin?\\nA:"   " Zorbin's colour is red. Zorbin's pet is cat."
  list    "Q: Name 3 colours other than red.\\nA:"           " blue, green, yellow."
  retain  "Q: Reverse the words: sun map cup\\nA:"           " cup map sun"

Fact prompts are closed-ended (one right answer), list prompts open-ended (any k distinct valid items), retain
prompts are a forgetting probe: a skill SFT teaches that preference data never mentions.

Gold score (`score_response`). A response is cut into judged pieces (facts: one sentence each; lists: comma
separated items; retain: words). Each piece gets a reward:
  +1                       requested and right (a fact's true value; a new, valid list item; the right word),
  -1                       wrong (a false fact, requested or not; an invalid or repeated list item; a wrong word),
  -UNREQUESTED_PENALTY     everything else: a true but unrequested fact (or an attribute stated twice), an extra
                           valid list item beyond k, an extra retain word, a sentence that is not a fact about
                           the asked entity (unparsed or about another entity).
Each requested fact / item / word that is absent costs MISSING_PENALTY. With k requested pieces,
    raw   = sum(piece rewards) - MISSING_PENALTY * n_missing
    score = raw / k          (1.0 = perfect; a missing piece costs as much as a wrong one, so omitting a fact
                              never beats guessing it; unbounded below, since junk sentences keep costing)
Token-level gold: one character span (start, end, reward) per judged piece, end exclusive (a slice), so
`response[start:end]` is the fact's VALUE (e.g. "red", not the sentence), the list item or the word; an
unparsed sentence's span is the whole sentence (whitespace stripped). sum(span rewards) - MISSING_PENALTY *
n_missing == raw exactly.

Simulated human labels (`simulated_preference`):
    P(a > b) = sigmoid((g(a) - g(b)) / T + length_bias * (len(a) - len(b)) / LENGTH_UNIT_WORDS)
with g the gold score, len in whitespace-separated words and LENGTH_UNIT_WORDS = 4, the length of one fact
sentence ("Zorbin's colour is red."): with T = 1 and length_bias = 1, one extra sentence weighs as much as a
gold-score difference of 1. T = 0 gives hard labels (ties fall back to the length term alone).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rlxf.config import ConfigError

logger = logging.getLogger(__name__)

FORMAT = "rlxf-factworld/1"

# Attribute -> its value pool; a world uses the first `values_per_attribute` of each. Single words, so a fact
# sentence is always "<Name>'s <attribute> is <value>." and tiny models see one regular template.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "colour": ("red", "blue", "green", "yellow", "purple", "orange", "white", "black"),
    "city": ("Paris", "Oslo", "Lima", "Cairo", "Rome", "Tokyo", "Delhi", "Berlin"),
    "pet": ("cat", "dog", "owl", "fox", "frog", "goat", "horse", "rabbit"),
    "food": ("bread", "rice", "soup", "cheese", "fish", "apples", "beans", "cake"),
}
ATTRIBUTES: tuple[str, ...] = tuple(ATTRIBUTE_VALUES)
# List-prompt category (plural noun in the prompt) -> attribute whose values it lists; "people" lists entity names.
LIST_CATEGORIES: dict[str, str | None] = {"colours": "colour", "cities": "city", "pets": "pet", "foods": "food"}
LIST_CATEGORIES["people"] = None
LIST_SIZES: tuple[int, ...] = (2, 3, 4)
"""k of a list prompt ("Name k ...")."""
RETAIN_SIZES: tuple[int, ...] = (3, 4)
"""Words in a retain prompt."""
RETAIN_WORDS: tuple[str, ...] = (
    "sun", "map", "cup", "hat", "pen", "box", "key", "bag", "egg", "jar", "leaf", "ring",
    "star", "tree", "wave", "bell", "coin", "door", "lamp", "rope", "ship", "sock", "tent", "vase",
)  # fmt: skip
KINDS: tuple[str, ...] = ("fact", "list", "retain")

MISSING_PENALTY = 1.0
"""Cost of each requested fact / list item / retain word that the response leaves out."""
UNREQUESTED_PENALTY = 0.5
"""Cost of each true-but-unrequested fact, extra valid item or word, and each sentence that is not a judged fact."""
LENGTH_UNIT_WORDS = 4
"""L in the labeller's length term: the words of one fact sentence."""

# Entity names: two syllables onset-vowel-coda, capitalised ("Zorbin", "Kalmo" has an empty first coda).
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "m", "s")


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FactWorldConfig:
    seed: int = 0
    """Seed of every random choice; the same seed (and config) writes byte-identical files."""
    num_entities: int = 40
    """Invented entities in the knowledge base."""
    values_per_attribute: int = 6
    """Values each attribute (colour, city, pet, food) can take: the first N of a fixed pool of 8 (5 to 8)."""
    max_facts: int = 3
    """Most attributes one fact prompt asks for (1 to 4); each prompt asks 1..max_facts of them."""
    num_train_prompts: int = 500
    """Prompts in prompts_train.jsonl (fact and list; retain prompts never enter training prompts)."""
    num_test_prompts: int = 200
    """Prompts in prompts_test.jsonl (fact, list and retain); disjoint from every training prompt."""
    list_fraction: float = 0.2
    """Share of list (open-ended) prompts among train and test prompts; the rest are fact prompts."""
    retain_fraction: float = 0.15
    """Share of retain prompts (the forgetting probe) among test prompts."""
    sft_completions_per_prompt: int = 2
    """Noisy SFT completions per training-pool prompt (every fact and list prompt not held out for test)."""
    num_sft_retain: int = 1000
    """Retain rows in sft_train.jsonl (always answered correctly, so SFT learns the skill)."""
    sft_fact_accuracy: float = 0.7
    """Probability that each fact (or list item) of an SFT or preference response is right."""
    pairs_per_prompt: int = 6
    """Preference pairs sampled per fact/list prompt (pairs of identical responses are dropped)."""
    omit_prob: float = 0.15
    """Preference responses only: probability that each requested fact / list item is left out (one is kept)."""
    extra_prob: float = 0.2
    """Preference responses only: probability of adding one unrequested fact / one item beyond k."""
    temperature: float = 0.5
    """Labeller temperature T: P(a>b) = sigmoid((g(a)-g(b))/T + ...). 0 gives hard labels; 0.5 labels a
    one-fact difference in a 3-fact answer the right way 79% of the time."""
    length_bias: float = 0.0
    """Labeller length bias lambda_len: adds lambda_len * (len(a)-len(b)) / 4 words to the logit of P(a>b)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field and the allowed range."""
        max_k = max(LIST_SIZES)
        checks = [
            (self.num_entities >= max_k + 1, f"num_entities={self.num_entities} must be >= {max_k + 1}"),
            (self.num_entities <= 1000, f"num_entities={self.num_entities} must be <= 1000"),
            (
                max_k + 1 <= self.values_per_attribute <= len(ATTRIBUTE_VALUES["colour"]),
                f"values_per_attribute={self.values_per_attribute} must be in [{max_k + 1}, "
                f"{len(ATTRIBUTE_VALUES['colour'])}] (a list prompt names up to {max_k} values other than one)",
            ),
            (1 <= self.max_facts <= len(ATTRIBUTES), f"max_facts={self.max_facts} must be in [1, {len(ATTRIBUTES)}]"),
            (self.num_train_prompts >= 1, f"num_train_prompts={self.num_train_prompts} must be >= 1"),
            (self.num_test_prompts >= 1, f"num_test_prompts={self.num_test_prompts} must be >= 1"),
            (
                min(self.list_fraction, self.retain_fraction) >= 0 and self.list_fraction + self.retain_fraction <= 1,
                f"list_fraction={self.list_fraction} and retain_fraction={self.retain_fraction} must be >= 0 "
                "and sum to at most 1",
            ),
            (
                self.sft_completions_per_prompt >= 1,
                f"sft_completions_per_prompt={self.sft_completions_per_prompt} must be >= 1",
            ),
            (self.num_sft_retain >= 0, f"num_sft_retain={self.num_sft_retain} must be >= 0"),
            (self.pairs_per_prompt >= 0, f"pairs_per_prompt={self.pairs_per_prompt} must be >= 0"),
            (self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = hard labels)"),
            (math.isfinite(self.length_bias), f"length_bias={self.length_bias} must be finite"),
        ]
        for name in ("sft_fact_accuracy", "omit_prob", "extra_prob"):
            value = getattr(self, name)
            checks.append((0.0 <= value <= 1.0, f"{name}={value} must be a probability in [0, 1]"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"FactWorldConfig: {message}")


# ---------------------------------------------------------------------------------------------------------------
# Knowledge base and prompt rows
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnowledgeBase:
    values: dict[str, list[str]]
    """Attribute -> the values it can take, in canonical order."""
    entities: dict[str, dict[str, str]]
    """Entity name -> {attribute: true value}, in generation order."""
    retain_words: list[str]
    """Words retain prompts are built from."""

    def category_items(self, category: str) -> list[str]:
        """Every item of a list category, in canonical order."""
        if category not in LIST_CATEGORIES:
            raise ValueError(f"unknown list category {category!r}; expected one of {list(LIST_CATEGORIES)}")
        attribute = LIST_CATEGORIES[category]
        return list(self.entities) if attribute is None else list(self.values[attribute])

    def to_json(self) -> dict[str, Any]:
        return {"values": self.values, "entities": self.entities, "retain_words": self.retain_words}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> KnowledgeBase:
        return cls(
            values={a: list(v) for a, v in data["values"].items()},
            entities={e: dict(f) for e, f in data["entities"].items()},
            retain_words=list(data["retain_words"]),
        )


def make_knowledge_base(cfg: FactWorldConfig) -> KnowledgeBase:
    """Invented names and uniformly drawn attribute values, from `cfg.seed` only."""
    rng = random.Random(f"factworld/{cfg.seed}/kb")
    values = {a: list(pool[: cfg.values_per_attribute]) for a, pool in ATTRIBUTE_VALUES.items()}
    taken = {w.lower() for pool in ATTRIBUTE_VALUES.values() for w in pool} | set(RETAIN_WORDS)
    entities: dict[str, dict[str, str]] = {}
    while len(entities) < cfg.num_entities:
        first = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        second = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS[1:])
        name = (first + second).capitalize()
        if name.lower() in taken:
            continue
        taken.add(name.lower())
        entities[name] = {a: rng.choice(values[a]) for a in ATTRIBUTES}
    return KnowledgeBase(values=values, entities=entities, retain_words=list(RETAIN_WORDS))


def _row(kind: str, prompt: str, k: int, reference: str, **meta: Any) -> dict[str, Any]:
    """A prompt row with every column present (null / empty where a column does not apply to the kind)."""
    row: dict[str, Any] = {
        "prompt": prompt,
        "kind": kind,
        "prompt_type": "open" if kind == "list" else "closed",
        "k": k,
        "entity": None,
        "attributes": [],
        "truth": None,
        "category": None,
        "exclude": None,
        "valid": [],
        "words": [],
        "target": [],
        "reference": reference,
    }
    unknown = set(meta) - set(row)
    if unknown:
        raise ValueError(f"unknown prompt-row columns {sorted(unknown)}")
    row.update(meta)
    return row


def fact_sentence(entity: str, attribute: str, value: str) -> str:
    return f"{entity}'s {attribute} is {value}."


def fact_response(entity: str, facts: Sequence[tuple[str, str]]) -> str:
    """ " Zorbin's colour is red. Zorbin's pet is cat." for facts [("colour", "red"), ("pet", "cat")]."""
    return " " + " ".join(fact_sentence(entity, a, v) for a, v in facts)


def list_response(items: Sequence[str]) -> str:
    return " " + ", ".join(items) + "."


def retain_response(words: Sequence[str]) -> str:
    return " " + " ".join(words)


def fact_row(kb: KnowledgeBase, entity: str, attributes: Sequence[str]) -> dict[str, Any]:
    """Prompt row asking `attributes` (in this order) of `entity`."""
    attributes = list(attributes)
    if entity not in kb.entities:
        raise ValueError(f"unknown entity {entity!r}")
    if not attributes or len(set(attributes)) != len(attributes) or not set(attributes) <= set(ATTRIBUTES):
        raise ValueError(f"attributes must be distinct members of {ATTRIBUTES}, got {attributes}")
    if len(attributes) == 1:
        question = f"What is the {attributes[0]} of {entity}?"
    else:
        phrase = ", ".join(attributes[:-1]) + " and " + attributes[-1]
        question = f"What are the {phrase} of {entity}?"
    truth = dict(kb.entities[entity])
    reference = fact_response(entity, [(a, truth[a]) for a in attributes])
    return _row(
        "fact", f"Q: {question}\nA:", len(attributes), reference, entity=entity, attributes=attributes, truth=truth
    )


def list_row(kb: KnowledgeBase, category: str, k: int, exclude: str | None = None) -> dict[str, Any]:
    """Prompt row "Name k <category> [other than <exclude>]."; any k distinct valid items are right."""
    items = kb.category_items(category)
    if exclude is not None and exclude not in items:
        raise ValueError(f"exclude={exclude!r} is not one of the {category}: {items}")
    valid = [x for x in items if x != exclude]
    if not 1 <= k <= len(valid):
        raise ValueError(f"k={k} must be in [1, {len(valid)}] for {category} other than {exclude}")
    other = "" if exclude is None else f" other than {exclude}"
    return _row(
        "list",
        f"Q: Name {k} {category}{other}.\nA:",
        k,
        list_response(valid[:k]),
        category=category,
        exclude=exclude,
        valid=valid,
    )


def retain_row(words: Sequence[str]) -> dict[str, Any]:
    """Prompt row asking to reverse `words`; the only right answer is the reversed words, space separated."""
    words = list(words)
    target = words[::-1]
    return _row(
        "retain", f"Q: Reverse the words: {' '.join(words)}\nA:", len(words), retain_response(target),
        words=words, target=target,
    )  # fmt: skip


_FACT_PROMPT_1 = re.compile(r"Q: What is the (?P<attrs>[a-z]+) of (?P<entity>[A-Za-z]+)\?\nA:")
_FACT_PROMPT_N = re.compile(
    r"Q: What are the (?P<attrs>[a-z]+(?:, [a-z]+)* and [a-z]+) of (?P<entity>[A-Za-z]+)\?\nA:"
)
_LIST_PROMPT = re.compile(r"Q: Name (?P<k>[0-9]+) (?P<category>[a-z]+)(?: other than (?P<exclude>[A-Za-z]+))?\.\nA:")
_RETAIN_PROMPT = re.compile(r"Q: Reverse the words: (?P<words>[a-z]+(?: [a-z]+)*)\nA:")


def parse_prompt(kb: KnowledgeBase, prompt: str) -> dict[str, Any]:
    """The prompt row (all scoring metadata) of a FactWorld prompt string; inverse of fact_row/list_row/retain_row."""
    if m := _FACT_PROMPT_1.fullmatch(prompt) or _FACT_PROMPT_N.fullmatch(prompt):
        return fact_row(kb, m["entity"], re.split(r", | and ", m["attrs"]))
    if m := _LIST_PROMPT.fullmatch(prompt):
        return list_row(kb, m["category"], int(m["k"]), m["exclude"])
    if m := _RETAIN_PROMPT.fullmatch(prompt):
        return retain_row(m["words"].split(" "))
    raise ValueError(f"not a FactWorld prompt: {prompt!r}")


# ---------------------------------------------------------------------------------------------------------------
# Gold scorer
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    text: str
    """The judged text: a fact's value, a list item, a retain word, or a whole unparsed sentence."""
    start: int
    """Character offset of `text` in the response."""
    end: int
    """End offset, exclusive: response[start:end] == text."""
    key: str | None
    """The attribute of a fact; None for list items, words and unparsed sentences."""
    requested: bool
    """True for the first statement of a requested attribute, the first k list items, the first k words."""
    correct: bool | None
    """Whether the fact is true / the item valid and new / the word right; None when not judgeable."""
    reward: float
    """+1 requested and correct; -1 not correct; -UNREQUESTED_PENALTY otherwise (or the penalty passed in)."""


@dataclass(frozen=True)
class GoldScore:
    score: float
    """raw / k: 1.0 for a perfect response; unbounded below."""
    raw: float
    """sum of verdict rewards - missing_penalty * n_missing."""
    k: int
    """Requested pieces: facts asked, list items asked, words to reverse."""
    n_missing: int
    """Requested pieces the response left out."""
    verdicts: tuple[Verdict, ...]
    """One per judged piece, in response order."""

    @property
    def spans(self) -> list[tuple[int, int, float]]:
        """Token-level gold: (start, end, reward) per judged piece, end exclusive, in response order."""
        return [(v.start, v.end, v.reward) for v in self.verdicts]

    @property
    def n_stated(self) -> int:
        """Judged statements: facts about the asked entity (requested or not), list items, words."""
        return sum(v.correct is not None for v in self.verdicts)

    @property
    def n_right(self) -> int:
        return sum(v.correct is True for v in self.verdicts)

    @property
    def n_wrong(self) -> int:
        """Wrong statements: for fact prompts, hallucinations."""
        return sum(v.correct is False for v in self.verdicts)

    @property
    def perfect(self) -> bool:
        """Every requested piece present and right, nothing else said."""
        return self.n_missing == 0 and all(v.requested and v.correct for v in self.verdicts)


def _reward(requested: bool, correct: bool | None, unrequested_penalty: float) -> float:
    if correct is False:
        return -1.0
    return 1.0 if requested and correct else -unrequested_penalty


def _pieces(response: str, pattern: re.Pattern[str], end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each match of `pattern` in response[:end], outer whitespace stripped, empty ones dropped."""
    out = []
    for m in pattern.finditer(response, 0, len(response) if end is None else end):
        text = m.group()
        start, stop = m.start() + len(text) - len(text.lstrip()), m.end() - len(text) + len(text.rstrip())
        if start < stop:
            out.append((start, stop))
    return out


_SENTENCE = re.compile(r"[^.]+\.?")
_FACT = re.compile(r"(?P<entity>[A-Za-z]+)'s (?P<attribute>[a-z]+) is (?P<value>[A-Za-z]+)\.?")
_ITEM = re.compile(r"[^,]+")
_WORD = re.compile(r"\S+")


def _judge_facts(row: Mapping[str, Any], response: str, penalty: float) -> tuple[list[Verdict], int]:
    entity, truth = row["entity"], row["truth"]
    pending = list(row["attributes"])  # requested attributes not stated yet
    verdicts = []
    for start, end in _pieces(response, _SENTENCE):
        sentence = response[start:end]
        m = _FACT.fullmatch(sentence)
        if m is None or m["entity"] != entity or m["attribute"] not in truth:
            # Not a fact about the asked entity (junk, a fragment, another entity): verbosity, not a hallucination.
            verdicts.append(Verdict(sentence, start, end, None, False, None, -penalty))
            continue
        attribute, value = m["attribute"], m["value"]
        requested = attribute in pending
        if requested:
            pending.remove(attribute)
        correct = value == truth[attribute]
        verdicts.append(
            Verdict(
                value, start + m.start("value"), start + m.end("value"), attribute, requested, correct,
                _reward(requested, correct, penalty),
            )
        )  # fmt: skip
    return verdicts, len(pending)


def _judge_items(row: Mapping[str, Any], response: str, penalty: float) -> tuple[list[Verdict], int]:
    k, valid = row["k"], set(row["valid"])
    body_end = len(response.rstrip())
    if response[:body_end].endswith("."):  # the list's closing period
        body_end -= 1
    seen: set[str] = set()
    verdicts = []
    for i, (start, end) in enumerate(_pieces(response, _ITEM, body_end)):
        item = response[start:end]
        requested, correct = i < k, item in valid and item not in seen
        seen.add(item)
        verdicts.append(Verdict(item, start, end, None, requested, correct, _reward(requested, correct, penalty)))
    return verdicts, max(0, k - len(verdicts))


def _judge_words(row: Mapping[str, Any], response: str, penalty: float) -> tuple[list[Verdict], int]:
    target = row["target"]
    verdicts = []
    for i, (start, end) in enumerate(_pieces(response, _WORD)):
        word = response[start:end]
        requested = i < len(target)
        correct = word == target[i] if requested else None
        verdicts.append(Verdict(word, start, end, None, requested, correct, _reward(requested, correct, penalty)))
    return verdicts, max(0, len(target) - len(verdicts))


_JUDGES = {"fact": _judge_facts, "list": _judge_items, "retain": _judge_words}


def score_response(
    prompt_row: Mapping[str, Any],
    response: str,
    *,
    missing_penalty: float = MISSING_PENALTY,
    unrequested_penalty: float = UNREQUESTED_PENALTY,
) -> GoldScore:
    """Gold score of `response` to the prompt described by `prompt_row` (a row of prompts_*.jsonl or
    `parse_prompt`). Pure: needs nothing but the row. See the module docstring for the rules."""
    kind = prompt_row.get("kind")
    if kind not in _JUDGES:
        raise ValueError(f"prompt row kind must be one of {KINDS}, got {kind!r}; build rows with parse_prompt()")
    verdicts, n_missing = _JUDGES[kind](prompt_row, response, unrequested_penalty)
    raw = sum(v.reward for v in verdicts) - missing_penalty * n_missing
    k = prompt_row["k"]
    return GoldScore(score=raw / k, raw=raw, k=k, n_missing=n_missing, verdicts=tuple(verdicts))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def evaluate_responses(prompt_rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> dict[str, float]:
    """Gold metrics of one response per prompt row. NaN where no row of the needed kind (or no fact) exists.

    gold_score            mean gold score over all rows (gold_score_fact / _list / _retain: per kind)
    hallucination_rate    wrong facts / stated facts, summed over fact prompts (unrequested facts included)
    retain_accuracy       share of retain responses equal to the reference after stripping outer whitespace
    list_validity         share of list responses that are perfect: exactly k distinct valid items, nothing else
    mean_length_words     mean whitespace-separated words per response
    num_fact / num_list / num_retain   rows of each kind
    """
    if len(prompt_rows) != len(responses):
        raise ValueError(f"{len(prompt_rows)} prompt rows but {len(responses)} responses; give one response per row")
    scores = [score_response(row, y) for row, y in zip(prompt_rows, responses)]
    by_kind: dict[str, list[int]] = {kind: [] for kind in KINDS}
    for i, row in enumerate(prompt_rows):
        by_kind[row["kind"]].append(i)
    fact = by_kind["fact"]
    stated = sum(scores[i].n_stated for i in fact)
    out = {"gold_score": _mean([s.score for s in scores])}
    out.update({f"gold_score_{kind}": _mean([scores[i].score for i in idx]) for kind, idx in by_kind.items()})
    out["hallucination_rate"] = sum(scores[i].n_wrong for i in fact) / stated if stated else float("nan")
    out["retain_accuracy"] = _mean(
        [float(responses[i].strip() == prompt_rows[i]["reference"].strip()) for i in by_kind["retain"]]
    )
    out["list_validity"] = _mean([float(scores[i].perfect) for i in by_kind["list"]])
    out["mean_length_words"] = _mean([float(len(y.split())) for y in responses])
    out.update({f"num_{kind}": float(len(idx)) for kind, idx in by_kind.items()})
    return out


def gold_win_rate(
    prompt_rows: Sequence[Mapping[str, Any]], responses: Sequence[str], baseline_responses: Sequence[str]
) -> float:
    """Share of prompts where `responses` beats `baseline_responses` on gold score; a tie counts 1/2."""
    if not len(prompt_rows) == len(responses) == len(baseline_responses):
        raise ValueError(
            f"{len(prompt_rows)} rows, {len(responses)} responses, {len(baseline_responses)} baseline responses; "
            "give one of each per prompt"
        )
    wins = []
    for row, y, b in zip(prompt_rows, responses, baseline_responses):
        g, g_base = score_response(row, y).score, score_response(row, b).score
        wins.append(1.0 if g > g_base else 0.5 if g == g_base else 0.0)
    return _mean(wins)


# ---------------------------------------------------------------------------------------------------------------
# Simulated human labeller
# ---------------------------------------------------------------------------------------------------------------


class _Uniform(Protocol):
    def random(self) -> float: ...


def _sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def simulated_preference(
    prompt_row: Mapping[str, Any], a: str, b: str, temperature: float, length_bias: float, rng: _Uniform
) -> tuple[float, bool]:
    """A noisy annotator's choice between responses a and b (Bradley-Terry on the gold score plus a length bias).

    P(a > b) = sigmoid((g(a) - g(b)) / T + length_bias * (len(a) - len(b)) / LENGTH_UNIT_WORDS), g = gold score,
    len = whitespace-separated words. T = 0: sign of g(a) - g(b) (hard label); on a tie, sigmoid(length term).
    `rng` is anything with .random() in [0, 1) (random.Random, numpy Generator). Returns (P(a > b), a_wins).
    """
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    diff = score_response(prompt_row, a).score - score_response(prompt_row, b).score
    length_term = length_bias * (len(a.split()) - len(b.split())) / LENGTH_UNIT_WORDS
    if temperature == 0:
        logit = math.copysign(math.inf, diff) if diff != 0 else length_term
    else:
        logit = diff / temperature + length_term
    p = _sigmoid(logit)
    return p, rng.random() < p


# ---------------------------------------------------------------------------------------------------------------
# Noisy responses (SFT data and preference candidates)
# ---------------------------------------------------------------------------------------------------------------


def _keep_count(k: int, omit_prob: float, rng: random.Random) -> list[bool]:
    keep = [rng.random() >= omit_prob for _ in range(k)]
    if not any(keep):  # never an empty response: data loaders reject those
        keep[rng.randrange(k)] = True
    return keep


def noisy_response(
    kb: KnowledgeBase,
    row: Mapping[str, Any],
    rng: random.Random,
    accuracy: float,
    omit_prob: float = 0.0,
    extra_prob: float = 0.0,
) -> str:
    """A response in the world's format whose facts / list items are each right with probability `accuracy`.

    Fact: each requested attribute is kept with probability 1 - omit_prob (at least one is kept); with probability
    extra_prob one unrequested attribute is added at the end; each stated value is the truth with probability
    `accuracy`, otherwise uniform among the attribute's other values. List: same with items; a wrong item is a
    repeat, the excluded item or an item of another category. Retain: always the reference (SFT teaches the skill).
    """
    kind = row["kind"]
    if kind == "retain":
        return row["reference"]
    if kind == "fact":
        attributes, truth = list(row["attributes"]), row["truth"]
        stated = [a for a, keep in zip(attributes, _keep_count(len(attributes), omit_prob, rng)) if keep]
        unasked = [a for a in ATTRIBUTES if a not in attributes]
        if unasked and rng.random() < extra_prob:
            stated.append(rng.choice(unasked))
        facts = []
        for a in stated:
            wrong = [v for v in kb.values[a] if v != truth[a]]
            facts.append((a, truth[a] if rng.random() < accuracy else rng.choice(wrong)))
        return fact_response(row["entity"], facts)
    if kind == "list":
        n = sum(_keep_count(row["k"], omit_prob, rng)) + (rng.random() < extra_prob)
        items: list[str] = []
        for _ in range(n):
            fresh = [x for x in row["valid"] if x not in items]
            if rng.random() < accuracy and fresh:
                items.append(rng.choice(fresh))
            else:
                items.append(_invalid_item(kb, row, items, rng))
        return list_response(items)
    raise ValueError(f"prompt row kind must be one of {KINDS}, got {kind!r}")


def _invalid_item(kb: KnowledgeBase, row: Mapping[str, Any], items: list[str], rng: random.Random) -> str:
    """A wrong list item: a repeat of an earlier item, the excluded item, or an item of another category."""
    ways = ["other"] + (["repeat"] if items else []) + (["excluded"] if row["exclude"] is not None else [])
    way = rng.choice(ways)
    if way == "repeat":
        return rng.choice(items)
    if way == "excluded":
        return row["exclude"]
    other = rng.choice([c for c in LIST_CATEGORIES if c != row["category"]])
    return rng.choice(kb.category_items(other))


# ---------------------------------------------------------------------------------------------------------------
# Building the world
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FactWorldData:
    """Everything `write_factworld` writes, in memory."""

    config: FactWorldConfig
    kb: KnowledgeBase
    sft_train: list[dict[str, Any]]
    sft_test: list[dict[str, Any]]
    prompts_train: list[dict[str, Any]]
    prompts_test: list[dict[str, Any]]
    preferences_train: list[dict[str, Any]]
    preferences_test: list[dict[str, Any]]
    stats: dict[str, int] = field(default_factory=dict)


def _draw(buckets: dict[Any, list[Any]], n: int, rng: random.Random, what: str) -> list[Any]:
    """n items without replacement: a uniformly chosen non-empty bucket, then its last item (buckets are shuffled).

    Balances prompt shapes (number of facts, list category) while the pool lasts; a bucket that runs dry
    leaves its share to the others.
    """
    out = []
    for _ in range(n):
        open_keys = [key for key, items in buckets.items() if items]
        if not open_keys:
            raise ConfigError(
                f"FactWorld: only {len(out)} distinct {what} prompts were left for {n} requested; lower "
                "num_train_prompts / num_test_prompts or raise num_entities / max_facts"
            )
        out.append(buckets[rng.choice(open_keys)].pop())
    return out


def _draw_retain(kb: KnowledgeBase, n: int, rng: random.Random, taken: set[tuple[str, ...]]) -> list[dict[str, Any]]:
    rows = []
    for _ in range(100 * n + 1000):
        if len(rows) == n:
            break
        words = tuple(rng.sample(kb.retain_words, rng.choice(RETAIN_SIZES)))
        if words not in taken:
            taken.add(words)
            rows.append(retain_row(words))
    if len(rows) < n:
        raise ConfigError(f"FactWorld: could not draw {n} distinct retain prompts; lower num_sft_retain")
    return rows


def _split_counts(total: int, list_fraction: float, retain_fraction: float) -> tuple[int, int, int]:
    n_list, n_retain = round(total * list_fraction), round(total * retain_fraction)
    return total - n_list - n_retain, n_list, n_retain


def _preferences(
    kb: KnowledgeBase, rows: list[dict[str, Any]], cfg: FactWorldConfig, rng: random.Random, label_rng: random.Random
) -> tuple[list[dict[str, Any]], int]:
    """Labelled pairs of two noisy responses per draw; returns (rows, number of identical pairs dropped)."""
    out, identical = [], 0
    for row in rows:
        if row["kind"] == "retain":  # the forgetting probe never enters preference data
            continue
        for _ in range(cfg.pairs_per_prompt):
            a, b = (noisy_response(kb, row, rng, cfg.sft_fact_accuracy, cfg.omit_prob, cfg.extra_prob) for _ in "ab")
            if a == b:
                identical += 1
                continue
            p_a, a_wins = simulated_preference(row, a, b, cfg.temperature, cfg.length_bias, label_rng)
            chosen, rejected, label_prob = (a, b, p_a) if a_wins else (b, a, 1.0 - p_a)
            out.append(
                {
                    "prompt": row["prompt"],
                    "chosen": chosen,
                    "rejected": rejected,
                    "label_prob": label_prob,
                    "gold_chosen": score_response(row, chosen).score,
                    "gold_rejected": score_response(row, rejected).score,
                    "kind": row["kind"],
                    "prompt_type": row["prompt_type"],
                    "prompt_id": row["prompt_id"],
                }
            )
    return out, identical


def build_factworld(cfg: FactWorldConfig) -> FactWorldData:
    """Generate the whole world in memory from `cfg` (deterministic: one seeded random.Random per stage)."""
    cfg.validate()
    kb = make_knowledge_base(cfg)

    def stage_rng(stage: str) -> random.Random:
        # str seeds are hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
        return random.Random(f"factworld/{cfg.seed}/{stage}")

    # 1. Prompt pools: every fact prompt (entity x ordered attribute tuple), bucketed by number of facts, and every
    #    list prompt, bucketed by category.
    split_rng = stage_rng("split")
    fact_pool: dict[Any, list[Any]] = {n: [] for n in range(1, cfg.max_facts + 1)}
    for entity in kb.entities:
        for n in fact_pool:
            fact_pool[n].extend((entity, attrs) for attrs in itertools.permutations(ATTRIBUTES, n))
    list_pool: dict[Any, list[Any]] = {}
    for category in LIST_CATEGORIES:
        excludes = [None, *kb.category_items(category)]
        list_pool[category] = [(category, k, x) for x in excludes for k in LIST_SIZES]
    all_facts = [p for bucket in fact_pool.values() for p in bucket]
    all_lists = [p for bucket in list_pool.values() for p in bucket]
    for bucket in [*fact_pool.values(), *list_pool.values()]:
        split_rng.shuffle(bucket)

    # 2. Test prompts first (fact, list, retain), then training prompts from what is left: disjoint by construction.
    n_fact, n_list, n_retain = _split_counts(cfg.num_test_prompts, cfg.list_fraction, cfg.retain_fraction)
    test_facts, test_lists = _draw(fact_pool, n_fact, split_rng, "fact"), _draw(list_pool, n_list, split_rng, "list")
    retain_taken: set[tuple[str, ...]] = set()
    prompts_test = [fact_row(kb, e, a) for e, a in test_facts] + [list_row(kb, *x) for x in test_lists]
    prompts_test += _draw_retain(kb, n_retain, split_rng, retain_taken)
    split_rng.shuffle(prompts_test)
    n_fact, n_list, _ = _split_counts(cfg.num_train_prompts, cfg.list_fraction, 0.0)
    prompts_train = [fact_row(kb, e, a) for e, a in _draw(fact_pool, n_fact, split_rng, "fact")]
    prompts_train += [list_row(kb, *x) for x in _draw(list_pool, n_list, split_rng, "list")]
    split_rng.shuffle(prompts_train)
    for split, rows in (("train", prompts_train), ("test", prompts_test)):
        for i, row in enumerate(rows):
            rows[i] = {"prompt": row["prompt"], "prompt_id": f"{split}-{i:04d}", **row}

    # 3. SFT: every fact and list prompt not held out for test (so every fact of the KB is taught), each with
    #    noisy completions, plus correct retain rows; sft_test answers the test prompts with the same noise.
    sft_rng = stage_rng("sft")
    held_out_facts, held_out_lists = set(test_facts), set(test_lists)
    pool_rows = [fact_row(kb, e, a) for e, a in all_facts if (e, a) not in held_out_facts]
    pool_rows += [list_row(kb, *x) for x in all_lists if x not in held_out_lists]
    sft_train = [
        {"prompt": row["prompt"], "completion": noisy_response(kb, row, sft_rng, cfg.sft_fact_accuracy)}
        for row in pool_rows
        for _ in range(cfg.sft_completions_per_prompt)
    ]
    sft_train += [
        {"prompt": row["prompt"], "completion": row["reference"]}
        for row in _draw_retain(kb, cfg.num_sft_retain, sft_rng, retain_taken)
    ]
    sft_rng.shuffle(sft_train)
    sft_test = [
        {"prompt": row["prompt"], "completion": noisy_response(kb, row, sft_rng, cfg.sft_fact_accuracy)}
        for row in prompts_test
    ]

    # 4. Preferences: pairs of noisy responses (with omitted / extra facts), labelled by the simulated human.
    pref_rng, label_rng = stage_rng("preferences"), stage_rng("labels")
    preferences_train, dropped_train = _preferences(kb, prompts_train, cfg, pref_rng, label_rng)
    preferences_test, dropped_test = _preferences(kb, prompts_test, cfg, pref_rng, label_rng)

    stats = {"identical_pairs_dropped": dropped_train + dropped_test, "sft_pool_prompts": len(pool_rows)}
    return FactWorldData(
        cfg, kb, sft_train, sft_test, prompts_train, prompts_test, preferences_train, preferences_test, stats
    )


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

FILES = (
    "kb.json", "sft_train.jsonl", "sft_test.jsonl", "prompts_train.jsonl", "prompts_test.jsonl",
    "preferences_train.jsonl", "preferences_test.jsonl", "corpus.txt", "README.md",
)  # fmt: skip


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _corpus(data: FactWorldData) -> str:
    """Every text a model of this world will read or write, one document per paragraph, for tokenizer training."""
    kb = data.kb
    vocabulary = [*kb.entities, *ATTRIBUTES, *(v for vs in kb.values.values() for v in vs), *LIST_CATEGORIES]
    docs = [" ".join(vocabulary + kb.retain_words)]
    docs += [r["prompt"] + r["completion"] for r in data.sft_train + data.sft_test]
    docs += [r["prompt"] + r["reference"] for r in data.prompts_train + data.prompts_test]
    for r in data.preferences_train + data.preferences_test:
        docs += [r["prompt"] + r["chosen"], r["prompt"] + r["rejected"]]
    return "\n\n".join(docs) + "\n"


def _readme(data: FactWorldData) -> str:
    cfg, kb = data.config, data.kb
    n = {name: len(getattr(data, name)) for name in ("sft_train", "sft_test", "prompts_train", "prompts_test")}
    n_pref_train, n_pref_test = len(data.preferences_train), len(data.preferences_test)
    e = next(iter(kb.entities))
    fact, lst = fact_row(kb, e, ["colour", "pet"]), list_row(kb, "colours", 3, kb.values["colour"][0])
    retain = retain_row(["sun", "map", "cup"])
    config_lines = "\n".join(f"- `{k}`: {v}" for k, v in asdict(cfg).items())
    return f"""# FactWorld (seed {cfg.seed})

A gold world of rlxf (design.md, "FactWorld"): {len(kb.entities)} invented entities, each with the attributes
{", ".join(ATTRIBUTES)} ({cfg.values_per_attribute} values each). Written by
`rlxf.worlds.factworld.write_factworld`; the same config writes byte-identical files. Score a response with
`rlxf.worlds.factworld.load_factworld(<this dir>).score(prompt_or_row, response)`.

## Prompt kinds

A completion is appended to its prompt as is (it starts with a space).

- `fact` (prompt_type `closed`): asks 1 to {cfg.max_facts} attributes of one entity; one sentence per fact.
  {fact["prompt"]!r} -> {fact["reference"]!r}
- `list` (prompt_type `open`): k in {list(LIST_SIZES)} distinct items of a category ({", ".join(LIST_CATEGORIES)};
  "people" are entity names), sometimes "other than" one item; any k distinct valid items are right.
  {lst["prompt"]!r} -> {lst["reference"]!r}
- `retain` (prompt_type `closed`): reverse {" or ".join(map(str, RETAIN_SIZES))} words, a forgetting probe: in
  SFT data and prompts_test only, never in prompts_train or preference data.
  {retain["prompt"]!r} -> {retain["reference"]!r}

## Gold score

Judged pieces: fact sentences, list items, retain words. Reward per piece: +1 requested and right; -1 wrong (a
false fact, requested or not; an invalid or repeated item; a wrong word); -{UNREQUESTED_PENALTY} otherwise (a true
unrequested fact or a repeated attribute, an item or word beyond k, a sentence that is not a fact about the asked
entity). Each requested piece left out costs {MISSING_PENALTY}.
score = (sum of piece rewards - {MISSING_PENALTY} x missing) / k, so 1.0 is perfect.

Token-level gold: one character span (start, end exclusive, reward) per piece, in the completion (leading space
included): a fact's VALUE ("red"), a list item, a word, or a whole unparsed sentence.

Simulated labeller: P(a > b) = sigmoid((g(a) - g(b)) / T + length_bias x (words(a) - words(b)) / {LENGTH_UNIT_WORDS}),
here T = {cfg.temperature}, length_bias = {cfg.length_bias}; g = gold score, words = whitespace-separated words.

## Files

- `kb.json`: `format`; `config` (every FactWorldConfig field); `kb` with `values` (attribute -> values),
  `entities` (name -> attribute -> true value), `retain_words`; `scoring` (the penalties and L).
- `sft_train.jsonl` ({n["sft_train"]} rows), columns `prompt`, `completion`: every fact and list prompt not held
  out for test, {cfg.sft_completions_per_prompt} noisy completions each (each fact / item right with probability
  {cfg.sft_fact_accuracy}), plus {cfg.num_sft_retain} correct retain rows; shuffled.
- `sft_test.jsonl` ({n["sft_test"]} rows), columns `prompt`, `completion`: one completion per test prompt, same
  noise.
- `prompts_train.jsonl` ({n["prompts_train"]} rows): RL prompts (fact and list); columns below.
- `prompts_test.jsonl` ({n["prompts_test"]} rows): evaluation prompts (fact, list, retain), disjoint from every
  training prompt (SFT, RL, preferences); columns below.
- `preferences_train.jsonl` ({n_pref_train} rows): {cfg.pairs_per_prompt} draws of two noisy responses per
  prompts_train prompt, identical pairs dropped ({data.stats["identical_pairs_dropped"]} over both splits).
  Columns `prompt`, `chosen`, `rejected`; `label_prob` = P(chosen > rejected) under the labeller (below 0.5 when
  the labeller picked the less likely side); `gold_chosen`, `gold_rejected` (gold scores); `kind`, `prompt_type`,
  `prompt_id` (the row of prompts_train / prompts_test).
- `preferences_test.jsonl` ({n_pref_test} rows): the same on the fact and list prompts of prompts_test.
- `corpus.txt`: every prompt, completion, reference and preference response (paragraphs separated by a blank
  line), for training a tokenizer.
- `README.md`: this file.

Preference responses follow the SFT noise, and also leave out each requested fact / item with probability
{cfg.omit_prob} (at least one kept) and add one unrequested fact / one item beyond k with probability
{cfg.extra_prob}. So chosen responses often hold wrong facts and rejected ones right facts.

Prompt row columns (every row has all of them; null or [] where one does not apply to the kind):

- `prompt`: the prompt string.
- `prompt_id`: `train-NNNN` / `test-NNNN`.
- `kind`: `fact`, `list` or `retain`; `prompt_type`: `closed` (fact, retain) or `open` (list).
- `k`: requested pieces (attributes asked, items asked, words to reverse): the score's denominator.
- `entity`, `attributes`, `truth` (fact): the entity, the attributes asked in order, all its true values.
- `category`, `exclude`, `valid` (list): the category, the item excluded ("other than"), every valid item.
- `words`, `target` (retain): the words given, the words expected (reversed).
- `reference`: a correct completion.

## Config

{config_lines}
"""


def write_factworld(cfg: FactWorldConfig, out_dir: str | Path) -> dict[str, Path]:
    """Build the world and write its files into `out_dir` (created if needed). Returns {file stem: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = build_factworld(cfg)
    paths = {name.split(".")[0]: out / name for name in FILES}
    kb_json = {
        "format": FORMAT,
        "config": asdict(cfg),
        "kb": data.kb.to_json(),
        "scoring": {
            "missing_penalty": MISSING_PENALTY,
            "unrequested_penalty": UNREQUESTED_PENALTY,
            "length_unit_words": LENGTH_UNIT_WORDS,
        },
    }
    paths["kb"].write_text(json.dumps(kb_json, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for name in ("sft_train", "sft_test", "prompts_train", "prompts_test", "preferences_train", "preferences_test"):
        _write_jsonl(paths[name], getattr(data, name))
    paths["corpus"].write_text(_corpus(data), encoding="utf-8")
    paths["README"].write_text(_readme(data), encoding="utf-8")
    logger.info(
        "FactWorld seed %d -> %s: %d SFT train rows, %d/%d train/test prompts, %d/%d train/test preference pairs "
        "(%d identical pairs dropped)",
        cfg.seed, out, len(data.sft_train), len(data.prompts_train), len(data.prompts_test),
        len(data.preferences_train), len(data.preferences_test), data.stats["identical_pairs_dropped"],
    )  # fmt: skip
    return paths


@dataclass
class FactWorld:
    """A written world read back: scores any FactWorld prompt (or row of its files) from the KB alone."""

    config: FactWorldConfig
    kb: KnowledgeBase
    root: Path

    def row_for(self, prompt_or_row: str | Mapping[str, Any]) -> dict[str, Any]:
        """The scoring row of a prompt string, or of any row with a `prompt` column (SFT, preference, prompt rows)."""
        prompt = prompt_or_row if isinstance(prompt_or_row, str) else prompt_or_row["prompt"]
        return parse_prompt(self.kb, prompt)

    def score(self, prompt_or_row: str | Mapping[str, Any], response: str) -> GoldScore:
        return score_response(self.row_for(prompt_or_row), response)

    def evaluate(
        self, prompts_or_rows: Sequence[str | Mapping[str, Any]], responses: Sequence[str]
    ) -> dict[str, float]:
        """`evaluate_responses` on prompts given as strings or as rows of any of the world's files."""
        return evaluate_responses([self.row_for(p) for p in prompts_or_rows], responses)

    def read(self, name: str) -> list[dict[str, Any]]:
        """Rows of one of the world's JSONL files, e.g. read("prompts_test")."""
        path = self.root / f"{name}.jsonl"
        with path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def load_factworld(out_dir: str | Path) -> FactWorld:
    """Read a directory written by `write_factworld` (only its kb.json is needed to score)."""
    root = Path(out_dir)
    path = root / "kb.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; write the world first: rlxf world factworld --out {root}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}; regenerate the world")
    return FactWorld(config=FactWorldConfig(**data["config"]), kb=KnowledgeBase.from_json(data["kb"]), root=root)
