"""The command line, ``python -m nbhelpers COMMAND``.

Every input (configuration keys, model and dataset names, checkpoint folders, samples files) is
checked before torch, transformers or TRL are imported; a bad one stops with one line naming the
key, flag, file or line, and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable

from .config import (MODES, ConfigError, RunConfig, describe, field_help, load_config, parameter_names,
                     resolve_parameter_file)
from .errors import InputError
from .registry import DATASET_NAMES, MODEL_REGISTRY, check_dataset_names, check_names, resolve_model

DESCRIPTION = """\
Train, sample, score and compare chartrl runs.

Configuration of train, sample and eval, later sources winning: --preset, then --platform, then
each --params file in order, then the flags named after configuration keys (--mode, --seed, ...),
then each --set key=value.
"""

# flag -> (config key, type), for the flags the seeds' users know
TRAIN_FLAGS = {
    "--mode": ("mode", str), "--vlm-name": ("vlm_name", str), "--dataset-name": ("dataset_name", str),
    "--seed": ("seed", int), "--subset-size": ("subset_size", int), "--num-epochs": ("num_epochs", float),
    "--num-generations": ("num_generations", int), "--batch-size": ("batch_size", int),
    "--lambda-psr": ("lambda_psr", float), "--reward-threshold": ("reward_threshold", float),
    "--max-steps": ("max_steps", int), "--output-root": ("output_root", str),
}
SAMPLE_FLAGS = {
    "--eval-dataset": ("eval_dataset", str), "--n-samples": ("n_samples", int),
    "--max-problems": ("max_problems", int), "--seed": ("seed", int), "--vlm-name": ("vlm_name", str),
}
EVAL_FLAGS = {"--vlm-name": ("vlm_name", str), "--max-problems": ("max_problems", int)}
# The fixed set of values of a key (vlm_name: or a folder), shown in its flag's help.
KEY_CHOICES = {"mode": MODES, "dataset_name": DATASET_NAMES, "eval_dataset": DATASET_NAMES,
               "vlm_name": tuple(MODEL_REGISTRY)}


def flag_help(key: str) -> str:
    """The key's documentation, then its registered values where the documentation does not list them all."""
    text = field_help(key)
    names = KEY_CHOICES.get(key, ())
    if names and not all(name in text for name in names):
        text += f" Registered: {', '.join(names)}."
    return _help(text)


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help with %


def add_config_arguments(parser: argparse.ArgumentParser, flags: dict) -> None:
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help=_help(f"preset: {', '.join(parameter_names('presets'))}, or a YAML file"))
    parser.add_argument("--platform", default=None, metavar="NAME",
                        help=_help(f"platform file: {', '.join(parameter_names('platforms'))}, or a YAML file "
                                   "(default: none)"))
    parser.add_argument("--params", action="append", default=[], metavar="FILE",
                        help="YAML parameters file or short name (smoke, nsr, colab-a100, ...); repeatable, "
                             "later files win")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one configuration key; repeatable; wins over everything")
    for flag, (key, kind) in flags.items():
        parser.add_argument(flag, dest=key, type=kind, default=None, metavar=key.upper(), help=flag_help(key))


def config_from_args(args: argparse.Namespace, flags: dict) -> RunConfig:
    """The RunConfig of the command, its names checked: files, then flags, then --set; errors name the
    key and its source."""
    named = [("presets", "--preset", args.preset), ("platforms", "--platform", args.platform)]
    files = [resolve_parameter_file(name, kind, flag) for kind, flag, name in named if name is not None]
    files += [resolve_parameter_file(p) for p in args.params]
    explicit = {key: getattr(args, key) for key, _ in flags.values() if getattr(args, key, None) is not None}
    if getattr(args, "disable_gradient_checkpointing", False):
        explicit["gradient_checkpointing"] = False
    cfg = load_config(files, args.set, override_source="--set", flags=explicit)
    check_names(cfg)
    return cfg


def check_checkpoint(checkpoint: str | None) -> None:
    """``--checkpoint``: an existing model or adapter folder (InputError naming the flag)."""
    if checkpoint is None:
        return
    if not Path(checkpoint).expanduser().is_dir():
        raise InputError(f"--checkpoint: no such folder: {checkpoint}")
    resolve_model(checkpoint, key="--checkpoint")


