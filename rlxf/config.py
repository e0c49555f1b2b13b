"""Stage configs: one dataclass per stage, read from YAML and overridden by `--key value` flags.

YAML keys equal field names (nested dataclasses are nested mappings, and `--train.lr 1e-4` on the command line);
a field's docstring is its `--help` text; every default lives in the dataclass and nowhere else. Unknown keys and
values of the wrong type are errors that name the file (or flag) and the key.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rlxf.errors import UserError

C = TypeVar("C")


class ConfigError(UserError):
    """A config file or flag that does not fit the stage's dataclass."""


_RANGE = re.compile(
    r"^(?P<op>>=|>)(?P<lo>-?[0-9.]+)$|^(?P<left>[\[(])(?P<a>-?[0-9.]+),(?P<b>-?[0-9.]+)(?P<right>[\])])$"
)


def check_ranges(cfg: Any, rules: dict[str, str], prefix: str = "") -> None:
    """Raise a ConfigError naming the first field of `cfg` outside its range, e.g. "beta must be > 0, got -1".

    A rule is '>X' / '>=X' or an interval '[a,b]', '(a,b]', '[a,b)', '(a,b)'. NaN is never in range. `prefix` names a
    nested section ('train.'). Called from the configs' `__post_init__`, so Python users get the same check."""
    for name, rule in rules.items():
        value = getattr(cfg, name)
        m = _RANGE.match(rule)
        if m is None:
            raise ValueError(f"bad range rule {rule!r} for {name}")
        if m["op"]:
            lo = float(m["lo"])
            ok = value > lo if m["op"] == ">" else value >= lo
            text = f"{'>' if m['op'] == '>' else '>='} {m['lo']}"
        else:
            a, b = float(m["a"]), float(m["b"])
            ok = (value > a if m["left"] == "(" else value >= a) and (value < b if m["right"] == ")" else value <= b)
            text = f"in {m['left']}{m['a']}, {m['b']}{m['right']}"
        if not ok or (isinstance(value, float) and math.isnan(value)):
            raise ConfigError(f"{prefix}{name} must be {text}, got {value!r}")


TRL_NAMES: dict[str, str] = {
    "model_name_or_path": "model",
    "output_dir": "out",
    "dataset_name": "train_file",
    "train_dataset": "train_file",
    "eval_dataset": "eval_file",
    "learning_rate": "train.lr",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.batch_size",
    "num_train_epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "lr_scheduler_type": "train.lr_schedule",
    "max_grad_norm": "train.max_grad_norm",
    "seed": "train.seed",
    "logging_steps": "train.log_every",
    "eval_steps": "train.eval_every",
    "save_steps": "train.save_every",
    "save_total_limit": "train.keep_checkpoints",
    "resume_from_checkpoint": "train.resume",
    "report_to": "train.report_to",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "num_generations": "k",
    "max_completion_length": "generation.max_new_tokens",
    "max_new_tokens": "generation.max_new_tokens",
    "temperature": "generation.temperature",
    "torch_dtype": "train.torch_dtype",
    "use_peft": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "lora_target_modules": "lora.target_modules",
}
"""TRL / transformers TrainingArguments names -> the rlxf field that does the same job (for "did you mean" hints;
gradient_accumulation_steps maps to train.batch_size because rlxf derives accumulation from the total batch)."""


def field_names(cls: type) -> list[str]:
    """Every field of `cls` as a dotted flag name ('lr' of the nested `train` section is 'train.lr')."""
    return [name for name, *_ in _flatten(cls)]


def suggest_field(name: str, cls: type) -> str | None:
    """The field a mistyped or TRL-style name probably meant, as a dotted name, or None."""
    key = name.lstrip("-").split("=", 1)[0].replace("-", "_")
    names = field_names(cls)
    target = TRL_NAMES.get(key)
    for candidate in (target, target.rsplit(".", 1)[-1]) if target else ():  # 'train.lr', or 'lr' inside `train:`
        if candidate in names:
            return candidate
    leaf = {n.rsplit(".", 1)[-1]: n for n in names}  # 'lr' -> 'train.lr'
    if key in leaf and leaf[key] != key:
        return leaf[key]
    close = difflib.get_close_matches(key, names + list(leaf), n=1, cutoff=0.75)
    return leaf.get(close[0], close[0]) if close else None


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string literal right after it)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _resolved_fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or flag value to the field's type, or raise naming `where`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], where)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        # choices are matched without regard to case ("SKIP" is "skip"), the spelling of the dataclass wins
        folded = {c.lower(): c for c in choices if isinstance(c, str)}
        if isinstance(value, str) and value.lower() in folded:
            return folded[value.lower()]
        raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, str))
            or (isinstance(value, str) and not value.strip().lstrip("+-").isdigit())
        ):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        # PyYAML reads `1e-5` (no dot) as a string: accept it, as a user means a number.
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or math.isnan(out):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[C], data: dict[str, Any], where: str = "config") -> C:
    """Build `cls` from a (possibly nested) mapping, strictly: unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    known = {f.name: (f, tp) for f, tp in _resolved_fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        hints = [f"{k!r} -> {s!r}" for k in unknown if (s := suggest_field(k, cls))]
        hint = f"; did you mean {', '.join(hints)}?" if hints else ""
        raise ConfigError(
            f"{where}: unknown key(s) {unknown} for {cls.__name__}{hint} (valid keys: {sorted(known)}; nested "
            "sections such as `train:` hold their own keys)"
        )
    kwargs = {}
    for name, value in data.items():
        _, tp = known[name]
        key = f"{where} key '{name}'"
        kwargs[name] = from_dict(tp, value, key) if dataclasses.is_dataclass(tp) else _coerce(value, tp, key)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _flatten(cls: type, prefix: str = "") -> list[tuple[str, Any, Any, str]]:
    """(dotted name, type, default, help) for every leaf field, nested dataclasses included."""
    docs = field_docs(cls)
    rows = []
    for f, tp in _resolved_fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows.extend(_flatten(tp, name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        rows.append((name, tp, default, docs.get(f.name, "")))
    return rows


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(tp))) + "}"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One `--name` flag per field (dotted for nested ones), documented with its docstring, type and default."""
    parser.add_argument(
        "--config", metavar="YAML", help="YAML file whose keys are the fields below; flags given here override it."
    )
    for name, tp, default, doc in _flatten(cls):
        shown = "required" if default is dataclasses.MISSING else f"default: {default!r}"
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(
            *flags,
            dest=f"cfg:{name}",
            metavar=_type_name(tp) if typing.get_origin(tp) is typing.Literal else _type_name(tp).upper(),
            default=argparse.SUPPRESS,
            nargs="?" if tp is bool else None,
            const="true" if tp is bool else None,
            help=f"{doc} ({shown})".replace("%", "%%"),
        )


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """Merge `--config` YAML with flag overrides into a `cls` instance."""
    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of {cls.__name__} fields")
        data = loaded
    for key, value in vars(args).items():
        if not key.startswith("cfg:"):
            continue
        node = data
        *parents, leaf = key[4:].split(".")
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: depth + 1])
                raise ConfigError(
                    f"{args.config}: '{section}' must be a mapping of fields (e.g. `{section}:` then indented "
                    f"`lr: 1e-4` lines), got {node!r}"
                )
        node[leaf] = value
    return from_dict(cls, data, where=getattr(args, "config", None) or "flags")


def save_yaml(cfg: Any, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
