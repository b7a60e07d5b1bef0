"""The one rule for DNS names that trustmesh puts into certificates.

A DNS name is 1 to 253 ASCII characters of dot-separated labels; each label is 1 to 63
letters, digits and '-', and neither starts nor ends with '-' (RFC 1123 host names). The
leftmost label may instead be exactly ``*``, followed by at least one ordinary label:
``*.ledger.internal`` is a legal X.509 DNS SAN (RFC 6125 section 6.4.3) and covers exactly
one label in its place. Internationalised names are given in their ASCII (``xn--``) form.

The canonical form is lower case without the trailing dot of an absolute name, so
``Ledger.Internal.`` and ``ledger.internal`` are one name. The alphabet is checked before
lower-casing: ``str.lower`` maps some non-ASCII letters (the Kelvin sign) to ASCII ones.
"""

from __future__ import annotations

import re
from typing import Final

from trustmesh.errors import TrustmeshError

MAX_DNS_NAME: Final = 253
_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# Refusals quote the input; hostile input can be megabytes.
_MAX_SHOWN: Final = 96


class InvalidDnsNameError(TrustmeshError, ValueError):
    """A string is not a DNS name by the rule above; ``value`` holds what was given."""

    def __init__(self, value: object) -> None:
        self.value = value
        text = value if isinstance(value, str) else repr(value)
        shown = text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
        super().__init__(
            f"invalid DNS name {shown!r}: use at most {MAX_DNS_NAME} characters of dot-separated "
            "labels of ASCII letters, digits and '-' (a leading '*.' is allowed), e.g. ledger.internal"
        )


def normalize_dns_name(name: object) -> str:
    """The canonical form of ``name`` (lower case, no trailing dot); ``InvalidDnsNameError`` otherwise."""
    if not isinstance(name, str) or not name.isascii():
        raise InvalidDnsNameError(name)
    canonical = name[:-1] if name.endswith(".") else name
    labels = canonical.split(".")
    if labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if not canonical or len(canonical) > MAX_DNS_NAME or not all(_LABEL.fullmatch(label) for label in labels):
        raise InvalidDnsNameError(name)
    return canonical.lower()


def dns_name_covers(pattern: str, name: str) -> bool:
    """True when the canonical ``pattern`` matches the canonical ``name``, wildcards included."""
    if pattern.startswith("*."):
        head, dot, rest = name.partition(".")
        return bool(head and dot) and rest == pattern[2:]
    return pattern == name
