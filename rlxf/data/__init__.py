"""Data: the file formats and their validation (`formats`), tokenization into ids (`tokenize`), and packing of
preference pairs into rows without padding (`packing`). The loaders are re-exported here: `rlxf.data.load_preferences`."""

from rlxf.data.formats import (
    DataError,
    default_rejected_path,
    load_label_pairs,
    load_preferences,
    load_prompts,
    load_rankings,
    load_sft,
    normalize_preference,
    normalize_prompt,
    normalize_ranking,
    normalize_sft,
    split_implicit_prompt,
    write_jsonl,
)

__all__ = [
    "DataError",
    "default_rejected_path",
    "load_label_pairs",
    "load_preferences",
    "load_prompts",
    "load_rankings",
    "load_sft",
    "normalize_preference",
    "normalize_prompt",
    "normalize_ranking",
    "normalize_sft",
    "split_implicit_prompt",
    "write_jsonl",
]
