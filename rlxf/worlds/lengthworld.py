"""LengthWorld: the reward-collapse gold world, after the recipe of Song et al. (arXiv:2305.17608, §5; the paper's
`dataset_construction.ipynb` at github.com/ctlllll/reward_collapse, commit 5dc3efd).

Each prompt has a long gold answer of random words; its n = 8 completions are word prefixes of that answer, and
longer is better (28 ranked pairs per prompt). A seeded half of the prompts is open-ended, the other half
closed-ended, each with a matching instruction suffix:
- open: prefix lengths 10, 20, …, 80 words (evenly spaced: the ideal rewards are spread out);
- closed: 16, 22, 28, 34 and 56, 62, 68, 74 words (two clusters: the ideal rewards are polarised).
Rows use the ranking format (`prompt`, `responses` best -> worst, `prompt_type`). The vocabulary is a few hundred
invented two-syllable words, so a tiny model with a small tokenizer can learn the task.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from rlxf.errors import UserError

logger = logging.getLogger(__name__)

OPEN_LENGTHS: tuple[int, ...] = (10, 20, 30, 40, 50, 60, 70, 80)
CLOSED_LENGTHS: tuple[int, ...] = (16, 22, 28, 34, 56, 62, 68, 74)
SUFFIX: dict[str, str] = {
    # The instruction suffixes of the paper's dataset notebook.
    "open": "Write the answer in an open-ended way.",
    "closed": "Write either a short answer or a long answer.",
}
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Write about {a} and {b}.",
    "Tell me about the {a} of {b}.",
    "Describe how {a} meets {b}.",
    "Explain {a} to a {b}.",
)
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass
class LengthWorldConfig:
    out: str = "runs/lengthworld"
    """Directory to write the world into (train.jsonl, test.jsonl, corpus.txt, world.json)."""
    seed: int = 0
    """Seed of the prompts, gold answers and open/closed labels."""
    train_prompts: int = 8192
    """Training prompts (the paper used 8,192)."""
    test_prompts: int = 16
    """Held-out prompts (the paper used 16)."""
    vocab_size: int = 300
    """Invented words in the vocabulary (kept small for a tiny model)."""
    answer_words: int = 100
    """Words in each gold answer; at least the longest prefix (80). The paper kept answers of ≥ 100 words."""


def lengthworld_vocabulary(size: int) -> list[str]:
    """`size` distinct invented two-syllable words (consonant-vowel-consonant-vowel), the same for every seed."""
    words = [c1 + v1 + c2 + v2 for c1 in _CONSONANTS for v1 in _VOWELS for c2 in _CONSONANTS for v2 in _VOWELS]
    if not 2 <= size <= len(words):
        raise UserError(f"vocab_size must lie in [2, {len(words)}], got {size}")
    random.Random(0).shuffle(words)  # a fixed vocabulary, so tokenizers trained on different seeds agree
    return sorted(words[:size])


def make_row(rng: random.Random, vocab: list[str], prompt_type: str, answer_words: int) -> dict:
    """One ranking row: a prompt with its type's suffix, and 8 word prefixes of a random gold answer, longest first."""
    lengths = OPEN_LENGTHS if prompt_type == "open" else CLOSED_LENGTHS
    if answer_words < max(lengths):
        raise UserError(f"answer_words must be at least the longest prefix ({max(lengths)}), got {answer_words}")
    a, b = rng.sample(vocab, 2)
    prompt = f"{rng.choice(PROMPT_TEMPLATES).format(a=a, b=b)} {SUFFIX[prompt_type]}"
    answer = rng.choices(vocab, k=answer_words)
    responses = [" ".join(answer[:k]) for k in sorted(lengths, reverse=True)]  # best (longest) -> worst
    return {"prompt": prompt, "responses": responses, "prompt_type": prompt_type}


def generate_lengthworld(cfg: LengthWorldConfig) -> dict[str, list[dict]]:
    """The rows of both splits, {"train": [...], "test": [...]}; deterministic in cfg (no I/O).

    Each split is exactly half open and half closed (one extra of a random type when odd), in random order.
    """
    vocab = lengthworld_vocabulary(cfg.vocab_size)
    splits = {}
    for split, count in (("train", cfg.train_prompts), ("test", cfg.test_prompts)):
        rng = random.Random(f"lengthworld/{cfg.seed}/{split}")  # one stream per split: test rows do not move
        types = ["open"] * (count // 2) + ["closed"] * (count // 2)
        if count % 2:
            types.append(rng.choice(("open", "closed")))
        rng.shuffle(types)
        splits[split] = [make_row(rng, vocab, t, cfg.answer_words) for t in types]
    return splits


def write_lengthworld(cfg: LengthWorldConfig) -> Path:
    """Write train.jsonl, test.jsonl (ranking rows), corpus.txt (training prompts and gold answers, one per line,
    for a tokenizer) and world.json (the config and the prefix lengths) into cfg.out; returns that directory."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = generate_lengthworld(cfg)
    for split, rows in splits.items():
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    with open(out / "corpus.txt", "w", encoding="utf-8") as f:
        for row in splits["train"]:
            f.write(row["prompt"] + "\n" + row["responses"][0] + "\n")
    meta = {
        "world": "lengthworld",
        "config": asdict(cfg),
        "open_lengths": list(OPEN_LENGTHS),
        "closed_lengths": list(CLOSED_LENGTHS),
        "suffix": SUFFIX,
        "counts": {s: len(r) for s, r in splits.items()},
    }
    (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote LengthWorld to %s: %d train / %d test prompts", out, cfg.train_prompts, cfg.test_prompts)
    return out
