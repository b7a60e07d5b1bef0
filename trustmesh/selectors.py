"""Selectors: ``type:value`` facts about a workload or a node that registration entries match.

Workload selectors come from the kernel on the agent's node (SO_PEERCRED and /proc), never
from what the workload says about itself. Node selectors come from node attestation.
Both sides (the server validating an entry, the agent deriving a caller's selectors) use
this one definition, so an entry can never name a selector the agent would never produce.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from trustmesh.errors import TrustmeshError


class InvalidSelectorError(TrustmeshError, ValueError):
    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        super().__init__(f"invalid selector {text!r}: {reason}")


def _uint(value: str) -> str | None:
    if not value.isdigit() or len(value) > 10 or int(value) > 0xFFFFFFFF:
        return "must be a decimal number from 0 to 4294967295"
    return None


_NAME = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,63}\$?$")


def _name(value: str) -> str | None:
    return None if _NAME.match(value) else "must be a user or group name (letters, digits, '.', '_', '-')"


def _abs_path(value: str) -> str | None:
    if not value.startswith("/") or "\x00" in value or len(value) > 4096:
        return "must be an absolute path"
    return None


def _sha256(value: str) -> str | None:
    return None if re.fullmatch(r"[0-9a-f]{64}", value) else "must be 64 lower-case hex digits"


def _node_name(value: str) -> str | None:
    return (
        None if re.fullmatch(r"[A-Za-z0-9._-]{1,128}", value) else "must be a node name ([A-Za-z0-9._-], at most 128)"
    )


def _any(value: str) -> str | None:
    return None if value and len(value) <= 1024 and "\x00" not in value else "must be 1 to 1024 characters"


# type -> {key -> validator}. A selector is "type:key:value"; the value may contain ':'.
KNOWN: dict[str, dict[str, Callable[[str], str | None]]] = {
    "unix": {"uid": _uint, "gid": _uint, "user": _name, "group": _name, "path": _abs_path, "sha256": _sha256},
    # Node selectors, produced by node attestation on the server.
    "join_token": {"node": _node_name},
    "x509pop": {"subject:cn": _any, "ca:fingerprint": _sha256, "serialnumber": _any},
    "node": {"name": _node_name},
}


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    type: str
    value: str

    @classmethod
    def from_text(cls, text: str) -> Selector:
        """Split the TYPE:VALUE text form, checking nothing else: for carrying a selector to
        whoever checks it (the server audits what it refuses, so a client must not pre-empt it)."""
        if not isinstance(text, str) or ":" not in text:
            raise InvalidSelectorError(str(text), "use TYPE:VALUE, e.g. unix:uid:1000")
        sel_type, value = text.split(":", 1)
        return cls(sel_type, value)

    @classmethod
    def parse(cls, text: str) -> Selector:
        """The selector `text` names, if it is one the kernel can produce; else InvalidSelectorError."""
        selector = cls.from_text(text)
        sel_type, value = selector.type, selector.value
        keys = KNOWN.get(sel_type)
        if keys is None:
            raise InvalidSelectorError(
                text, f"unknown selector type {sel_type!r}; known types: {', '.join(sorted(KNOWN))}"
            )
        for key in sorted(keys, key=len, reverse=True):
            if value.startswith(key + ":"):
                problem = keys[key](value[len(key) + 1 :])
                if problem:
                    raise InvalidSelectorError(text, f"{sel_type}:{key} {problem}")
                return selector
        known = ", ".join(f"{sel_type}:{k}:" for k in sorted(keys))
        raise InvalidSelectorError(text, f"unknown {sel_type} selector; known: {known}")

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def parse_selectors(texts: Iterable[str]) -> tuple[Selector, ...]:
    """Parse, de-duplicate and sort: the canonical form entries are stored and compared in."""
    return tuple(sorted({Selector.parse(t) for t in texts}))


def value_of(selectors: Iterable[Selector | str], kind: str) -> str | None:
    """The value of the first selector of `kind` (e.g. "unix:uid" -> "1000"), for a log line."""
    prefix = kind + ":"
    return next((str(s)[len(prefix) :] for s in selectors if str(s).startswith(prefix)), None)


def matches(required: Iterable[Selector | str], present: Iterable[Selector | str]) -> bool:
    """An entry matches when every one of its selectors is among the caller's (and it has some)."""
    need = {str(s) for s in required}
    return bool(need) and need <= {str(s) for s in present}
