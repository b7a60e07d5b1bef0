"""Which team owns which destinations: the ownership file behind team-scoped policy applies.

    apiVersion: trustmesh/v1
    kind: Ownership
    teams:
      payments: [spiffe://example.org/payments, spiffe://example.org/ledger/*]
      risk: [spiffe://example.org/fraud/*]

A team owns an allowlist when the allowlist's destination lies within one of the team's
patterns (an exact ID, or a whole-segment prefix `…/*`, as in allowlists). When patterns of
several teams cover a destination, the most specific wins (an exact ID over any prefix, a
longer prefix over a shorter one); one pattern may belong to one team only. A destination no
pattern covers belongs to no team: only admins write its allowlists.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from trustmesh.naming import NAME
from trustmesh.policy.loader import API_VERSION
from trustmesh.policy.model import IdPattern, PolicyError
from trustmesh.policy.strict_yaml import describe, load_all_strict

KIND = "Ownership"
MAX_BYTES = 256 * 1024
MAX_PATTERNS = 10_000


def covers(owned: IdPattern, destination: IdPattern) -> bool:
    """True when every ID `destination` can match is within `owned`."""
    if owned.trust_domain != destination.trust_domain:
        return False
    if not owned.is_prefix:
        return not destination.is_prefix and destination.path == owned.path
    return destination.path.startswith(owned.path + "/") or (destination.is_prefix and destination.path == owned.path)


def _specificity(pattern: IdPattern) -> tuple[int, int]:
    return (0 if pattern.is_prefix else 1, len(pattern.path))


@dataclass(frozen=True)
class Ownership:
    claims: tuple[tuple[IdPattern, str], ...] = ()  # (pattern, team), most specific first

    def team_of(self, destination: IdPattern) -> str | None:
        """The team owning `destination`, or None when no pattern covers it."""
        return next((team for pattern, team in self.claims if covers(pattern, destination)), None)

    @property
    def teams(self) -> dict[str, list[str]]:
        """Each team's patterns, as written, teams and patterns sorted."""
        teams: dict[str, list[str]] = {}
        for pattern, team in self.claims:
            teams.setdefault(team, []).append(str(pattern))
        return {team: sorted(patterns) for team, patterns in sorted(teams.items())}


def parse_ownership(text: str, source: str = "ownership") -> Ownership:
    """The ownership file's meaning, or PolicyError naming every problem in one line."""
    if len(text.encode()) > MAX_BYTES:
        raise PolicyError(f"{source}: {len(text.encode())} bytes, above the limit of {MAX_BYTES} bytes")
    try:
        documents = [d for d in load_all_strict(text, source) if d is not None]
    except yaml.YAMLError as err:
        _, line, message = describe(err)
        raise PolicyError(f"{source}{f' line {line}' if line else ''}: {message}") from None
    if len(documents) != 1 or not isinstance(documents[0], dict):
        raise PolicyError(f"{source}: expected one document: apiVersion: {API_VERSION}, kind: {KIND}, teams: …")
    doc = documents[0]
    problems: list[str] = []
    unknown = sorted(str(k) for k in doc if k not in ("apiVersion", "kind", "teams"))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}")
    if doc.get("apiVersion") != API_VERSION or doc.get("kind") != KIND:
        problems.append(f"apiVersion must be {API_VERSION} and kind {KIND}")
    teams = doc.get("teams")
    if not isinstance(teams, dict):
        raise PolicyError(f"{source}: " + "; ".join([*problems, "teams: a mapping of team name to destination IDs"]))
    owner_of: dict[str, str] = {}
    claims: list[tuple[IdPattern, str]] = []
    for team, patterns in teams.items():
        if not isinstance(team, str) or not NAME.fullmatch(team):
            problems.append(f"team {str(team)[:64]!r}: 1-63 characters of a-z, 0-9 and '-', starting with a letter")
            continue
        if not isinstance(patterns, list) or not patterns:
            problems.append(f"teams.{team}: a non-empty list of destination IDs (exact, or a prefix ending in /*)")
            continue
        for i, text_ in enumerate(patterns):
            try:
                pattern = IdPattern.parse(text_)
            except PolicyError as err:
                problems.append(f"teams.{team}[{i}]: {err}")
                continue
            if str(pattern) in owner_of:
                problems.append(f"teams.{team}[{i}]: {pattern} is also claimed by team {owner_of[str(pattern)]}; "
                                "a destination has one owner")
                continue
            owner_of[str(pattern)] = team
            claims.append((pattern, team))
    if len(claims) > MAX_PATTERNS:
        problems.append(f"{len(claims)} patterns, above the limit of {MAX_PATTERNS}")
    if problems:
        shown = "; ".join(problems[:20]) + (f"; and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise PolicyError(f"{source}: {shown}")
    return ownership_of(claims)


def ownership_of(claims: Iterable[tuple[IdPattern, str]]) -> Ownership:
    """(pattern, team) claims, already checked, ordered most specific first."""
    return Ownership(tuple(sorted(claims, key=lambda c: _specificity(c[0]), reverse=True)))
