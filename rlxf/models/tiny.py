"""Tiny local models: a BPE tokenizer trained on a corpus and a small Llama built from a config.

Tests and demos use these instead of downloading weights. Both are saved as ordinary `save_pretrained`
directories, so `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` load them unchanged, and every stage
that accepts a tiny model accepts any Hugging Face causal LM directory as well.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rlxf.config import check_ranges
from rlxf.errors import UserError
from rlxf.hf import readable_files

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One turn per role marker; the assistant turn ends with EOS so a generated reply stops there.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|eos|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}"
)


MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "layers": 2, "heads": 4, "intermediate_size": 512},
    "small": {"hidden_size": 192, "layers": 4, "heads": 6, "intermediate_size": 768},
    "base": {"hidden_size": 256, "layers": 6, "heads": 8, "intermediate_size": 1024},
}
"""Named model tiers (`--size`). With a 512-token vocabulary (tied embeddings) they hold about 0.59M, 2.46M and
6.43M parameters; one tier to the next is ~4x / ~2.6x the parameters and roughly that much more CPU time per token
(`tests/test_tiny_model.py` pins the counts; `experiments/judges/README.md` gives measured training times). "tiny" is the demo's
model."""


@dataclass
class TinyModelConfig:
    corpus: str = ""
    """Corpus to train the tokenizer on, comma-separated: plain text files (e.g. a world's corpus.txt) and/or data
    files as the loaders read them (.jsonl, .jsonl.gz, .parquet, datasets directories: every text field). Required."""
    out: str = "runs/tiny-model"
    """Directory to write the tokenizer and the model into (a `save_pretrained` directory)."""
    vocab_size: int = 512
    """BPE vocabulary size, special tokens included."""
    hidden_size: int = 64
    """Width of the residual stream."""
    layers: int = 2
    """Number of transformer blocks."""
    heads: int = 4
    """Attention heads (hidden_size must divide by it)."""
    intermediate_size: int = 256
    """Width of the MLP."""
    max_position_embeddings: int = 512
    """Longest sequence the model can see."""
    seed: int = 0
    """Seed of the weight initialisation."""
    size: str = ""
    """A named tier that sets hidden_size, layers, heads and intermediate_size together: tiny (the demo's, ~0.6M
    parameters), small (~2.5M) or base (~6.4M). Empty: use those four options as given."""

    def __post_init__(self) -> None:
        if self.size:
            if self.size not in MODEL_SIZES:
                raise UserError(f"size must be one of {', '.join(MODEL_SIZES)} (or empty), got {self.size!r}")
            shape = MODEL_SIZES[self.size]
            defaults = {f.name: f.default for f in fields(self)}
            changed = [k for k in shape if getattr(self, k) != defaults[k] and getattr(self, k) != shape[k]]
            if changed:
                raise UserError(
                    f"--size {self.size} sets {', '.join(shape)}; do not also pass {', '.join(changed)} "
                    f"(drop --size to choose the shape yourself)"
                )
            for k, v in shape.items():
                setattr(self, k, v)
        check_ranges(
            self,
            {
                "vocab_size": ">=16",
                "hidden_size": ">=1",
                "layers": ">=1",
                "heads": ">=1",
                "intermediate_size": ">=1",
                "max_position_embeddings": ">=2",
                "seed": ">=0",
            },
        )


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer with BOS/EOS/PAD, chat-role tokens and a chat template.

    Byte-level pre-tokenisation means any UTF-8 text round-trips and offsets map to characters, which the
    span-based rewards rely on. The tokenizer prepends BOS when `add_special_tokens=True`, like Llama's.
    """
    special = [PAD, BOS, EOS, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
            ),
        ]
    )
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    wrapped.add_special_tokens({"additional_special_tokens": list(ROLE_TOKENS)})
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def build_tiny_model(tokenizer: PreTrainedTokenizerFast, cfg: TinyModelConfig) -> LlamaForCausalLM:
    """A freshly initialised Llama sized by `cfg`, with the tokenizer's special-token ids in its config."""
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
"""Corpus files read as data (every text field of every row); anything else is read as plain UTF-8 text."""


def _row_texts(value: Any) -> Iterator[str]:
    """Every string in a row's values, recursively (chat messages give their `content`, never their `role`)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if key == "role" and "content" in value:
                continue
            yield from _row_texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _row_texts(item)


def corpus_lines(path: str | Path) -> list[str]:
    """The non-blank lines of one corpus source.

    A `.jsonl`, `.jsonl.gz` or `.parquet` file or a `datasets` save_to_disk directory is read the way the data
    loaders read it (`rlxf.data.formats`): every text field of every row (strings, lists of strings, chat messages'
    `content`; numbers and roles are left out), so a preference, SFT, ranking or prompt file trains the tokenizer on
    the text the model will see. Any other file (e.g. `corpus.txt`) is plain UTF-8 text, as before; a `.gz` text file
    is decompressed. Errors name the file (and line) at fault.
    """
    from rlxf.data.formats import DataError, _iter_raw

    p = Path(path)
    if not p.exists():
        raise UserError(f"corpus {p} does not exist; write a world first (`rlxf world factworld`) or pass a data file")
    name = p.name
    if p.is_dir() or name.endswith(DATA_SUFFIXES):
        lines: list[str] = []
        try:
            for origin, raw, _, error in _iter_raw(p):
                if error is not None:
                    raise error
                for text in _row_texts({k: v for k, v in raw.items() if not k.startswith("_")}):
                    lines.extend(line for line in text.splitlines() if line.strip())
        except DataError as e:
            raise UserError(f"corpus: {e}") from e
        return lines
    try:
        if name.endswith(".gz"):
            with gzip.open(p, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = p.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError, EOFError) as e:
        raise UserError(
            f"corpus {p}: cannot read it as UTF-8 text ({e}); tiny-model reads plain text files and the data files "
            f"the loaders read ({', '.join(DATA_SUFFIXES)}, datasets directories), named by those suffixes"
        ) from e
    return [line for line in text.splitlines() if line.strip()]


def make_tiny_model(cfg: TinyModelConfig) -> Path:
    """Train the tokenizer on `cfg.corpus`, build the model, save both into `cfg.out`; returns the directory."""
    if not cfg.corpus:
        raise UserError(
            "tiny-model needs --corpus: a text file or a data file (.jsonl, .jsonl.gz, .parquet, datasets directory) "
            "to train the tokenizer on (e.g. a world's corpus.txt)"
        )
    lines: list[str] = []
    for path in cfg.corpus.split(","):
        lines.extend(corpus_lines(path))
    if not lines:
        raise UserError(f"corpus {cfg.corpus} holds no text to train the tokenizer on")
    tokenizer = train_tokenizer(lines, cfg.vocab_size)
    model = build_tiny_model(tokenizer, cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    model.save_pretrained(out)
    readable_files(out)
    return out
