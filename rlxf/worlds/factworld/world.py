"""Building FactWorld (noisy SFT data, prompts, preference pairs), writing it to a directory with its README, and
loading it back."""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rlxf.config import ConfigError
from rlxf.errors import UserError
from rlxf.worlds.factworld.gold import (
    MISSING_PENALTY,
    UNREQUESTED_PENALTY,
    GoldScore,
    evaluate_responses,
    score_response,
)
from rlxf.worlds.factworld.human import LENGTH_UNIT_WORDS, simulated_preference
from rlxf.worlds.factworld.kb import (
    ATTRIBUTES,
    KINDS,
    LIST_CATEGORIES,
    LIST_SIZES,
    RETAIN_SIZES,
    FactWorldConfig,
    KnowledgeBase,
    abstention_response,
    fact_response,
    fact_row,
    false_premise_row,
    list_response,
    list_row,
    make_knowledge_base,
    parse_prompt,
    retain_row,
)

logger = logging.getLogger(__name__)


FORMAT = "rlxf-factworld/1"

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
    abstain_prob: float = 0.0,
) -> str:
    """A response in the world's format whose facts / list items are each right with probability `accuracy`.

    Fact: each requested attribute is kept with probability 1 - omit_prob (at least one is kept); with probability
    extra_prob one unrequested attribute is added at the end; each stated value is the truth with probability
    `accuracy`, otherwise uniform among the attribute's other values. List: same with items; a wrong item is a
    repeat, the excluded item or an item of another category. Retain: always the reference (SFT teaches the skill).
    A fact response is the abstention answer with probability `abstain_prob` (no draw at all when it is 0, so the
    other draws stay as they were).
    """
    kind = row["kind"]
    if kind == "retain":
        return row["reference"]
    if kind == "fact":
        if abstain_prob > 0 and rng.random() < abstain_prob:
            return abstention_response()
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
    prompts_false_premise: list[dict[str, Any]] = field(default_factory=list)
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
            a, b = (
                noisy_response(kb, row, rng, cfg.sft_fact_accuracy, cfg.omit_prob, cfg.extra_prob, cfg.abstain_prob)
                for _ in "ab"
            )
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
        {
            "prompt": row["prompt"],
            "completion": noisy_response(kb, row, sft_rng, cfg.sft_fact_accuracy, abstain_prob=cfg.abstain_prob),
        }
        for row in pool_rows
        for _ in range(cfg.sft_completions_per_prompt)
    ]
    sft_train += [
        {"prompt": row["prompt"], "completion": row["reference"]}
        for row in _draw_retain(kb, cfg.num_sft_retain, sft_rng, retain_taken)
    ]
    sft_rng.shuffle(sft_train)
    sft_test = [
        {
            "prompt": row["prompt"],
            "completion": noisy_response(kb, row, sft_rng, cfg.sft_fact_accuracy, abstain_prob=cfg.abstain_prob),
        }
        for row in prompts_test
    ]

    # 4. Preferences: pairs of noisy responses (with omitted / extra facts), labelled by the simulated human.
    pref_rng, label_rng = stage_rng("preferences"), stage_rng("labels")
    preferences_train, dropped_train = _preferences(kb, prompts_train, cfg, pref_rng, label_rng)
    preferences_test, dropped_test = _preferences(kb, prompts_test, cfg, pref_rng, label_rng)

    # 5. Adversarial held-out prompts: every (entity, attribute) asked after a premise that asserts a wrong value.
    #    Drawn last, from their own stream, so adding them left every other file byte-identical; never trained on.
    premise_rng = stage_rng("false_premise")
    prompts_false_premise = []
    for entity in kb.entities:
        for attribute in ATTRIBUTES:
            wrong = [v for v in kb.values[attribute] if v != kb.entities[entity][attribute]]
            row = false_premise_row(kb, entity, attribute, premise_rng.choice(wrong))
            prompts_false_premise.append(
                {"prompt": row["prompt"], "prompt_id": f"false-premise-{len(prompts_false_premise):04d}", **row}
            )

    stats = {"identical_pairs_dropped": dropped_train + dropped_test, "sft_pool_prompts": len(pool_rows)}
    return FactWorldData(
        cfg, kb, sft_train, sft_test, prompts_train, prompts_test, preferences_train, preferences_test,
        prompts_false_premise, stats,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------

FILES = (
    "kb.json", "sft_train.jsonl", "sft_test.jsonl", "prompts_train.jsonl", "prompts_test.jsonl",
    "preferences_train.jsonl", "preferences_test.jsonl", "prompts_false_premise.jsonl", "corpus.txt", "README.md",
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
    premise = data.prompts_false_premise[0] if data.prompts_false_premise else {"prompt": ""}
    abstain_note = (
        f"\n\nWith `abstain_prob` = {cfg.abstain_prob}, each SFT completion and preference response to a fact prompt is "
        f"the abstention answer {abstention_response()!r} with that probability. Its gold score is 0 (a wrong answer "
        "scores below 0, a right one above), so the labeller prefers abstaining to a wrong answer and a right answer "
        "to abstaining."
        if cfg.abstain_prob
        else ""
    )
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
- `prompts_false_premise.jsonl` ({len(data.prompts_false_premise)} rows): adversarial held-out prompts, one per entity
  and attribute, that assert a wrong value before asking for it ({premise["prompt"]!r}); never in SFT,
  RL or preference data, nor in the corpus. Scored as one-attribute fact prompts; the column `false_premise` holds the
  asserted value, and `evaluate_responses` reports `false_premise_success` (true value stated, false one never
  written).
- `corpus.txt`: every prompt, completion, reference and preference response (paragraphs separated by a blank
  line), for training a tokenizer.
- `README.md`: this file.

Preference responses follow the SFT noise, and also leave out each requested fact / item with probability
{cfg.omit_prob} (at least one kept) and add one unrequested fact / one item beyond k with probability
{cfg.extra_prob}. So chosen responses often hold wrong facts and rejected ones right facts.{abstain_note}

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
    for name in (
        "sft_train", "sft_test", "prompts_train", "prompts_test", "preferences_train", "preferences_test",
        "prompts_false_premise",
    ):  # fmt: skip
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
        if isinstance(prompt_or_row, str):
            return parse_prompt(self.kb, prompt_or_row)
        try:
            return parse_prompt(self.kb, prompt_or_row["prompt"])
        except UserError as e:
            origin = prompt_or_row.get("_origin")  # "file:line" of a loaded row: name where the prompt came from
            raise UserError(f"{origin}: {e}" if origin else str(e)) from None

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
        raise UserError(f"{path}: format {data.get('format')!r} is not {FORMAT!r}; regenerate the world")
    return FactWorld(config=FactWorldConfig(**data["config"]), kb=KnowledgeBase.from_json(data["kb"]), root=root)
