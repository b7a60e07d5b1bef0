"""Allowlists proposed from observed traffic (`policy suggest`), and a candidate policy
checked against it (`policy simulate`).

Only traffic that went through is evidence: `allow` and `audit` flows (audit: allowed only
because the covering allowlist is in audit mode). Denied connections never reached the
service, so they never become rules; unverified (plaintext) callers have no identity, so they
are listed as comments to resolve. A suggestion is least privilege: each source gets exactly
the ports it used, and prefixes only where `--group-prefix` asks for them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

from trustmesh.clock import format_utc
from trustmesh.errors import InvalidSpiffeIdError
from trustmesh.flows import Flow
from trustmesh.policy.loader import API_VERSION, KIND, MAX_NAME_CHARS
from trustmesh.policy.model import GRANT_ALLOWLIST_PREFIX, IdPattern, Policy
from trustmesh.policy.routes import ANY_PATH, HttpRequest
from trustmesh.spiffeid import SpiffeId

WENT_THROUGH = ("allow", "audit")


@dataclass
class _Evidence:
    connections: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0
    ports: set[int] = field(default_factory=set)

    def add(self, flow: Flow) -> None:
        self.connections += flow.connections
        self.first_seen = min(self.first_seen or flow.first_seen, flow.first_seen)
        self.last_seen = max(self.last_seen, flow.last_seen)
        self.ports.add(flow.port)

    def text(self) -> str:
        return (f"{self.connections} connection(s), first seen {format_utc(self.first_seen)}, "
                f"last seen {format_utc(self.last_seen)}")


@dataclass(frozen=True)
class Suggestion:
    destination: str
    filename: str
    text: str  # YAML documents (and comments), ready for `policy lint`
    allowlists: int
    unverified: int  # unverified callers listed as comments


def _slug(destination: str, taken: set[str]) -> str:
    """A file and allowlist name for `destination`, unique in this suggestion: /a-b and /a/b,
    or the same path in two trust domains, must not overwrite each other."""
    path = SpiffeId.parse(destination).path.strip("/")
    slug = re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-")[:80] or "root"
    if slug in taken:
        slug = f"{slug}-{hashlib.sha256(destination.encode()).hexdigest()[:8]}"
    taken.add(slug)
    return slug


def _grouped(source: str, prefixes: Sequence[IdPattern]) -> str:
    sid = SpiffeId.parse(source)
    for prefix in prefixes:
        if prefix.matches(sid):
            return str(prefix)
    return source


def _address(text: str) -> str:
    """An unverified caller's address for a comment line: an IP address, or "unknown" (a
    flows file is input like any other; a newline in it must not start a YAML line)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return "unknown"


def _quoted(text: str) -> str:
    # IDs were parsed as SPIFFE IDs, so they hold no quote or control character; quoting keeps
    # YAML from reading anything in them as syntax.
    return '"' + text + '"'


def suggest(flows: Iterable[Flow], *, min_connections: int = 1, owns: Callable[[str], bool] | None = None,
            group_prefixes: Sequence[IdPattern] = (), team: str = "") -> list[Suggestion]:
    """One allowlist file per destination that saw traffic, allowing exactly what went through.

    `owns`, when given, says which destinations to keep (a team's); a source seen with fewer
    than `min_connections` connections (over all its ports) is left out."""
    seen: dict[str, dict[str, _Evidence]] = defaultdict(lambda: defaultdict(_Evidence))
    unverified: dict[str, dict[str, _Evidence]] = defaultdict(lambda: defaultdict(_Evidence))
    granted: dict[str, dict[str, _Evidence]] = defaultdict(lambda: defaultdict(_Evidence))
    for flow in flows:
        try:
            SpiffeId.parse(flow.destination)
            if owns is not None and not owns(flow.destination):
                continue
            if flow.decision in WENT_THROUGH and flow.rule.startswith(GRANT_ALLOWLIST_PREFIX):
                granted[flow.destination][flow.source].add(flow)
            elif flow.decision in WENT_THROUGH:
                seen[flow.destination][_grouped(flow.source, group_prefixes)].add(flow)
            elif flow.decision == "unverified":
                unverified[flow.destination][_address(flow.source_address)].add(flow)
        except InvalidSpiffeIdError:
            continue  # a flow an agent reported with a malformed ID proves nothing
    out = []
    taken: set[str] = set()
    for destination in sorted(set(seen) | set(unverified) | set(granted)):
        sources = {s: e for s, e in seen.get(destination, {}).items() if e.connections >= min_connections}
        callers = unverified.get(destination, {})
        temporary = {s: e for s, e in granted.get(destination, {}).items() if s not in sources}
        if not sources and not callers and not temporary:
            continue
        # Sources that used the same ports share an allowlist; each source gets exactly its ports.
        groups: dict[tuple[int, ...], list[str]] = defaultdict(list)
        for source, evidence in sources.items():
            groups[tuple(sorted(evidence.ports))].append(source)
        slug = _slug(destination, taken)
        lines = [f"# Suggested by `trustmesh policy suggest` from observed traffic to {destination}.",
                 "# Audit mode: nothing is denied yet. Check it (`policy simulate`), apply it, watch for",
                 "# would-deny flows (`trustmesh flows --decision audit`), then set mode: enforce."]
        for ports, members in sorted(groups.items()):
            name = slug if len(groups) == 1 else f"{slug}-{'-'.join(str(p) for p in ports)}"
            lines += ["---", f"apiVersion: {API_VERSION}", f"kind: {KIND}", "metadata:",
                      f"  name: {_quoted(('suggested-' + name)[:MAX_NAME_CHARS])}"]
            if team:
                lines.append(f"  owner: {_quoted(team)}")
            lines += ["spec:", f"  destination: {_quoted(destination)}",
                      f"  ports: [{', '.join(str(p) for p in ports)}]", "  mode: audit", "  allow:"]
            for source in sorted(members):
                lines += [f"    # {sources[source].text()}", f"    - from: {_quoted(source)}"]
        if callers:
            lines.append("# Unverified (plaintext) callers through a permissive listener, to resolve (give them")
            lines.append("# an identity, or accept that strict mode will refuse them); never turned into rules:")
            for address, evidence in sorted(callers.items()):
                used = ",".join(str(p) for p in sorted(evidence.ports))
                lines.append(f"#   {address} on port {used}: {evidence.text()}")
        if temporary:
            lines.append("# Went through only under a just-in-time access grant (temporary by design; not rules):")
            for source, evidence in sorted(temporary.items()):
                lines.append(f"#   {source}: {evidence.text()}")
        out.append(Suggestion(destination, f"{slug}.yaml", "\n".join(lines) + "\n", len(groups), len(callers)))
    return out


