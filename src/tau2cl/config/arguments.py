"""The `tau2cl train` command line: one flag per GRPOConfig field, `--config` files, and the parse.

Values are taken in this order, each overriding the one before: the defaults, a `--config` file,
the flags actually given. Only light stdlib modules are imported, so `tau2cl train --help` is instant.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

from tau2cl.config.schema import GROUPS, GRPOConfig, field_names, field_type, list_item_type
from tau2cl.errors import ArgumentParser, UserError


def build_parser(prog: str = "tau2cl train") -> argparse.ArgumentParser:
    """The `train` parser: one flag per field, grouped; only flags actually given are returned."""
    parser = ArgumentParser(
        prog=prog,
        usage="%(prog)s [--config FILE] [--FIELD VALUE ...]",
        description="Train a tool-use agent with GRPO on the tau2-bench domains, one domain after "
        "another, with a continual-learning strategy. Flags given on the command line override "
        "values from --config.",
        argument_default=argparse.SUPPRESS,  # so a flag's presence means the user gave it
        allow_abbrev=False,  # flags are spelled out in full, so scripts keep working as fields grow
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML (.yaml/.yml) or JSON (.json) file: a mapping of field names to values.",
    )
    groups = {name: parser.add_argument_group(name, about) for name, about in GROUPS.items()}
    for f in fields(GRPOConfig):
        _add_field_argument(groups[f.metadata["group"]], f)
    return parser


def _add_field_argument(group: Any, f: Any) -> None:
    base, _ = field_type(f.name)
    default = f.default_factory() if base is list else f.default
    shown = "none" if default is None else " ".join(map(str, default)) if base is list else default
    help_text = f"{f.metadata['help']} (default: {shown})".replace("%", "%%")
    flag = f"--{f.name}"
    if base is bool:  # --flag / --no-flag, spelled with the field name
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
    elif base is list:
        metavar = "X" if list_item_type(f.name) is float else "NAME"
        group.add_argument(flag, nargs="+", metavar=metavar, help=help_text)
    else:
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else _METAVARS[base]
        group.add_argument(flag, metavar=metavar, help=help_text)


_METAVARS = {int: "N", float: "X", str: "STR"}


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Field values from a YAML or JSON file (chosen by suffix); unknown keys are a UserError."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise UserError(f"config file {path} must end in .yaml, .yml or .json.")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(f"cannot read config file {path}: {error.strerror or error}.") from None
    except UnicodeDecodeError as error:
        raise UserError(f"config file {path} is not UTF-8 text (byte {error.start} cannot be read).") from None
    values = _parse_config_text(path, text, suffix)
    if values is None:  # an empty file sets nothing
        return {}
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must hold a mapping of field names to values.")
    unknown = sorted(set(map(str, values)) - set(field_names()))
    if unknown:
        raise UserError(
            f"config file {path} has unknown key(s) {', '.join(map(repr, unknown))}; "
            "use the flag names of 'tau2cl train --help' without the dashes."
        )
    return values


def _parse_config_text(path: Path, text: str, suffix: str) -> Any:
    if suffix == ".json":
        try:
            return json.loads(text) if text.strip() else None
        except json.JSONDecodeError as error:
            raise UserError(f"config file {path} is not valid JSON: {error}.") from None
    import yaml  # only needed when a YAML config is given

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {path} is not valid YAML{line}.") from None


_NUMBER = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _join_negative_numbers(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--flag -1e-5` → `--flag=-1e-5`, so argparse reads a negative number as the flag's value."""
    takes_value = {
        flag for action in parser._actions if action.nargs is None and not isinstance(action, argparse.BooleanOptionalAction)
        for flag in action.option_strings
    }
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in takes_value and i + 1 < len(argv) and _NUMBER.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _unknown_flag_message(parser: argparse.ArgumentParser, unknown: list[str], prog: str) -> str:
    """`unrecognized arguments: --learnig_rate 1e-5; the closest flag is --learning_rate.` (one sentence)."""
    import difflib

    flags = [f for action in parser._actions for f in action.option_strings]
    first = unknown[0].split("=", 1)[0]
    close = difflib.get_close_matches(first, flags, n=1, cutoff=0.6) if first.startswith("-") else []
    hint = f"; the closest flag is {close[0]}." if close else f" (see '{prog} --help')."
    return f"unrecognized arguments: {' '.join(unknown)}{hint}"


def parse_config(argv: list[str] | None = None, prog: str = "tau2cl train") -> GRPOConfig:
    """Defaults, then --config file values, then explicit flags, then validation."""
    parser = build_parser(prog)
    argv = _join_negative_numbers(parser, sys.argv[1:] if argv is None else list(argv))
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        raise UserError(_unknown_flag_message(parser, unknown, prog))
    given = vars(known)
    values = load_config_file(given.pop("config")) if "config" in given else {}
    values.update(given)
    return GRPOConfig.from_dict(values)
