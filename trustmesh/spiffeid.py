"""SPIFFE IDs and trust domains, parsed and validated exactly as the SPIFFE ID standard says.

A SPIFFE ID is ``spiffe://<trust domain><path>``:

* the scheme is exactly ``spiffe`` (lower case), followed by ``://``;
* the trust domain is non-empty and uses only ``a-z 0-9 . - _`` (no upper case, no port,
  no userinfo, no percent-encoding);
* the path is empty or a sequence of ``/segment`` where each segment is non-empty, is not
  ``.`` or ``..`` and uses only ``A-Z a-z 0-9 . - _``; there is no trailing slash;
* there is no query and no fragment; the whole ID is at most 2048 bytes.

Each rule is a small function that raises ``InvalidSpiffeIdError`` carrying the bad input,
so a person reading the error knows which rule was broken.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.errors import InvalidSpiffeIdError

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-_")
_PATH_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _check_trust_domain_name(name: str, original: str) -> None:
    if not name:
        raise InvalidSpiffeIdError(original, "trust domain is missing")
    if len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeIdError(
            original, f"trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
        )
    for ch in name:
        if ch in _TD_CHARS:
            continue
        if ch == ":":
            raise InvalidSpiffeIdError(original, "trust domain must not contain a port")
        if ch == "@":
            raise InvalidSpiffeIdError(original, "trust domain must not contain userinfo")
        if ch == "%":
            raise InvalidSpiffeIdError(original, "percent-encoded characters are not allowed")
        if "A" <= ch <= "Z":
            raise InvalidSpiffeIdError(original, "trust domain must be lower case")
        raise InvalidSpiffeIdError(
            original,
            f"trust domain character {ch!r} is not allowed "
            "(only lower-case letters, digits, '.', '-' and '_')",
        )


def _check_path(path: str, original: str) -> None:
    if not path:
        return
    if not path.startswith("/"):
        raise InvalidSpiffeIdError(original, "path must start with '/'")
    if path.endswith("/"):
        raise InvalidSpiffeIdError(original, "path must not end with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            raise InvalidSpiffeIdError(original, "path must not contain empty segments ('//')")
        if segment in (".", ".."):
            raise InvalidSpiffeIdError(original, "path must not contain '.' or '..' segments")
        for ch in segment:
            if ch in _PATH_CHARS:
                continue
            if ch == "?":
                raise InvalidSpiffeIdError(original, "a query ('?') is not allowed")
            if ch == "#":
                raise InvalidSpiffeIdError(original, "a fragment ('#') is not allowed")
            if ch == "%":
                raise InvalidSpiffeIdError(original, "percent-encoded characters are not allowed")
            raise InvalidSpiffeIdError(
                original,
                f"path character {ch!r} is not allowed "
                "(only letters, digits, '.', '-' and '_')",
            )


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain name such as ``example.org``."""

    name: str

    def __post_init__(self) -> None:
        _check_trust_domain_name(self.name, self.name)

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a bare trust domain name, or take the trust domain of a SPIFFE ID."""
        if "://" in text:
            return SpiffeId.parse(text).trust_domain
        return cls(text)

    @property
    def id(self) -> SpiffeId:
        """The SPIFFE ID of the trust domain itself: ``spiffe://<name>`` (no path)."""
        return SpiffeId(self, "")

    def spiffe_id(self, path: str) -> SpiffeId:
        """A SPIFFE ID in this trust domain; ``path`` must start with '/'."""
        return SpiffeId(self, path)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A validated SPIFFE ID. Frozen and hashable; equal only to another ``SpiffeId``."""

    trust_domain: TrustDomain
    path: str

    def __post_init__(self) -> None:
        _check_path(self.path, str(self))
        if len(str(self).encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeIdError(str(self), f"longer than {MAX_ID_BYTES} bytes")

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        if not isinstance(text, str):
            raise InvalidSpiffeIdError(repr(text), "not a string")
        if not text:
            raise InvalidSpiffeIdError(text, "empty")
        if len(text.encode()) > MAX_ID_BYTES:
            raise InvalidSpiffeIdError(text, f"longer than {MAX_ID_BYTES} bytes")
        if not text.startswith(SCHEME_PREFIX):
            if text.lower().startswith(SCHEME_PREFIX):
                raise InvalidSpiffeIdError(text, "scheme must be lower-case 'spiffe'")
            raise InvalidSpiffeIdError(text, "scheme must be 'spiffe://'")
        rest = text[len(SCHEME_PREFIX):]
        # The trust domain ends at the first '/'; a '?' or '#' there is a query or fragment.
        cut = len(rest)
        for sep in "/?#":
            pos = rest.find(sep)
            if pos != -1 and pos < cut:
                cut = pos
        td_name, path = rest[:cut], rest[cut:]
        _check_trust_domain_name(td_name, text)
        if path[:1] == "?":
            raise InvalidSpiffeIdError(text, "a query ('?') is not allowed")
        if path[:1] == "#":
            raise InvalidSpiffeIdError(text, "a fragment ('#') is not allowed")
        _check_path(path, text)
        return cls(TrustDomain(td_name), path)

    @classmethod
    def from_parts(cls, trust_domain: str | TrustDomain, *segments: str) -> SpiffeId:
        """Build ``spiffe://td/seg1/seg2``; each segment is validated on its own."""
        td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
        return cls(td, "".join("/" + s for s in segments))

    def is_member_of(self, trust_domain: TrustDomain) -> bool:
        return self.trust_domain == trust_domain

    @property
    def is_trust_domain_id(self) -> bool:
        """True for ``spiffe://td`` itself (the form a signing CA's URI SAN may take)."""
        return self.path == ""

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"


def is_valid(text: str) -> bool:
    """True when ``text`` parses as a SPIFFE ID."""
    try:
        SpiffeId.parse(text)
    except InvalidSpiffeIdError:
        return False
    return True
