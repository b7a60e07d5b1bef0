"""Options declared once, on the config dataclass that they fill.

A field of ``ServerConfig`` or ``AgentConfig`` is declared with :func:`option`: its help text,
how a value is read (:class:`Parser`), and its default. The field's name is the option's one
name: ``prune_agents_after`` is the flag ``--prune-agents-after`` and the config-file key
``prune-agents-after`` (``prune_agents_after`` is read as the same key). The command-line
parser and the config-file loader are derived from these declarations by ``trustmesh.cli.config``,
so an option cannot exist in one place and be missing, or named differently, in another.

This module is kernel code: the config dataclasses of both sides import it, and it imports
neither side and no argparse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from trustmesh.duration import format_duration, parse_duration
from trustmesh.errors import InvalidSpiffeIdError, TrustmeshError
from trustmesh.hostport import split_host_port
from trustmesh.spiffeid import TrustDomain

_OPTION = "trustmesh.option"
_INTERNAL = "trustmesh.internal"


class ConfigError(TrustmeshError):
    """A config file or flag value is wrong."""


@dataclass(frozen=True)
class Parser:
    """How one value of an option is read, from a flag (a string) or a config file (any YAML value).

    ``read`` raises ValueError with a message that says what is accepted; the loader prefixes
    the flag name. A ConfigError it raises is passed on unchanged (it already names its place).
    """

    metavar: str
    read: Callable[[Any], Any]
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Option:
    """The declaration of one option, kept in its dataclass field's metadata."""

    help: str
    parser: Parser
    repeat: bool = False  # the flag may be given several times; the file takes a list (or one value)
    flag: bool = True  # False: set in the config file only (structured values such as `services:`)
    required: str | None = None  # the message when a field without a default is not given
    group: str | None = None  # a heading that gathers related flags in --help
    metavar: str | None = None  # the value's name in --help, when the parser's is too vague

    @property
    def shown_metavar(self) -> str:
        return self.metavar or self.parser.metavar


def option(help: str, parser: Parser, *, default: Any = dataclasses.MISSING,
           default_factory: Any = dataclasses.MISSING, repeat: bool = False, flag: bool = True,
           required: str | None = None, group: str | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that is also a server or agent option."""
    decl = Option(help=help, parser=parser, repeat=repeat, flag=flag, required=required, group=group,
                  metavar=metavar)
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_OPTION: decl})


def internal(why: str, *, default: Any = dataclasses.MISSING, default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field that is deliberately not an option (set by code and tests, never by users)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={_INTERNAL: why})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def key_name(field_name: str) -> str:
    """The config-file key; files may spell it with ``-`` (as the flag) or ``_`` (as the field)."""
    return field_name.replace("_", "-")


def declared(cls: type[Any]) -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """The option fields of a config dataclass, in declaration order."""
    for f in dataclasses.fields(cls):
        decl = f.metadata.get(_OPTION)
        if isinstance(decl, Option):
            yield f, decl


def is_internal(f: dataclasses.Field[Any]) -> bool:
    return _INTERNAL in f.metadata


def has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def shown_default(f: dataclasses.Field[Any]) -> str | None:
    """The default as a user would type it, for --help; None when the help text says it instead."""
    value = f.default
    if value is dataclasses.MISSING or value is None or value == ():
        return None
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, Path) and not value.is_absolute():
        return f"./{value}"
    return str(value)


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise ValueError(f"expected one value, got {value!r}")
    return str(value)


def _duration(value: Any) -> timedelta:
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"invalid duration {value!r}: use a number with a unit, e.g. 90s, 5m, 1h, 1h30m, 7d")
    return parse_duration(value)


def _host_port(value: Any) -> str:
    text = _scalar(value).strip()
    split_host_port(text)
    return text


def _listen_address(value: Any) -> str:
    text = _scalar(value).strip()
    split_host_port(text, listening=True)
    return text


def _path(value: Any) -> Path:
    text = _scalar(value)
    if not text:
        raise ValueError("empty path")
    return Path(text).expanduser()


def _trust_domain(value: Any) -> TrustDomain:
    text = _scalar(value)
    try:
        return TrustDomain.parse(text)
    except InvalidSpiffeIdError as err:
        raise ValueError(f"invalid trust domain {text!r}: {err.reason}") from err


def _count(value: Any) -> int:
    text = _scalar(value).strip()
    if not text.isdigit():
        raise ValueError(f"{text!r}: give 0 or a positive whole number")
    return int(text)


TEXT = Parser("TEXT", _scalar)
COUNT = Parser("N", _count)
DURATION = Parser("DURATION", _duration)
HOST_PORT = Parser("HOST:PORT", _host_port)  # an address to connect to: its host and real port
LISTEN_ADDRESS = Parser("HOST:PORT", _listen_address)  # to listen on: `:PORT` is every interface, port 0 any free one
PATH = Parser("PATH", _path)
TRUST_DOMAIN = Parser("TRUST_DOMAIN", _trust_domain)


def _switch(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = _scalar(value).lower()
    if text in ("on", "true", "yes"):
        return True
    if text in ("off", "false", "no"):
        return False
    raise ValueError(f"{text!r}: use true or false")


# An on/off option: a bare flag on the command line (`--pkcs11-signing-ca`), true/false in a file.
SWITCH = Parser("", _switch)


def one_of(*choices: str) -> Parser:
    """An enumerated option: one of ``choices``."""

    def read(value: Any) -> str:
        text = _scalar(value)
        if text not in choices:
            raise ValueError(f"{text!r}: use {' or '.join(choices)}")
        return text

    return Parser("|".join(choices), read, choices)
