"""Node labels: key=value facts about an attested node that only the control plane sets.

Labels say where a node is (zone=cde, region=eu-west): an operator sets them
(`trustmesh agent label`), or the server derives them from the attestation evidence. A node
never states its own labels, so a workload cannot claim a zone by configuring its agent.

Syntax follows Kubernetes labels, so operators need learn nothing new:
  key    [prefix/]name: name is 1..63 of [a-z0-9] with inner [-a-z0-9_.]; the optional
         prefix is a DNS name of at most 253 characters (lower case)
  value  0..63 of [A-Za-z0-9_.-], beginning and ending with an alphanumeric when not empty
The key `attestation` is reserved: the server gives every node attestation=join_token|x509pop
(see `effective_labels`), and no operator may change what it says.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

RESERVED_KEYS = frozenset({"attestation"})

_NAME = re.compile(r"[a-z0-9]([-a-z0-9_.]*[a-z0-9])?")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")


class LabelError(ValueError):
    """A label key, value or assignment that is not valid; the message is one actionable line."""


def check_key(key: str, *, allow_reserved: bool = False) -> str:
    prefix, slash, name = key.rpartition("/")
    if not slash:
        prefix, name = "", key
    if not name or len(name) > 63 or not _NAME.fullmatch(name):
        raise LabelError(
            f"label key {key!r}: the name must be 1-63 characters of a-z, 0-9, '-', '_', '.', "
            "beginning and ending with a letter or digit")
    if slash:
        if not prefix or len(prefix) > 253 or not all(_DNS_LABEL.fullmatch(p) and len(p) <= 63
                                                      for p in prefix.split(".")):
            raise LabelError(f"label key {key!r}: the prefix before '/' must be a lower-case DNS name")
    if key in RESERVED_KEYS and not allow_reserved:
        raise LabelError(f"label key {key!r} is reserved: the server sets it at attestation")
    return key


def check_value(key: str, value: str) -> str:
    if len(value) > 63 or not _VALUE.fullmatch(value):
        raise LabelError(
            f"label {key}={value!r}: the value must be at most 63 characters of A-Z, a-z, 0-9, "
            "'-', '_', '.', beginning and ending with a letter or digit")
    return value


def parse_assignment(text: str, *, allow_reserved: bool = False) -> tuple[str, str]:
    """`key=value` as given on a command line, checked."""
    key, eq, value = text.partition("=")
    if not eq:
        raise LabelError(f"label {text!r} has no '=': write key=value (e.g. zone=cde)")
    return check_key(key, allow_reserved=allow_reserved), check_value(key, value)


def parse_assignments(texts: Iterable[str], *, allow_reserved: bool = False) -> dict[str, str]:
    """Several `key=value`; naming one key twice with different values is a mistake."""
    out: dict[str, str] = {}
    for text in texts:
        key, value = parse_assignment(text, allow_reserved=allow_reserved)
        if out.get(key, value) != value:
            raise LabelError(f"label key {key!r} is given twice ({out[key]!r} and {value!r}); give it once")
        out[key] = value
    return out


def check_labels(labels: Mapping[str, str], *, allow_reserved: bool = False) -> dict[str, str]:
    return {check_key(k, allow_reserved=allow_reserved): check_value(k, v) for k, v in labels.items()}


def effective_labels(labels: Mapping[str, str], attestation_type: str) -> dict[str, str]:
    """What selectors match against: the stored labels and the server's attestation label,
    which always wins (a stored `attestation` key, which validation refuses, is ignored)."""
    out = {k: v for k, v in labels.items() if k not in RESERVED_KEYS}
    if attestation_type:
        out["attestation"] = attestation_type
    return out


def matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A node selector matches when the node has every one of its key=value pairs."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def format_labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


# --- labels from x509pop node certificates ---------------------------------------------------

# The subject attributes a mapping may name (RFC 4514 short names).
SUBJECT_ATTRIBUTES = ("CN", "O", "OU", "L", "ST", "C", "serialNumber")


@dataclass(frozen=True)
class CertLabel:
    """`--x509pop-label KEY=subject:ATTR` or `KEY=san-uri-prefix:PREFIX`: the label KEY of an
    x509pop node is the value of its certificate's first ATTR subject attribute, or what
    follows PREFIX in its first SAN URI that starts with PREFIX."""

    key: str
    source: str  # "subject" or "san-uri-prefix"
    argument: str  # the attribute name, or the URI prefix


def parse_cert_label(text: str) -> CertLabel:
    key, eq, rule = text.partition("=")
    if not eq:
        raise LabelError(f"{text!r}: write KEY=subject:ATTR or KEY=san-uri-prefix:PREFIX (e.g. zone=subject:OU)")
    check_key(key)
    source, colon, argument = rule.partition(":")
    if source == "subject" and colon and argument in SUBJECT_ATTRIBUTES:
        return CertLabel(key, source, argument)
    if source == "san-uri-prefix" and colon and argument:
        return CertLabel(key, source, argument)
    raise LabelError(f"{text!r}: the source must be subject:ATTR (ATTR one of {', '.join(SUBJECT_ATTRIBUTES)}) "
                     "or san-uri-prefix:PREFIX")
