"""Allowlists as values, and the one pure function that decides a connection.

Default deny: a connection (source ID -> destination ID, port) is allowed only when an
allowlist whose destination and ports cover it has an unexpired rule naming the source.
An allowlist in `audit` mode allows what it would deny, and says so, so a team can roll a
new allowlist out, watch, and then enforce.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from trustmesh.errors import InvalidSpiffeIdError, TrustmeshError
from trustmesh.policy.responses import ResponsePolicy
from trustmesh.spiffeid import SpiffeId, TrustDomain

Mode = Literal["enforce", "audit"]
MODES: tuple[Mode, ...] = ("enforce", "audit")
DEFAULT_DENY = "default deny"
QUARANTINE = "quarantine"  # the rule of a decision refused because one side is in quarantine
# The allowlists the registry view adds for just-in-time access grants are named this + the
# grant's ID; a connection they decided is temporary access, never evidence for a standing rule.
GRANT_ALLOWLIST_PREFIX = "access/"


class PolicyError(TrustmeshError, ValueError):
    """A policy document is not valid; the message names the file, document and field."""


@dataclass(frozen=True, slots=True)
class IdPattern:
    """An exact SPIFFE ID, a path prefix (`spiffe://td/ns/batch/*`), or a whole trust
    domain (`spiffe://partner.example/*`)."""

    trust_domain: TrustDomain
    path: str  # the exact path, or the prefix path (without "/*") when is_prefix
    is_prefix: bool

    @classmethod
    def parse(cls, text: str) -> IdPattern:
        if not isinstance(text, str):
            raise PolicyError(f"{text!r} is not a SPIFFE ID")
        if text.endswith("/*"):
            base = text[:-2]
            try:
                sid = SpiffeId.parse(base)
            except InvalidSpiffeIdError as err:
                raise PolicyError(f"{text!r} is not a SPIFFE ID prefix: {err.reason}") from err
            return cls(sid.trust_domain, sid.path, True)
        if "*" in text:
            raise PolicyError(f"{text!r}: a wildcard is only allowed as a final '/*'")
        try:
            sid = SpiffeId.parse(text)
        except InvalidSpiffeIdError as err:
            raise PolicyError(f"{text!r} is not a SPIFFE ID: {err.reason}") from err
        if sid.is_trust_domain_id:
            raise PolicyError(f"{text!r} names no workload; use {text}/* for the whole trust domain")
        return cls(sid.trust_domain, sid.path, False)

    def matches(self, spiffe_id: SpiffeId) -> bool:
        if spiffe_id.trust_domain != self.trust_domain:
            return False
        if not self.is_prefix:
            return spiffe_id.path == self.path
        # A prefix matches whole segments only: /ns/batch/* covers /ns/batch/x, not /ns/batchjob.
        return spiffe_id.path.startswith(self.path + "/")

    def __str__(self) -> str:
        base = f"spiffe://{self.trust_domain.name}{self.path}"
        return base + "/*" if self.is_prefix else base


@dataclass(frozen=True, slots=True)
class AllowRule:
    source: IdPattern
    expires: datetime | None = None

    def active(self, at: datetime) -> bool:
        return self.expires is None or at < self.expires


@dataclass(frozen=True, slots=True)
class Allowlist:
    name: str
    destination: IdPattern
    allow: tuple[AllowRule, ...]
    ports: tuple[int, ...] = ()
    mode: Mode = "enforce"
    owner: str = ""

    def covers(self, destination: SpiffeId, port: int | None) -> bool:
        if not self.destination.matches(destination):
            return False
        return not self.ports or (port is not None and port in self.ports)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # "ledger-access allow[0]", "ledger-access (audit mode)" or "default deny"
    reason: str
    audit_only: bool = False  # allowed only because the covering allowlist is in audit mode

    @property
    def verdict(self) -> str:
        return "ALLOW" if self.allowed else "DENY"


@dataclass(frozen=True, slots=True)
class Policy:
    allowlists: tuple[Allowlist, ...] = ()
    revision: int = 0
    # Certificates refused whatever the allowlists say (revoked partner certificates),
    # by serial in lower-case hex. Enforced at the handshake, before any rule is looked at.
    revoked_serials: frozenset[str] = frozenset()
    # What anomalies lead to (kind: Response documents); read by the server, never sent to agents.
    responses: ResponsePolicy = ResponsePolicy()
    # SPIFFE IDs in quarantine (continuous verification), as text: refused from and to, whatever
    # the allowlists say. An agent's ID here puts its whole node in quarantine.
    quarantined: frozenset[str] = frozenset()

    def in_quarantine(self, *ids: SpiffeId | None) -> Decision | None:
        """The refusal when one of `ids` is in quarantine, else None."""
        if self.quarantined:  # the common case costs nothing: no ID is turned into text
            for sid in ids:
                if sid is not None and str(sid) in self.quarantined:
                    return Decision(False, QUARANTINE, f"{sid} is in quarantine; a security officer releases it "
                                                       "with trustmesh quarantine release")
        return None

    def decide(self, source: SpiffeId, destination: SpiffeId, port: int | None, at: datetime, *,
               node: SpiffeId | None = None) -> Decision:
        """Allow or deny source -> destination:port at `at`. `node` is the deciding agent's own
        ID: a node in quarantine refuses every connection its listeners see."""
        refused = self.in_quarantine(source, destination, node)
        if refused is not None:
            return refused  # before any allowlist: no rule, not even audit mode, lets it through
        covering = [a for a in self.allowlists if a.covers(destination, port)]
        expired_match = ""
        for allowlist in covering:
            for index, rule in enumerate(allowlist.allow):
                if not rule.source.matches(source):
                    continue
                if rule.active(at):
                    return Decision(True, f"{allowlist.name} allow[{index}]",
                                    f"{source} is allowed by {allowlist.name} (from {rule.source})")
                expired_match = f"{allowlist.name} allow[{index}] expired at {rule.expires:%Y-%m-%dT%H:%M:%SZ}"
        audit = next((a for a in covering if a.mode == "audit"), None)
        if audit is not None:
            return Decision(True, f"{audit.name} (audit mode)",
                            f"audit mode: enforce would deny {source} -> {destination}", audit_only=True)
        if expired_match:
            reason = f"no active rule allows {source}; {expired_match}"
        elif covering:
            reason = f"no rule of {', '.join(a.name for a in covering)} allows {source}"
        else:
            reason = f"no allowlist covers {destination}" + (f" port {port}" if port is not None else "")
        return Decision(False, DEFAULT_DENY, reason)

    def for_destinations(self, destinations: list[SpiffeId]) -> Policy:
        """Only the allowlists that can decide for these destinations (what one node needs)."""
        keep = tuple(a for a in self.allowlists if any(a.destination.matches(d) for d in destinations))
        # Quarantine is never narrowed: a node must refuse a quarantined source whatever its destinations.
        return Policy(keep, self.revision, self.revoked_serials, quarantined=self.quarantined)
