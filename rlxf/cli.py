"""The `rlxf` command: one subcommand per pipeline stage, each configured by one dataclass.

    rlxf <stage> --config stage.yaml --key value --train.lr 3e-4

`rlxf <stage> --help` lists every option with its default.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from rlxf.config import add_config_arguments, config_from_args, suggest_field
from rlxf.errors import BackendError, UserError


@dataclass
class Command:
    config_cls: type
    run: Callable[[Any], Any]
    pick: Callable[[list[str]], Command | None] | None = None
    """For a command whose config depends on its arguments: returns the command to run instead, or None for this
    one (`rm` runs `ranking-rm` when --loss names a ranking loss)."""


def _world_factworld() -> Command:
    from rlxf.worlds.factworld import FactWorldConfig, write_factworld

    @dataclass
    class FactWorldCommand(FactWorldConfig):
        out: str = "runs/factworld"
        """Directory to write the world into."""

    def run(cfg: FactWorldCommand) -> None:
        world = {k: v for k, v in asdict(cfg).items() if k != "out"}
        paths = write_factworld(FactWorldConfig(**world), cfg.out)
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))

    return Command(FactWorldCommand, run)


def _world_lengthworld() -> Command:
    from rlxf.worlds.lengthworld import LengthWorldConfig, write_lengthworld

    return Command(LengthWorldConfig, lambda cfg: print(write_lengthworld(cfg)))


def _collapse_predict() -> Command:
    from rlxf.collapse.commands import PredictConfig, run_predict

    return Command(
        PredictConfig, lambda cfg: print(json.dumps(run_predict(cfg), indent=2, default=str, ensure_ascii=False))
    )


def _collapse_diagnose() -> Command:
    from rlxf.collapse.commands import DiagnoseConfig, run_diagnose

    return Command(
        DiagnoseConfig, lambda cfg: print(json.dumps(run_diagnose(cfg), indent=2, default=str, ensure_ascii=False))
    )


def _tiny_model() -> Command:
    from rlxf.models.tiny import TinyModelConfig, make_tiny_model

    def run(cfg: TinyModelConfig) -> None:
        print(make_tiny_model(cfg))

    return Command(TinyModelConfig, run)


def _merge() -> Command:
    from rlxf.models.merge import MergeConfig, merge_to_directory

    return Command(MergeConfig, lambda cfg: print(merge_to_directory(cfg)))


def _sft() -> Command:
    from rlxf.trainers.sft import SFTConfig, train_sft

    def run(cfg: SFTConfig) -> None:
        result = train_sft(cfg)
        _print_summary(result)

    return Command(SFTConfig, run)


def _rm() -> Command:
    from rlxf.collapse.ranking import RANKING_LOSSES
    from rlxf.trainers.rm import RewardModelConfig, train_reward_model

    def pick(argv: list[str]) -> Command | None:
        return _ranking_rm() if _requested_loss(argv) in RANKING_LOSSES else None

    return Command(RewardModelConfig, lambda cfg: _print_summary(train_reward_model(cfg)), pick)


def _seq2seq_rm() -> Command:
    from rlxf.trainers.seq2seq_rm import Seq2SeqRMConfig, train_seq2seq_rm

    return Command(Seq2SeqRMConfig, lambda cfg: _print_summary(train_seq2seq_rm(cfg)))


def _ranking_rm() -> Command:
    from rlxf.trainers.ranking_rm import RankingRewardModelConfig, train_ranking_reward_model

    return Command(RankingRewardModelConfig, lambda cfg: _print_summary(train_ranking_reward_model(cfg)))


def _requested_loss(argv: list[str]) -> str | None:
    """The `--loss` of the command line, else the `loss:` of its --config YAML, else None: flags override the file,
    and the last flag wins, as when the config is read. A YAML that cannot be read is left for the config reader to
    report."""

    def flag(name: str) -> str | None:
        value = None
        for i, word in enumerate(argv):
            if word == name and i + 1 < len(argv):
                value = argv[i + 1]
            elif word.startswith(name + "="):
                value = word.split("=", 1)[1]
        return value

    loss, path = flag("--loss"), flag("--config")
    if loss is None and path:
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None
        loss = data.get("loss") if isinstance(data, dict) else None
    return loss if isinstance(loss, str) else None


def _dpo() -> Command:
    from rlxf.trainers.dpo import DPOConfig, train_dpo

    return Command(DPOConfig, lambda cfg: _print_summary(train_dpo(cfg)))


def _rloo() -> Command:
    from rlxf.trainers.rloo import RLOOConfig, train_rloo

    return Command(RLOOConfig, lambda cfg: _print_summary(train_rloo(cfg)))


def _ppo() -> Command:
    from rlxf.trainers.ppo import PPOConfig, train_ppo

    return Command(PPOConfig, lambda cfg: _print_summary(train_ppo(cfg)))


def _reinforce() -> Command:
    from rlxf.trainers.reinforce import ReinforceConfig, train_reinforce

    return Command(ReinforceConfig, lambda cfg: _print_summary(train_reinforce(cfg)))


def _rejection_sampling() -> Command:
    from rlxf.trainers.rejection_sampling import RejectionSamplingConfig, train_rejection_sampling

    return Command(RejectionSamplingConfig, lambda cfg: _print_summary(train_rejection_sampling(cfg)))


def _segments_show() -> Command:
    from rlxf.credit.inspect import ShowSegmentsConfig, run_show_segments

    return Command(ShowSegmentsConfig, lambda cfg: print(run_show_segments(cfg)))


def _segments_quality() -> Command:
    from rlxf.credit.inspect import SegmentQualityConfig, run_segment_quality

    return Command(
        SegmentQualityConfig, lambda cfg: print(json.dumps(run_segment_quality(cfg), indent=2, default=str))
    )


def _serve() -> Command:
    from rlxf.backends.serve import ServeConfig, run_serve

    return Command(ServeConfig, run_serve)


def _label() -> Command:
    from rlxf.feedback.label import LabelConfig, run_label

    return Command(LabelConfig, lambda cfg: print(json.dumps(run_label(cfg), indent=2, default=str)))


def _sample() -> Command:
    from rlxf.sampling import SampleConfig, run_sample

    return Command(SampleConfig, lambda cfg: print(run_sample(cfg)))


def _pairs() -> Command:
    from rlxf.feedback.pairs import PairsConfig, run_pairs

    return Command(PairsConfig, lambda cfg: print(run_pairs(cfg)))


def _eval() -> Command:
    from rlxf.evaluation import EvalConfig, markdown_table, run_eval

    return Command(EvalConfig, lambda cfg: print(markdown_table(run_eval(cfg))))


def _demo() -> Command:
    from rlxf.demo import DemoConfig, run_demo

    def run(cfg: DemoConfig) -> None:
        print(run_demo(cfg))

    return Command(DemoConfig, run)


def _print_summary(result: dict[str, Any]) -> None:
    if os.environ.get("RANK", "0") != "0":  # one summary per multi-process run
        return
    last = {k: v[-1] for k, v in result.get("history", {}).items() if v}
    print(json.dumps({"out": result.get("out"), "finished": result.get("finished"), "last": last}, indent=2))


# Imports happen when a command is chosen, so `rlxf --help` stays fast.
COMMANDS: dict[str, tuple[str, Callable[[], Command]]] = {
    "world factworld": ("Write FactWorld: knowledge base, SFT data, prompts, preference pairs.", _world_factworld),
    "world lengthworld": (
        "Write LengthWorld: rankings of word-prefix completions, open and closed prompts.",
        _world_lengthworld,
    ),
    "tiny-model": ("Train a BPE tokenizer on a corpus and build a small Llama (save_pretrained dir).", _tiny_model),
    "sft": ("Supervised fine-tuning on completion tokens.", _sft),
    "merge": (
        "Merge LoRA adapters (a trainer's final/ with --lora.r > 0) into their base model: a plain save_pretrained "
        "directory.",
        _merge,
    ),
    "rm": (
        "Train a reward model on preference pairs (Bradley-Terry, margins, soft labels). With --loss ranking, "
        "plackett_luce or pairwise_bt (or `loss:` in the --config YAML) it runs `rlxf ranking-rm` instead: "
        "`rlxf rm --loss ranking --help` lists those options.",
        _rm,
    ),
    "ranking-rm": (
        "Train a reward model on rankings (K responses per prompt): reward-collapse utilities per prompt, "
        "Plackett-Luce, all-pairs Bradley-Terry.",
        _ranking_rm,
    ),
    "seq2seq-rm": (
        "Train a seq2seq reward model (arXiv 2409.00162): a causal LM that rewrites rejected responses into chosen "
        "ones; use it as the token-level reward `seq2seq:OUT/final`.",
        _seq2seq_rm,
    ),
    "dpo": ("Direct preference optimisation (sigmoid / IPO / conservative / soft labels, cached reference).", _dpo),
    "rloo": ("REINFORCE leave-one-out: k samples per prompt, any reward source, KL to a frozen reference.", _rloo),
    "ppo": ("PPO: per-token rewards and KL, GAE, value model or shared value head, clipped losses, epochs.", _ppo),
    "reinforce": ("REINFORCE with a learned value baseline (RLAIF paper), per-token rewards, KL.", _reinforce),
    "rejection-sampling": (
        "Best-of-N fine-tuning: sample N, keep the best by a reward source, (masked) NLL on the winners.",
        _rejection_sampling,
    ),
    "segments show": (
        "Render responses with their segments, pivots, segment rewards and kept/masked tokens (terminal + HTML).",
        _segments_show,
    ),
    "segments quality": (
        "Precision / recall of negative segments against FactWorld's gold wrong-fact spans.",
        _segments_quality,
    ),
    "label": ("RLAIF: label preference pairs with an LLM (both orders, soft labels, cache, resume).", _label),
    "serve": ("OpenAI-compatible HTTP server (completions, chat, log-probs) for a local HF model dir.", _serve),
    "sample": ("Sample n responses per prompt from a policy (batched, KV cache); writes JSONL.", _sample),
    "pairs": ("Sample k responses per prompt and label every pair with a judge; writes preference JSONL.", _pairs),
    "eval": (
        "Evaluate policies and reward models: with --world, gold win rate, hallucination, retain, length, KL; on any "
        "data, RM pairwise accuracy (--reward_model --pairs_file), mean RM score and win rates judged by "
        "--judge rm:DIR | openai:URL[:MODEL] | local:DIR | callable:module:function.",
        _eval,
    ),
    "collapse predict": (
        "Predicted reward profile (optimum of the ranking objective) for a utility; prints and plots.",
        _collapse_predict,
    ),
    "collapse diagnose": (
        "Reward profiles of a ranking reward model per prompt type vs the prediction; JSON + PNG.",
        _collapse_diagnose,
    ),
    "demo": ("The whole pipeline on FactWorld with a tiny model; writes runs/<name>/report.md.", _demo),
}


def _command_words(argv: list[str]) -> list[str]:
    """The one or two words that name the command ('sft', 'world factworld'), after the global --log-level."""
    words = list(argv)
    while words and words[0].startswith("--log-level"):  # the one global option may come before the command
        words = words[1:] if "=" in words[0] else words[2:]
    return [a for a in words[:2] if not a.startswith("-")]


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, Command | None]:
    parser = argparse.ArgumentParser(
        prog="rlxf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO", help="Python logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    groups: dict[str, argparse._SubParsersAction] = {}
    words = _command_words(argv)
    chosen = " ".join(words)
    selected: Command | None = None
    for name, (help_text, factory) in COMMANDS.items():
        head, _, tail = name.partition(" ")
        is_chosen = chosen == name or (not tail and chosen.split(" ")[0] == name)
        command = factory() if is_chosen else None
        if command is not None and command.pick is not None:
            command = command.pick(argv) or command
        if tail:
            if head not in groups:
                group_parser = sub.add_parser(head, help=f"{head} subcommands")
                groups[head] = group_parser.add_subparsers(dest="subcommand", metavar="<kind>")
            p = groups[head].add_parser(tail, help=help_text, description=help_text)
        else:
            p = sub.add_parser(name, help=help_text, description=help_text)
        if command:
            add_config_arguments(p, command.config_cls)
            selected = command
    return parser, selected


def _one_line(error: BaseException) -> str:
    """The message of a user-facing error; an OSError names its file (PermissionError: 'permission denied: PATH')."""
    if isinstance(error, OSError) and not isinstance(error, UserError) and error.filename is not None:
        reason = (error.strerror or type(error).__name__).lower()
        target = f"{error.filename} -> {error.filename2}" if error.filename2 else str(error.filename)
        return f"{reason}: {target}"
    return str(error) or type(error).__name__


def _unknown_arguments(unknown: list[str], command: Command | None, argv: list[str]) -> int:
    """`rlxf <command>: error: unrecognized arguments` with a "did you mean" per flag (TRL's names included)."""
    words = _command_words(argv)
    subcommand = " ".join(words) if " ".join(words) in COMMANDS else (words[0] if words else "")
    hints = []
    if command is not None:
        for flag in (a for a in unknown if a.startswith("--")):
            if suggestion := suggest_field(flag, command.config_cls):
                hints.append(f"{flag.split('=', 1)[0]} -> --{suggestion}")
    hint = f"; did you mean {', '.join(hints)}?" if hints else ""
    print(
        f"rlxf {subcommand}: error: unrecognized arguments: {' '.join(unknown)}{hint} "
        f"(`rlxf {subcommand} --help` lists every option)",
        file=sys.stderr,
    )
    return 2


def quiet_other_ranks() -> None:
    """In a multi-process launch (torchrun, accelerate launch) only rank 0 logs, warns and shows progress bars, so a
    run prints every line once, not once per process; other ranks still print errors (one process may fail alone)."""
    if os.environ.get("RANK", "0") == "0":
        return
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    os.environ["TQDM_DISABLE"] = "1"  # read by every tqdm bar when it is created
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, command = build_parser(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        return _unknown_arguments(unknown, command, argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_other_ranks()
    if command is None:
        parser.print_help()
        return 2
    try:
        cfg = config_from_args(command.config_cls, args)
        command.run(cfg)
    except (UserError, BackendError, OSError) as e:
        # Bad input, an unreachable server, a path that cannot be read or written: one line the user can act on.
        # Anything else is a bug and keeps its traceback.
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        print(f"rlxf: error: {_one_line(e)}", file=sys.stderr)
        return 2
    from rlxf.engine import end_distributed_run

    end_distributed_run()  # several CPU processes: exits here, past a gloo teardown that can abort at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
