"""The `tau2cl` command: one subcommand per job, each with its own parser and lazy imports.

A subcommand is a name in COMMANDS and a function that takes its own arguments and returns an exit
code; adding one (e.g. `report`) is one function and one entry. Heavy libraries are imported inside
the functions so that `tau2cl --help` and `tau2cl train --help` answer at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

from tau2cl.errors import ArgumentParser, run_guarded


@dataclass(frozen=True)
class Command:
    summary: str  # one line in `tau2cl --help`
    run: Callable[[list[str]], int]  # the subcommand's own arguments → exit code


def _train(argv: list[str]) -> int:
    from tau2cl.train import main as train_main

    return train_main(argv, prog="tau2cl train")


def _make_tiny_model(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="tau2cl make-tiny-model",
        description="Build the tiny offline test model (random-init Qwen2 architecture, a tokenizer "
        "trained on tau2 domain text, a chat template with tools) into DIR, deterministically.",
    )
    parser.add_argument("dir", metavar="DIR", help="output folder (created if missing)")
    parser.add_argument(
        "--seed", type=int, default=0, metavar="N", help="seed of the random weights (default: 0)"
    )
    args = parser.parse_args(argv)
    from tau2cl.agent.tiny_model import make_tiny_model

    print(make_tiny_model(args.dir, seed=args.seed))
    return 0


def _report(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="tau2cl report",
        description="Report finished or interrupted runs: the accuracy matrix (rows: before "
        "training, after each domain; '-' where a stage was not reached), ACC/BWT/FWT/forgetting "
        "of the last completed stage, and the plots accuracy_matrix.png and learning_curves.png "
        "(plus report.txt). With several LOG_DIRs, also a comparison table, one row per run, "
        "written as comparison.md.",
    )
    parser.add_argument(
        "log_dirs", nargs="+", metavar="LOG_DIR", help="a run's log_dir (metrics.jsonl, summary.json)"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder. One run: its files go here (default: the LOG_DIR itself). Several "
        "runs: each run's files go to DIR/<name of its LOG_DIR> (default: each LOG_DIR itself) "
        "and comparison.md to DIR (default: the current directory).",
    )
    args = parser.parse_args(argv)
    from tau2cl.reporting.report import run_report

    return run_report(args.log_dirs, args.out)


def _flags(argv: list[str]) -> int:
    parser = ArgumentParser(
        prog="tau2cl flags",
        description="Print every flag of 'tau2cl train' with its default and help; with --markdown, "
        "as the tables of docs/flags.md.",
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables (docs/flags.md)")
    args = parser.parse_args(argv)
    if args.markdown:
        from tau2cl.flag_reference import flags_markdown

        sys.stdout.write(flags_markdown())
    else:
        from tau2cl.config import build_parser

        build_parser().print_help()
    return 0


COMMANDS: dict[str, Command] = {
    "train": Command("train with GRPO across the tau2 domains (see 'tau2cl train --help')", _train),
    "make-tiny-model": Command("build the tiny offline test model into a folder", _make_tiny_model),
    "report": Command("tables, CL measures and plots of finished or interrupted runs", _report),
    "flags": Command("the flag reference of 'tau2cl train' (--markdown: docs/flags.md)", _flags),
}


def _top_parser() -> argparse.ArgumentParser:
    """Only for `tau2cl --help` and for naming a missing or unknown command."""
    parser = ArgumentParser(
        prog="tau2cl",
        description="Continual-learning GRPO training of tool-use agents on tau2-bench.",
        epilog="Run 'tau2cl COMMAND --help' for the flags of a command.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in COMMANDS.items():
        subparsers.add_parser(name, help=command.summary, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand; a UserError ends with one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:
        command, rest = COMMANDS[argv[0]], argv[1:]
        return run_guarded(lambda: command.run(rest))
    return run_guarded(lambda: _parse_and_run(argv))


def _parse_and_run(argv: list[str]) -> int:
    """No command, an unknown one, or --help: the top parser prints help or raises a UserError."""
    args = _top_parser().parse_args(argv)
    return COMMANDS[args.command].run([])