# --- simulation ------------------------------------------------------------------------


@dataclass(frozen=True)
class Refused:
    flow: Flow
    rule: str
    reason: str


@dataclass(frozen=True)
class Simulation:
    would_deny: list[Refused]  # went through in the window; the candidate would deny it (enforced)
    unused_rules: list[tuple[str, str]]  # (allowlist allow[i], from): no flow of the window used it
    newly_allowed: list[Flow]  # denied in the window; the candidate would allow it
    unverified: list[Flow]  # plaintext callers: no identity to judge
    granted: list[Flow]  # let through by a just-in-time grant: temporary, not the candidate's to allow
    judged: int  # flows replayed


def _enforced(policy: Policy) -> Policy:
    return replace(policy, allowlists=tuple(replace(a, mode="enforce") for a in policy.allowlists))


def route_request(route: str) -> HttpRequest | None:
    """The request an HTTP flow stands for, from its route (flows never keep a request's own
    path): "GET /transactions/*" as GET /transactions/ (the prefix itself), "GET /health" as
    itself, a method alone or with "*" (no rule's paths decided it) as the method on "/".
    None for a connection (no route). A candidate that splits paths finer than the rules the
    flows were counted under can only be checked request by request (`policy test --path`)."""
    if not route:
        return None
    method, _, pattern = route.partition(" ")
    if not pattern or pattern == ANY_PATH:
        return HttpRequest(method, "/")
    return HttpRequest(method, pattern[:-1] if pattern.endswith("/*") else pattern)


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, timezone.utc)


def simulate(candidate: Policy, flows: Iterable[Flow], at: datetime) -> Simulation:
    """Replay observed flows against `candidate` as if it were enforced."""
    relevant: dict[str, Policy] = {}
    would_deny: list[Refused] = []
    newly_allowed: list[Flow] = []
    unverified: list[Flow] = []
    granted: list[Flow] = []
    used: set[str] = set()
    judged = 0
    for flow in flows:
        if flow.decision == "unverified":
            unverified.append(flow)
            continue
        if flow.decision in WENT_THROUGH and flow.rule.startswith(GRANT_ALLOWLIST_PREFIX):
            granted.append(flow)
            continue
        try:
            source, destination = SpiffeId.parse(flow.source), SpiffeId.parse(flow.destination)
        except InvalidSpiffeIdError:
            continue
        judged += 1
        if flow.destination not in relevant:  # each destination's allowlists, found once
            relevant[flow.destination] = candidate.for_destinations([destination])
        request = route_request(flow.route)
        # Expiry is judged at `at` (would it deny from now on); time windows at the flow's own time
        # of day, at both ends of its span, since a window may have closed between them.
        window_at = _utc(flow.first_seen)
        decision = relevant[flow.destination].decide(source, destination, flow.port, at, request=request,
                                                     window_at=window_at)
        if decision.allowed and flow.last_seen != flow.first_seen:
            window_at = _utc(flow.last_seen)
            decision = relevant[flow.destination].decide(source, destination, flow.port, at, request=request,
                                                         window_at=window_at)
        really_allowed = decision.allowed and not decision.audit_only
        if really_allowed:
            used.add(decision.rule)
        if flow.decision in WENT_THROUGH and not really_allowed:
            # The reason enforcement would give (audit mode only postpones it).
            enforced = _enforced(relevant[flow.destination]).decide(source, destination, flow.port, at,
                                                                    request=request, window_at=window_at)
            note = " (an audit-mode allowlist lets it through until enforced)" if decision.audit_only else ""
            would_deny.append(Refused(flow, enforced.rule, enforced.reason + note))
        elif flow.decision == "deny" and really_allowed:
            newly_allowed.append(flow)
    unused = [(f"{a.name} allow[{i}]", str(rule.source)) for a in candidate.allowlists
              for i, rule in enumerate(a.allow) if f"{a.name} allow[{i}]" not in used]
    return Simulation(would_deny, unused, newly_allowed, unverified, granted, judged)

