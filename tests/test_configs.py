"""Every YAML in configs/ parses into its command's config dataclass exactly as `rlxf <command> --config FILE` reads it
(`rlxf.cli.build_parser`, then `rlxf.config.config_from_args`), so a renamed or removed field fails here rather than
in a user's run. A file's command comes from the prefix of its name; a file with an unknown prefix fails, so a new
config is never skipped silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlxf.cli import COMMANDS, build_parser
from rlxf.config import config_from_args
from rlxf.engine import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("*.yml")])

PREFIXES = {
    "sft_": "sft",
    "rm_": "rm",
    "ranking_rm_": "ranking-rm",
    "dpo_": "dpo",
    "ppo_": "ppo",
    "rloo_": "rloo",
    "reinforce_": "reinforce",
    "rejection_sampling_": "rejection-sampling",
    "seq2seq_rm": "seq2seq-rm",
}
"""File name prefix -> the `rlxf` command that reads the file."""


def command_of(name: str) -> str | None:
    """The command of a config file name: the longest prefix that matches, or None."""
    matches = [prefix for prefix in PREFIXES if name.startswith(prefix)]
    return PREFIXES[max(matches, key=len)] if matches else None


def test_the_prefixes_name_commands_and_the_directory_has_configs():
    assert set(PREFIXES.values()) <= set(COMMANDS)
    assert command_of("ranking_rm_lengthworld.yaml") == "ranking-rm" and command_of("rm_factworld.yaml") == "rm"
    assert command_of("grpo_x.yaml") is None
    assert CONFIGS, f"no YAML files in {CONFIG_DIR}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_into_its_commands_dataclass(path):
    command = command_of(path.name)
    if command is None:
        pytest.fail(
            f"{path.name}: no command for its prefix; name it <prefix><anything>.yaml with a prefix of {PREFIXES}"
        )
    argv = [*command.split(), "--config", str(path)]
    parser, selected = build_parser(argv)
    assert selected is not None, f"`rlxf {command}` is not a command"
    cfg = config_from_args(selected.config_cls, parser.parse_args(argv))
    assert isinstance(cfg, selected.config_cls)
    # the file's own command, not another one it would be routed to (an `rm_` file with a ranking loss is misnamed)
    assert selected.config_cls is COMMANDS[command][1]().config_cls
    train = getattr(cfg, "train", None)
    if isinstance(train, TrainConfig):
        assert train.lr > 0 and train.batch_size % train.per_device_batch_size == 0
