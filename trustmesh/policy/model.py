"""Allowlists as values, and the one pure function that decides a connection or a request.

Default deny: a connection (source ID -> destination ID, port) is allowed only when an
allowlist whose destination and ports cover it has an unexpired rule naming the source.
An allowlist in `audit` mode allows what it would deny, and says so, so a team can roll a
new allowlist out, watch, and then enforce.

A rule may also name HTTP methods and paths (routes.py): it then allows only the HTTP
requests of an http listener that match them, and never a plain connection, which carries
no route to check.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal

from trustmesh.errors import InvalidSpiffeIdError
from trustmesh.policy.responses import ResponsePolicy
from trustmesh.policy.routes import ANY_PATH, HttpRequest, PathPattern, route_label

# Defined in routes.py (which this module imports) so both raise the one class; re-exported:
# the rest of trustmesh imports it from here.
from trustmesh.policy.routes import PolicyError as PolicyError
from trustmesh.policy.windows import TimeWindow, windows_text
from trustmesh.spiffeid import SpiffeId, TrustDomain

Mode = Literal["enforce", "audit"]
MODES: tuple[Mode, ...] = ("enforce", "audit")
DEFAULT_DENY = "default deny"
QUARANTINE = "quarantine"  # the rule of a decision refused because one side is in quarantine
# The allowlists the registry view adds for just-in-time access grants are named this + the
# grant's ID; a connection they decided is temporary access, never evidence for a standing rule.
GRANT_ALLOWLIST_PREFIX = "access/"


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
    """One `allow` item: who may call, until when, and optionally which HTTP routes.

    Without methods and paths the rule covers every request and every connection. With
    either, it covers only HTTP requests whose method is listed (any, when methods is empty)
    and whose path matches a pattern (any, when paths is empty)."""

    source: IdPattern
    expires: datetime | None = None
    methods: tuple[str, ...] = ()
    paths: tuple[PathPattern, ...] = ()
    # When the rule allows (windows.py): any one window holding; () = at every time.
    windows: tuple[TimeWindow, ...] = ()
    # `methods` as a set, built once: covers() runs for every request.
    _methods: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_methods", frozenset(self.methods))

    def active(self, at: datetime) -> bool:
        return self.expires is None or at < self.expires

    def in_window(self, at: datetime) -> bool:
        return not self.windows or any(w.holds(at) for w in self.windows)

    @property
    def routed(self) -> bool:
        """True when the rule names methods or paths, so it allows HTTP requests only."""
        return bool(self.methods or self.paths)

    def covers(self, request: HttpRequest | None) -> str | None:
        """The route pattern under which this rule covers `request` (None: a plain connection):
        the matching path pattern's text, or ANY_PATH when the rule names no paths. None when it
        does not cover it; a routed rule never covers a plain connection (no route to check)."""
        if not self.methods and not self.paths:
            return ANY_PATH
        if request is None:
            return None
        if self._methods and request.method not in self._methods:
            return None
        if not self.paths:
            return ANY_PATH
        for pattern in self.paths:
            if pattern.matches(request.path):
                return str(pattern)
        return None


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
    # For a request: its route label (routes.route_label), "GET /transactions/*" or "POST";
    # "" for a connection. Bounded and never the request's path: metrics and flows carry it.
    route: str = ""

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
    # Every method a rule names, built once: a route label shows these and the standard ones,
    # anything else as OTHER (routes.route_label), so labels stay bounded by the policy.
    route_methods: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "route_methods",
                           frozenset(m for a in self.allowlists for r in a.allow for m in r.methods))

    def in_quarantine(self, *ids: SpiffeId | None) -> Decision | None:
        """The refusal when one of `ids` is in quarantine, else None."""
        if self.quarantined:  # the common case costs nothing: no ID is turned into text
            for sid in ids:
                if sid is not None and str(sid) in self.quarantined:
                    return Decision(False, QUARANTINE, f"{sid} is in quarantine; a security officer releases it "
                                                       "with trustmesh quarantine release")
        return None

    def decide(self, source: SpiffeId, destination: SpiffeId, port: int | None, at: datetime, *,
               node: SpiffeId | None = None, request: HttpRequest | None = None,
               window_at: datetime | None = None) -> Decision:
        """Allow or deny source -> destination:port at `at`: a connection, or with `request` one
        HTTP request on it (its path already normalised). `node` is the deciding agent's own ID:
        a node in quarantine refuses every connection its listeners see.

        No reason ever holds the request's path (403 bodies and logs carry reasons, and paths
        can hold account numbers); the route label holds the matching pattern only.

        `window_at` (default `at`) is the time rules' windows are evaluated at: a replay of
        past flows asks about each flow's time of day while expiry is still judged at `at`."""
        refused = self.in_quarantine(source, destination, node)
        if refused is not None:
            # Before any allowlist: no rule, not even audit mode, lets it through.
            return refused if request is None else replace(refused, route=self._route(request, None))
        covering = [a for a in self.allowlists if a.covers(destination, port)]
        expired_match = ""
        window_miss = ""  # the first rule that would allow, but not at this time of day
        route_miss = ""  # the first active rule naming the source whose route does not cover this
        for allowlist in covering:
            for index, rule in enumerate(allowlist.allow):
                if not rule.source.matches(source):
                    continue
                pattern = rule.covers(request)
                if pattern is None:
                    if not route_miss and rule.active(at):
                        route_miss = f"{allowlist.name} allow[{index}]"
                    continue
                if rule.active(at) and not rule.in_window(window_at or at):
                    window_miss = window_miss or f"{allowlist.name} allow[{index}] outside {windows_text(rule.windows)}"
                elif rule.active(at):
                    return Decision(True, f"{allowlist.name} allow[{index}]",
                                    f"{source} is allowed by {allowlist.name} (from {rule.source})",
                                    route="" if request is None else self._route(request, pattern))
                else:
                    expired_match = f"{allowlist.name} allow[{index}] expired at {rule.expires:%Y-%m-%dT%H:%M:%SZ}"
        route = "" if request is None else self._route(request, None)
        audit = next((a for a in covering if a.mode == "audit"), None)
        if audit is not None:
            return Decision(True, f"{audit.name} (audit mode)",
                            f"audit mode: enforce would deny {source} -> {destination}", audit_only=True, route=route)
        if window_miss:
            reason = f"no active rule allows {source}; {window_miss}"
        elif expired_match:
            reason = f"no active rule allows {source}; {expired_match}"
        elif route_miss and request is None:
            # A tcp listener cannot check a route, so the rule never allows there: say where it can.
            reason = (f"{route_miss} allows only HTTP requests (methods/paths): serve this port with an "
                      "http listener")
        elif route_miss and request is not None:
            reason = self._route_refusal(covering, source, request, at)
        elif covering:
            reason = f"no rule of {', '.join(a.name for a in covering)} allows {source}"
        else:
            reason = f"no allowlist covers {destination}" + (f" port {port}" if port is not None else "")
        return Decision(False, DEFAULT_DENY, reason, route=route)

    def _route(self, request: HttpRequest, pattern: str | None) -> str:
        return route_label(request.method, pattern, self.route_methods)

    def _route_refusal(self, covering: list[Allowlist], source: SpiffeId, request: HttpRequest, at: datetime) -> str:
        """Why the rules naming `source` do not allow `request`: its method, or else its path
        (which is never quoted). The method as a route label shows it: bounded text."""
        method_listed = any(rule.source.matches(source) and rule.active(at)
                            and (not rule._methods or request.method in rule._methods)
                            for allowlist in covering for rule in allowlist.allow)
        names = ", ".join(a.name for a in covering)
        return (f"no rule of {names} allows {self._route(request, None)} from {source}"
                + (" on this path" if method_listed else ""))

    def without_routes(self) -> Policy:
        """This policy with every route rule (methods or paths) left out: what an agent that
        cannot enforce routes is sent. It then denies what those rules alone allow, where keeping
        them would have it read each as allowing every request."""
        if not any(r.routed for a in self.allowlists for r in a.allow):
            return self
        kept = tuple(replace(a, allow=tuple(r for r in a.allow if not r.routed)) for a in self.allowlists)
        return replace(self, allowlists=kept)

    def without_windows(self) -> Policy:
        """This policy with every rule that has time windows left out: what an agent that cannot
        enforce windows is sent, so it denies what only those rules allow (fail closed), where
        keeping them would have it allow at every time of day."""
        if not any(r.windows for a in self.allowlists for r in a.allow):
            return self
        kept = tuple(replace(a, allow=tuple(r for r in a.allow if not r.windows)) for a in self.allowlists)
        return replace(self, allowlists=kept)

    def for_destinations(self, destinations: list[SpiffeId]) -> Policy:
        """Only the allowlists that can decide for these destinations (what one node needs)."""
        keep = tuple(a for a in self.allowlists if any(a.destination.matches(d) for d in destinations))
        # Quarantine is never narrowed: a node must refuse a quarantined source whatever its destinations.
        return Policy(keep, self.revision, self.revoked_serials, quarantined=self.quarantined)