# ------------------------------------------------------------------------------------------ commands
def _train_parser(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TRAIN_FLAGS)
    p.add_argument("--disable-gradient-checkpointing", action="store_true",
                   help="turn gradient checkpointing off (faster, more memory)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the training path (rollout engine, dtypes, DeepSpeed, processes), the resolved "
                        "configuration and the step estimate, then exit without loading a model or data")


def dry_run(cfg: RunConfig) -> str:
    """What ``train --dry-run`` prints: the training path line, the resolved configuration, the step estimate."""
    from .params import training_estimate
    from .platform import resolve_training_path

    return "\n".join([resolve_training_path(cfg).line(), describe(cfg), f"Estimate: {training_estimate(cfg)}"])


def _run_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, TRAIN_FLAGS)
    if args.dry_run:
        print(dry_run(cfg))
        return 0
    from .training_run import train  # torch and TRL: only once the configuration is valid

    run_dir = train(cfg)
    print(f"run folder: {run_dir}")
    return 0


def _sample_parser(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, SAMPLE_FLAGS)
    p.add_argument("--checkpoint", default=None, help="checkpoint or adapter folder (default: the base model)")
    p.add_argument("--out", required=True, help="samples file (JSON Lines); an existing one is resumed")
    p.add_argument("--method-name", default=None, help="label stored in each record's meta")


def _run_sample(args: argparse.Namespace) -> int:
    from .passk import check_resumable_samples

    cfg = config_from_args(args, SAMPLE_FLAGS)
    check_checkpoint(args.checkpoint)
    check_resumable_samples(args.out)
    from .sampling import sample_to_file

    sample_to_file(cfg, args.out, checkpoint=args.checkpoint, method=args.method_name)
    return 0


def _eval_parser(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, EVAL_FLAGS)
    p.add_argument("--checkpoint", default=None, help="checkpoint or adapter folder (default: the base model)")
    p.add_argument("--datasets", nargs="+", required=True, metavar="DATASET",
                   help=f"evaluation datasets, out of: {', '.join(DATASET_NAMES)}")
    p.add_argument("--out", required=True, help="accuracy JSON file")


def _run_eval(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, EVAL_FLAGS)
    check_dataset_names(args.datasets, "--datasets")
    check_checkpoint(args.checkpoint)
    from .sampling import evaluate_accuracy

    evaluate_accuracy(cfg, args.datasets, args.out, checkpoint=args.checkpoint)
    return 0


def _module_command(module: str) -> tuple[Callable, Callable]:
    mod = importlib.import_module(f"nbhelpers.{module}")
    return mod.add_cli_arguments, mod.run_from_cli


COMMANDS: dict[str, tuple[str, Callable[[], tuple[Callable, Callable]]]] = {
    "train": ("train one run (resumes from the newest complete checkpoint)", lambda: (_train_parser, _run_train)),
    "sample": ("draw n samples per problem into a samples file (resumable)", lambda: (_sample_parser, _run_sample)),
    "passk": ("Pass@k table and results file from a samples file", lambda: _module_command("passk")),
    "plot": ("figures from results files", lambda: _module_command("plots")),
    "monitor": ("summaries and curves of training runs", lambda: _module_command("monitor")),
    "eval": ("accuracy with the relaxed metric on evaluation sets", lambda: (_eval_parser, _run_eval)),
    "batch": ("all modes through the notebooks with papermill, then Pass@k", lambda: _module_command("batch")),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with every command's arguments, or only ``command``'s (so that running one command
    imports no other command's module)."""
    parser = argparse.ArgumentParser(prog="python -m nbhelpers", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, factory) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is None or name == command:
            add_arguments, run = factory()
            add_arguments(p)
            p.set_defaults(_run=run)
    return parser


# Commands whose ValueErrors are about their input files (they name the file and line): no traceback.
FILE_COMMANDS = ("passk", "plot", "monitor")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    expected: tuple[type[BaseException], ...] = (InputError, FileNotFoundError)
    if args.command in FILE_COMMANDS:
        expected += (ValueError,)
    try:
        return int(args._run(args) or 0)
    except expected as exc:
        kind = "configuration error" if isinstance(exc, ConfigError) else "error"
        print(f"{kind}: {exc}", file=sys.stderr)
        return 2
