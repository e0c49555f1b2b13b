import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import pytest

from rlxf.cli import build_parser
from rlxf.config import ConfigError, config_from_args, field_docs, from_dict
from rlxf.engine import TrainConfig
from rlxf.trainers.rm import RewardModelConfig
from rlxf.trainers.sft import SFTConfig


@dataclass
class Inner:
    lr: float = 1e-3
    """Learning rate."""
    steps: int = 10
    """Steps."""


@dataclass
class Outer:
    name: str = "x"
    """A name."""
    mode: Literal["a", "b"] = "a"
    """A choice."""
    flag: bool = False
    """A switch."""
    inner: Inner = field(default_factory=Inner)
    """Nested settings."""


def parse(argv, cls=Outer):
    import argparse

    from rlxf.config import add_config_arguments

    p = argparse.ArgumentParser()
    add_config_arguments(p, cls)
    return config_from_args(cls, p.parse_args(argv))


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from-yaml\ninner:\n  lr: 1e-5\n  steps: 3\n")  # PyYAML reads 1e-5 as a string
    cfg = parse(["--config", str(path), "--inner.steps", "7", "--flag"])
    assert cfg.name == "from-yaml" and cfg.inner.lr == 1e-5 and cfg.inner.steps == 7 and cfg.flag is True


def test_unknown_key_names_file_and_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml.*'inner'.*unknown key\(s\) \['lrr'\]"):
        parse(["--config", str(path)])


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"steps": "ten"}}, "expected an integer"),
        ({"inner": {"steps": 2.5}}, "expected an integer"),
        ({"inner": {"lr": "fast"}}, "expected a number"),
        ({"mode": "c"}, r"not one of \['a', 'b'\]"),
        ({"flag": "maybe"}, "expected true or false"),
        ({"inner": 3}, "expected a mapping"),
    ],
)
def test_wrong_types_are_errors(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data, "test.yaml")


def test_field_docs_read_from_source():
    docs = field_docs(TrainConfig)
    assert docs["lr"] == "Peak learning rate of AdamW."
    assert set(docs) == {f for f in TrainConfig.__dataclass_fields__}


@pytest.mark.parametrize("command, cls", [(["sft"], SFTConfig), (["rm"], RewardModelConfig)])
def test_help_documents_every_option_with_default(command, cls):
    parser, selected = build_parser(command)
    assert selected is not None and selected.config_cls is cls
    sub = parser._subparsers._group_actions[0].choices[command[0]]
    text = sub.format_help()
    for name in ["model", "train_file", "train.lr", "train.batch_size", "train.resume"]:
        assert f"--{name}" in text
    assert "(default: 0.0001)" in text or "(default: 0.001)" in text or "(default: 0.0003)" in text


def test_cli_help_through_subprocess():
    proc = subprocess.run([sys.executable, "-m", "rlxf.cli", "sft", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    assert "--train.per_device_batch_size" in proc.stdout and "default:" in proc.stdout


def test_cli_reports_config_errors_cleanly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: fast\n")
    proc = subprocess.run(
        [sys.executable, "-m", "rlxf.cli", "sft", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "'lr'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("module", "cls", "field", "value"),
    [
        ("rlxf.trainers.dpo", "DPOConfig", "beta", 0.0),
        ("rlxf.trainers.dpo", "DPOConfig", "label_smoothing", 0.5),
        ("rlxf.trainers.ppo", "PPOConfig", "gamma", 1.5),
        ("rlxf.trainers.ppo", "PPOConfig", "clip_eps", -0.1),
        ("rlxf.trainers.rloo", "RLOOConfig", "kl_coef", -1.0),
        ("rlxf.trainers.sft", "SFTConfig", "max_length", 0),
        ("rlxf.trainers.rm", "RewardModelConfig", "max_prompt_length", 0),
        ("rlxf.credit.segments", "CreditConfig", "window", 0),
        ("rlxf.feedback.pairs", "PairsConfig", "k", 1),
        ("rlxf.sampling", "SampleConfig", "n", 0),
        ("rlxf.evaluation", "EvalConfig", "samples_per_prompt", 0),
        ("rlxf.models.tiny", "TinyModelConfig", "layers", 0),
        ("rlxf.demo", "DemoConfig", "dpo_lr", -1e-4),
        ("rlxf.backends", "BackendConfig", "timeout", 0.0),
    ],
)
def test_out_of_range_settings_name_the_field(module, cls, field, value):
    """Every config checks its numeric fields when built (from YAML, flags or Python) and names the field."""
    import importlib

    from rlxf.config import ConfigError

    config_cls = getattr(importlib.import_module(module), cls)
    config_cls()  # the defaults are in range
    with pytest.raises(ConfigError, match=rf"^{field} must be"):
        config_cls(**{field: value})


def test_trl_names_and_typos_get_a_did_you_mean(capsys, tmp_path):
    """A TRL user's flags and YAML keys name the rlxf field that does the job, and the subcommand."""
    from rlxf.cli import main

    argv = ["sft", "--model", "m", "--learning_rate", "1e-4", "--output_dir", "o", "--num_train_epochs", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlxf sft: error: unrecognized arguments: --learning_rate 1e-4")
    for hint in ("--learning_rate -> --train.lr", "--output_dir -> --out", "--num_train_epochs -> --train.epochs"):
        assert hint in err
    assert main(["dpo", "--bta", "0.1"]) == 2 and "--bta -> --beta" in capsys.readouterr().err
    yaml_file = tmp_path / "trl.yaml"
    yaml_file.write_text("model_name_or_path: m\ntrain:\n  learning_rate: 1.0e-4\n")
    assert main(["sft", "--config", str(yaml_file)]) == 2
    err = capsys.readouterr().err
    assert "'model_name_or_path' -> 'model'" in err and "Traceback" not in err


def test_choices_are_shown_and_accepted_in_any_case(capsys):
    from rlxf.cli import build_parser
    from rlxf.config import config_from_args

    argv = ["dpo", "--loss_type", "IPO", "--on_bad_row", "Skip"]
    parser, command = build_parser(argv)
    cfg = config_from_args(command.config_cls, parser.parse_args(argv))
    assert cfg.loss_type == "ipo" and cfg.on_bad_row == "skip"
    assert "{sigmoid,ipo}" in parser._subparsers._group_actions[0].choices["dpo"].format_help()
