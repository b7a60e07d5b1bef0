"""Flags and YAML config files, derived from the config dataclass and merged one way everywhere.

A command's options are the :func:`trustmesh.options.option` fields of its config dataclass
(``ServerConfig``, ``AgentConfig``): :func:`add_options` turns them into flags and
:func:`load_config` reads them back from the flags and the ``--config`` file into one value of
that dataclass. Precedence: a flag given on the command line wins, then the value in
``--config FILE``, then the dataclass default. Config keys are the flag names without dashes,
with ``-`` or ``_`` between words (``data-dir`` or ``data_dir``). Unknown keys are an error, so a
typo in a config file never silently falls back to a default.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from trustmesh.errors import TrustmeshError
from trustmesh.options import (
    SWITCH,
    ConfigError,
    Option,
    declared,
    flag_name,
    has_default,
    key_name,
    shown_default,
)

__all__ = ["ConfigError", "HelpFormatter", "add_options", "build", "load_config", "load_config_file", "resolve",
           "show_help"]

T = TypeVar("T")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config file, its keys as written."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {err.start}); give a YAML file") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(err)}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    return {str(k): v for k, v in data.items()}


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's message spans lines (with a caret drawing); ours is one: what, and where."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        return f"{err.problem or err.context or 'malformed'}{where}"
    return " ".join(str(err).split())


def add_options(parser: argparse.ArgumentParser, config_class: type[Any]) -> None:
    """One flag per option field of ``config_class`` (dest = the field name), plus ``--config``."""
    file_only = [key_name(f.name) for f, decl in declared(config_class) if not decl.flag]
    parser.add_argument("--config", metavar="FILE", help="YAML file of options (keys are the flag names"
                        + (f"; set only there: {', '.join(file_only)}" if file_only else "") + ")")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f, decl in declared(config_class):
        if not decl.flag:
            continue
        target: Any = parser
        if decl.group:
            target = groups.get(decl.group) or groups.setdefault(decl.group, parser.add_argument_group(decl.group))
        default = shown_default(f)
        shown = " (required)" if not has_default(f) else f" (default {default})" if default is not None else ""
        if decl.parser is SWITCH:
            target.add_argument(flag_name(f.name), dest=f.name, default=None, action="store_const", const=True,
                                help=decl.help)
            continue
        target.add_argument(
            flag_name(f.name), dest=f.name, default=None, action="append" if decl.repeat else "store",
            metavar=decl.shown_metavar, choices=decl.parser.choices,
            help=decl.help + shown,
        )


def _file_values(config_class: type[Any], config_path: str) -> dict[str, Any]:
    """The config file's values by field name, refusing unknown keys and a key given twice."""
    names = {key_name(f.name): f.name for f, _ in declared(config_class)}
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    unknown = []
    for key, value in load_config_file(config_path).items():
        name = names.get(key.replace("_", "-"))
        if name is None:
            unknown.append(key)
        elif name in spelled:
            raise ConfigError(f"config file {config_path}: {key_name(name)} is given twice "
                              f"(as {spelled[name]} and {key})")
        else:
            spelled[name] = key
            out[name] = value
    if unknown:
        hints = [f"{key} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
            key.replace("_", "-"), list(names), n=1)) else key for key in sorted(unknown)]
        raise ConfigError(f"config file {config_path}: unknown option(s) {', '.join(hints)}; "
                          f"known options: {', '.join(sorted(names))}")
    return out


def _parse(decl: Option, where: str, raw: Any) -> Any:
    try:
        if decl.repeat:
            items = raw if isinstance(raw, (list, tuple)) else [raw]
            return tuple(decl.parser.read(item) for item in items)
        return decl.parser.read(raw)
    except ConfigError as err:
        if where.startswith("--"):
            raise
        raise ConfigError(f"{where.rpartition(': ')[0]}: {err}") from err  # it names its key already
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from err


def resolve(config_class: type[Any], args: argparse.Namespace, config_path: str | None) -> dict[str, Any]:
    """The parsed values given by a flag (None means 'not given') or else by the config file.

    Options given nowhere are left out, so that the dataclass supplies its own default. In a
    file, ``null`` means not given, and so does ``false`` (YAML's ``off``) for an option that is
    off by default (``metrics: off``).
    """
    file_values = _file_values(config_class, config_path) if config_path else {}
    out: dict[str, Any] = {}
    for f, decl in declared(config_class):
        given = getattr(args, f.name, None) if decl.flag else None
        in_file = file_values.get(f.name)
        if given is not None:
            out[f.name] = _parse(decl, flag_name(f.name), given)
        elif in_file is not None and not (in_file is False and f.default is None):
            out[f.name] = _parse(decl, f"config file {config_path}: {key_name(f.name)}", in_file)
    return out


def build(config_class: type[T], values: Mapping[str, Any]) -> T:
    """The config value; a required option that is missing is a ConfigError naming its flag."""
    for f, decl in declared(config_class):
        if not has_default(f) and not values.get(f.name):
            raise ConfigError(decl.required or f"{flag_name(f.name)} is required")
    return config_class(**values)


def load_config(config_class: type[T], args: argparse.Namespace) -> T:
    """Flags over ``--config FILE`` over defaults, as one value of ``config_class``."""
    return build(config_class, resolve(config_class, args, getattr(args, "config", None)))


class HelpFormatter(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions to the terminal; keeps text laid out in lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def show_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """The action of a command group run without a subcommand: its help, and exit status 2."""

    def action(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return action


def invalid_as(code: int, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """`run` for a command whose exit codes mean something to a pipeline (0 pass, 1 fail): any
    error (a bad file, no server) becomes one line and `code`, never a pass or a fail."""

    def action(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except TrustmeshError as err:
            print(f"trustmesh: error: {err}", file=sys.stderr)
            return code

    return action
