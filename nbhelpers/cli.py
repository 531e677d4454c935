"""``python -m nbhelpers {train, sample, passk, plot, monitor, eval, batch}``.

Configuration precedence for train / sample / eval: parameters files (``--params``, in order, short
names like ``smoke`` or ``nsr`` allowed) < explicit flags (``--mode`` ...) < ``--set key=value``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from .config import ConfigError, RunConfig, load_config, resolve_parameter_file

# flag -> config key, for the flags the seeds' users know
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


def add_config_arguments(parser: argparse.ArgumentParser, flags: dict) -> None:
    parser.add_argument("--params", action="append", default=[], metavar="FILE",
                        help="YAML parameters file or short name (smoke, nsr, colab-a100, ...); repeatable, "
                             "later files win")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one configuration key; repeatable; wins over everything")
    for flag, (key, kind) in flags.items():
        parser.add_argument(flag, dest=key, type=kind, default=None, help=f"config key '{key}'")


def config_from_args(args: argparse.Namespace, flags: dict) -> RunConfig:
    """Build the RunConfig: files, then flags, then --set; errors name the key and its source."""
    files = [resolve_parameter_file(p) for p in args.params]
    explicit = {key: getattr(args, key) for key, _ in flags.values() if getattr(args, key, None) is not None}
    if getattr(args, "disable_gradient_checkpointing", False):
        explicit["gradient_checkpointing"] = False
    return load_config(files, args.set, override_source="--set", flags=explicit)


# ------------------------------------------------------------------------------------------ commands
def _train_parser(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, TRAIN_FLAGS)
    p.add_argument("--disable-gradient-checkpointing", action="store_true",
                   help="turn gradient checkpointing off (faster, more memory)")


def _run_train(args: argparse.Namespace) -> int:
    from .trainer import train

    cfg = config_from_args(args, TRAIN_FLAGS)
    run_dir = train(cfg)
    print(f"run folder: {run_dir}")
    return 0


def _sample_parser(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, SAMPLE_FLAGS)
    p.add_argument("--checkpoint", default=None, help="checkpoint or adapter folder (default: the base model)")
    p.add_argument("--out", required=True, help="samples file (JSON Lines); an existing one is resumed")
    p.add_argument("--method-name", default=None, help="label stored in each record's meta")


def _run_sample(args: argparse.Namespace) -> int:
    from .sampling import sample_to_file

    cfg = config_from_args(args, SAMPLE_FLAGS)
    sample_to_file(cfg, args.out, checkpoint=args.checkpoint, method=args.method_name)
    return 0


def _eval_parser(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, {"--vlm-name": ("vlm_name", str), "--max-problems": ("max_problems", int)})
    p.add_argument("--checkpoint", default=None, help="checkpoint or adapter folder (default: the base model)")
    p.add_argument("--datasets", nargs="+", required=True, help="registered evaluation datasets")
    p.add_argument("--out", required=True, help="accuracy JSON file")


def _run_eval(args: argparse.Namespace) -> int:
    from .sampling import evaluate_accuracy

    cfg = config_from_args(args, {"--vlm-name": ("vlm_name", str), "--max-problems": ("max_problems", int)})
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nbhelpers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, factory) in COMMANDS.items():
        add_arguments, run = factory()
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


# Commands whose ValueErrors are about their input files (they name the file and line): no traceback.
FILE_COMMANDS = ("passk", "plot", "monitor")


def main(argv: list[str] | None = None) -> int:
    from .data import DatasetFormatError

    parser = build_parser()
    args = parser.parse_args(argv)
    expected = (ConfigError, DatasetFormatError, FileNotFoundError)
    if args.command in FILE_COMMANDS:
        expected += (ValueError,)
    try:
        return int(args._run(args) or 0)
    except expected as exc:
        kind = "configuration error" if isinstance(exc, ConfigError) else "error"
        print(f"{kind}: {exc}", file=sys.stderr)
        return 2
