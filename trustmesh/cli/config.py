"""Flags and YAML config files, merged one way everywhere.

Precedence: a flag given on the command line wins, then the value in ``--config FILE``,
then the built-in default. Config keys are the flag names without dashes, with ``_`` or
``-`` between words (``data_dir`` or ``data-dir``). Unknown keys are an error, so a typo in a
config file never silently falls back to a default.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from trustmesh.errors import TrustmeshError


class ConfigError(TrustmeshError):
    """A config file or flag value is wrong."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of option: value")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def resolve(args: argparse.Namespace, defaults: dict[str, Any], config_path: str | None) -> dict[str, Any]:
    """Merge flags (None means 'not given'), the config file and defaults into one dict."""
    file_values = load_config_file(config_path) if config_path else {}
    unknown = sorted(set(file_values) - set(defaults))
    if unknown:
        known = ", ".join(sorted(k.replace("_", "-") for k in defaults))
        raise ConfigError(
            f"config file {config_path}: unknown option(s) {', '.join(unknown)}; known options: {known}"
        )
    merged: dict[str, Any] = {}
    for key, default in defaults.items():
        flag = getattr(args, key, None)
        if flag is not None:
            merged[key] = flag
        elif key in file_values:
            merged[key] = file_values[key]
        else:
            merged[key] = default
    return merged


def show_help(parser: argparse.ArgumentParser) -> Callable[[argparse.Namespace], int]:
    """The action of a command group run without a subcommand: its help, and exit status 2."""

    def action(_args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    return action
