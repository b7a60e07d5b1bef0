"""HTTP routes in allowlists: request paths made unambiguous, path patterns, methods, labels.

An http listener decides each request by its method and path. A path is only safe to match
when the proxy and the service behind it read it the same way, so `normalize_path` gives the
one form the proxy matches and forwards, and refuses (AmbiguousPathError) every path that
servers are known to read differently: encoded slashes, backslashes, path parameters (";"),
control characters, invalid percent-encodings, ".." above the root.

Pure functions, no I/O: the proxy calls them per request, the loader and the wire per rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from trustmesh.clip import SHOWN, clip, shown
from trustmesh.errors import TrustmeshError

MAX_PATH_CHARS = 8192
MAX_METHOD_CHARS = 32
STANDARD_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT")
OTHER_METHOD = "OTHER"  # a route label's method when neither standard nor named by the policy
ANY_PATH = "*"  # a route label's pattern when the matching rule names no paths

_STANDARD = frozenset(STANDARD_METHODS)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset("0123456789abcdefABCDEF")
# RFC 3986 pchar without ";" (see the module docstring) and without "%" (escapes are read apart).
_PCHAR = r"A-Za-z0-9\-._~!$&'()*+,=:@"
_LITERALS = re.compile(rf"[{_PCHAR}/]*")
# The common case, returned as is: no "%", no empty segment but a final one, no dot segment.
_PLAIN = re.compile(rf"/(?:(?!\.\.?(?:/|\Z))[{_PCHAR}]+/)*(?:(?!\.\.?\Z)[{_PCHAR}]+)?")
_METHOD = re.compile(rf"[A-Z][A-Z0-9_-]{{0,{MAX_METHOD_CHARS - 1}}}")


class PolicyError(TrustmeshError, ValueError):
    """A policy document is not valid; the message names the file, document and field."""

    # Defined in this module, the lowest of the package, so that route patterns, methods and
    # model.py (which imports this module and re-exports the class) raise the one class.


class AmbiguousPathError(TrustmeshError):
    """A request path that servers read differently, so no decision about it can be trusted.

    `reason` is one short sentence that never quotes the path: it goes into 400 bodies, logs
    and flow records, and paths can hold account numbers."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# One sentence per kind of refusal; none quotes the path.
NOT_ORIGIN_FORM = "a request path must start with '/'"
TOO_LONG = f"a path longer than {MAX_PATH_CHARS} characters (MAX_PATH_CHARS) is refused"
ENCODED_SLASH = "an encoded slash (%2F) in a path is read differently by different servers"
ENCODED_BACKSLASH = "an encoded backslash (%5C) in a path is read as a slash by some servers"
ENCODED_SEMICOLON = "an encoded ';' (%3B) in a path is read as a path parameter by some servers"
BACKSLASH = "a backslash in a path is read as a slash by some servers"
NUL = "a NUL character in a path ends it early for some servers"
CONTROL = "a control character in a path is refused"
BAD_ESCAPE = "a '%' in a path must start a percent-encoding of two hex digits"
FRAGMENT = "a '#' in a request path is refused: a fragment is never sent to a server"
SEMICOLON = "a ';' in a path starts path parameters, which some servers (e.g. Tomcat) strip"
NOT_ASCII = "a path may hold only ASCII: percent-encode other characters"
NOT_PCHAR = "a path may hold only letters, digits, -._~!$&'()*+,=:@/ and percent-encodings"
ABOVE_ROOT = "the path climbs above the root with '..'"


def _literal_refusal(text: str) -> AmbiguousPathError:
    """Why `text` (literal characters, no escapes) is refused: its first character outside pchar."""
    match = _LITERALS.match(text)
    bad = text[match.end() if match else 0]
    code = ord(bad)
    if bad == "\\":
        return AmbiguousPathError(BACKSLASH)
    if code == 0:
        return AmbiguousPathError(NUL)
    if code < 0x20 or code == 0x7F:
        return AmbiguousPathError(CONTROL)
    if bad == "#":
        return AmbiguousPathError(FRAGMENT)
    if bad == ";":
        return AmbiguousPathError(SEMICOLON)
    if code > 0x7F:
        return AmbiguousPathError(NOT_ASCII)
    return AmbiguousPathError(NOT_PCHAR)


def _check_literals(text: str) -> None:
    if not _LITERALS.fullmatch(text):
        raise _literal_refusal(text)


def _decode(raw: str) -> str:
    """`raw` with unreserved characters decoded and every other escape in upper-case hex;
    refuses escapes that servers decode into separators or control characters."""
    pieces = raw.split("%")
    _check_literals(pieces[0])
    out = [pieces[0]]
    for piece in pieces[1:]:
        digits = piece[:2]
        # Checked against a set: int(..., 16) would also take "+1", " 1" or non-ASCII digits.
        if len(digits) < 2 or digits[0] not in _HEX or digits[1] not in _HEX:
            raise AmbiguousPathError(BAD_ESCAPE)
        byte = int(digits, 16)
        char = chr(byte)
        if char in _UNRESERVED:
            out.append(char)  # %41 is A and %2e is ".": decoded before dot segments are removed
        elif byte == 0x2F:
            raise AmbiguousPathError(ENCODED_SLASH)
        elif byte == 0x5C:
            raise AmbiguousPathError(ENCODED_BACKSLASH)
        elif byte == 0x3B:
            # Servers that decode before they strip path parameters would read "..%3B" as "..".
            raise AmbiguousPathError(ENCODED_SEMICOLON)
        elif byte == 0:
            raise AmbiguousPathError(NUL)
        elif byte < 0x20 or byte == 0x7F:
            raise AmbiguousPathError(CONTROL)
        else:
            out.append("%" + digits.upper())
        rest = piece[2:]
        _check_literals(rest)
        out.append(rest)
    return "".join(out)


