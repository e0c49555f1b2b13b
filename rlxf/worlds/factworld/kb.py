"""FactWorld's knowledge base: invented entities with four attributes, the world's config, and the prompt rows
(fact, list, retain) with their parser."""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rlxf.config import ConfigError
from rlxf.errors import UserError

logger = logging.getLogger(__name__)


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
    abstain_prob: float = 0.0
    """Probability that an SFT completion or a preference response to a fact prompt is the abstention answer
    " I don't know." (gold score 0: above a wrong answer, below a right one, so the labeller prefers abstaining to
    a wrong answer and a right answer to abstaining). 0 (the default) leaves every data file as it was."""

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
        for name in ("sft_fact_accuracy", "omit_prob", "extra_prob", "abstain_prob"):
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


ABSTENTION = "I don't know."
"""The abstention answer to a fact prompt (`FactWorldConfig.abstain_prob`); its gold score is 0."""


def abstention_response() -> str:
    return " " + ABSTENTION


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


def false_premise_row(kb: KnowledgeBase, entity: str, attribute: str, false_value: str) -> dict[str, Any]:
    """An adversarial fact prompt that first asserts a wrong value, then asks for it:
    "Q: Zorbin's colour is red. What is the colour of Zorbin?\nA:" when Zorbin's colour is blue.

    The premise is written in the very sentence form the policy answers in, so copying it is the easy mistake. Scored
    like the one-attribute fact prompt (the true value is right, the premise's value wrong); the row's extra column
    `false_premise` holds the asserted value, for `evaluate_responses`' adversarial success rate."""
    row = fact_row(kb, entity, [attribute])
    if false_value not in kb.values[attribute] or false_value == row["truth"][attribute]:
        raise ValueError(
            f"false_value must be a {attribute} of this world other than {entity}'s true one "
            f"({row['truth'][attribute]!r}), got {false_value!r}"
        )
    premise = fact_sentence(entity, attribute, false_value)
    return {**row, "prompt": f"Q: {premise} What is the {attribute} of {entity}?\nA:", "false_premise": false_value}


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
_FALSE_PREMISE_PROMPT = re.compile(
    r"Q: (?P<entity>[A-Za-z]+)'s (?P<attr>[a-z]+) is (?P<value>[A-Za-z]+)\. What is the (?P=attr) of (?P=entity)\?\nA:"
)
_LIST_PROMPT = re.compile(r"Q: Name (?P<k>[0-9]+) (?P<category>[a-z]+)(?: other than (?P<exclude>[A-Za-z]+))?\.\nA:")
_RETAIN_PROMPT = re.compile(r"Q: Reverse the words: (?P<words>[a-z]+(?: [a-z]+)*)\nA:")


def parse_prompt(kb: KnowledgeBase, prompt: str) -> dict[str, Any]:
    """The prompt row (all scoring metadata) of a FactWorld prompt string; inverse of fact_row / false_premise_row /
    list_row / retain_row."""
    if m := _FACT_PROMPT_1.fullmatch(prompt) or _FACT_PROMPT_N.fullmatch(prompt):
        return fact_row(kb, m["entity"], re.split(r", | and ", m["attrs"]))
    if m := _FALSE_PREMISE_PROMPT.fullmatch(prompt):
        try:
            return false_premise_row(kb, m["entity"], m["attr"], m["value"])
        except ValueError as e:
            raise UserError(f"not a FactWorld false-premise prompt: {prompt!r}: {e}") from None
    if m := _LIST_PROMPT.fullmatch(prompt):
        return list_row(kb, m["category"], int(m["k"]), m["exclude"])
    if m := _RETAIN_PROMPT.fullmatch(prompt):
        return retain_row(m["words"].split(" "))
    shown = prompt if len(prompt) <= 120 else f"{prompt[:80]}... ({len(prompt)} characters)"
    raise UserError(
        f"not a FactWorld prompt: {shown!r}; a FactWorld reward or --gold_world scores only the prompts its world "
        "wrote (prompts_*.jsonl, sft_*.jsonl, preferences_*.jsonl)"
    )