def normalize_path(raw: str) -> str:
    """The one form of the path of a request-target (the query already split off) that the
    proxy matches and forwards, or AmbiguousPathError when servers could read it differently.

    Unreserved characters are decoded (%41 -> A, %2e -> .), other escapes upper-cased
    (%c3%a9 -> %C3%A9), repeated slashes collapsed, "." and ".." segments removed (RFC 3986
    §5.2.4; a ".." above the root is refused, never clamped); a trailing slash is kept."""
    if len(raw) > MAX_PATH_CHARS:
        raise AmbiguousPathError(TOO_LONG)
    if _PLAIN.fullmatch(raw):
        return raw  # nearly every request: one regex, no copy
    if not raw.startswith("/"):
        raise AmbiguousPathError(NOT_ORIGIN_FORM)
    if "%" in raw:
        decoded = _decode(raw)
    else:
        _check_literals(raw)
        decoded = raw
    segments = decoded.split("/")
    kept: list[str] = []
    for segment in segments[1:]:
        if segment == "..":
            if not kept:
                raise AmbiguousPathError(ABOVE_ROOT)
            kept.pop()
        elif segment and segment != ".":
            kept.append(segment)
    # "/a/", "/a/." and "/a/b/.." all name the directory /a/: the last segment says so.
    directory = bool(kept) and segments[-1] in ("", ".", "..")
    return "/" + "/".join(kept) + ("/" if directory else "")


@dataclass(frozen=True, slots=True)
class PathPattern:
    """An exact normalised path (`/health`), or a whole-segment prefix (`/transactions/*`
    matches /transactions/x and /transactions/x/y, not /transactions nor /transactionsX;
    `/*` matches every path), as SPIFFE ID prefixes do in model.IdPattern.

    `path` is the exact path, or for a prefix the path up to and with its final "/"
    (`/transactions/` for `/transactions/*`, `/` for `/*`): a "*" matches any rest, even an
    empty one, so /transactions/ is under /transactions/*."""

    path: str
    is_prefix: bool

    @classmethod
    def parse(cls, text: object) -> PathPattern:
        if not isinstance(text, str):
            raise PolicyError(f"{clip(repr(text), SHOWN)} is not a path pattern: use a path such as /health "
                              "or /transactions/*")
        if "?" in text:
            raise PolicyError(f"{shown(text)}: a path pattern has no query ('?'); methods and paths only")
        is_prefix = text.endswith("/*")
        base = text[:-1] if is_prefix else text
        if "*" in base:
            raise PolicyError(f"{shown(text)}: a wildcard is only allowed as a final '/*'")
        try:
            normal = normalize_path(base)
        except AmbiguousPathError as err:
            raise PolicyError(f"{shown(text)} is not a path pattern: {err.reason}") from err
        if normal != base:
            suggestion = normal + "*" if is_prefix else normal
            raise PolicyError(f"{shown(text)} is not a normalised path; write {shown(suggestion)}")
        return cls(base, is_prefix)

    def matches(self, normalized_path: str) -> bool:
        if self.is_prefix:
            return normalized_path.startswith(self.path)
        return normalized_path == self.path

    def __str__(self) -> str:
        return self.path + "*" if self.is_prefix else self.path


def check_method(text: object) -> str:
    """`text` when it is an HTTP method a rule may name, else PolicyError: upper-case letters,
    digits, "-" and "_" (a subset of RFC 9110's token), a letter first, at most 32 characters."""
    if not isinstance(text, str):
        raise PolicyError(f"{clip(repr(text), SHOWN)} is not a method: write a method such as GET")
    if _METHOD.fullmatch(text):
        return text
    if text.isascii() and _METHOD.fullmatch(text.upper()):
        # Methods are case-sensitive (RFC 9110 §9.1): a server answers "get" as an unknown method.
        raise PolicyError(f"{shown(text)} is not a method: methods are case-sensitive; use {text.upper()}")
    raise PolicyError(f"{shown(text)} is not a method: upper-case letters, digits, '-' or '_', a letter first, "
                      f"at most {MAX_METHOD_CHARS} characters (e.g. GET)")


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What a policy decides about one HTTP request; `path` is already normalised (normalize_path)."""

    method: str
    path: str


def route_label(method: str, pattern: str | None, known: frozenset[str] = frozenset()) -> str:
    """The route of a request as metrics and flow records show it: "GET /transactions/*" (the
    pattern of the rule that allowed it, ANY_PATH when that rule names no paths), or the method
    alone ("POST") when no rule matched. Never the request's path, and bounded: a method that is
    neither standard nor in `known` (the policy's methods) is OTHER_METHOD, so a client cannot
    mint new labels."""
    label = method if method in _STANDARD or method in known else OTHER_METHOD
    return label if pattern is None else f"{label} {pattern}"
