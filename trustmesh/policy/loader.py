"""Loading allowlists from YAML, reporting every problem with file, document and field.

A file may hold several documents (`---`). Loading never stops at the first problem: a
platform team sees everything to fix in one CI run. Nothing with a problem is ever applied.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from trustmesh.clock import utc_now
from trustmesh.policy.model import MODES, Allowlist, AllowRule, IdPattern, Policy, PolicyError

API_VERSION = "trustmesh/v1"
KIND = "Allowlist"
TOP_KEYS = {"apiVersion", "kind", "metadata", "spec"}
META_KEYS = {"name", "owner"}
SPEC_KEYS = {"destination", "ports", "mode", "allow"}
RULE_KEYS = {"from", "expires"}
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Problem:
    source: str
    document: int  # 1-based
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}: document {self.document}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Loaded:
    policy: Policy
    problems: tuple[Problem, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def _parse_time(value: Any) -> datetime:
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, str):
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
    else:
        raise ValueError("not a time")
    if when.tzinfo is None:
        raise ValueError("the time needs a zone, e.g. 2026-12-31T00:00:00Z")
    return when.astimezone(timezone.utc)


class _Doc:
    def __init__(self, source: str, index: int, problems: list[Problem]) -> None:
        self.source, self.index, self.problems = source, index, problems

    def problem(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.source, self.index, field, message))

    def unknown(self, mapping: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in sorted(set(map(str, mapping)) - allowed):
            self.problem(f"{where}.{key}" if where else key,
                         f"unknown key; allowed here: {', '.join(sorted(allowed))}")


def _load_one(raw: Any, doc: _Doc, now: datetime, reject_expired: bool) -> Allowlist | None:
    if not isinstance(raw, dict):
        doc.problem("(document)", "an Allowlist document must be a mapping")
        return None
    doc.unknown(raw, TOP_KEYS, "")
    if raw.get("apiVersion") != API_VERSION:
        doc.problem("apiVersion", f"must be {API_VERSION!r}, got {raw.get('apiVersion')!r}")
    if raw.get("kind") != KIND:
        doc.problem("kind", f"must be {KIND!r}, got {raw.get('kind')!r}")
    meta = raw.get("metadata")
    name, owner = "", ""
    if not isinstance(meta, dict):
        doc.problem("metadata", "is required: {name: ..., owner: ...}")
    else:
        doc.unknown(meta, META_KEYS, "metadata")
        name = str(meta["name"]) if isinstance(meta.get("name"), str) else ""
        if not name or len(name) > 128:
            doc.problem("metadata.name", "is required: a name of 1 to 128 characters")
        owner = str(meta.get("owner") or "")
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        doc.problem("spec", "is required")
        return None
    doc.unknown(spec, SPEC_KEYS, "spec")
    destination = None
    try:
        destination = IdPattern.parse(spec.get("destination"))  # type: ignore[arg-type]
    except PolicyError as err:
        doc.problem("spec.destination", str(err))
    ports: list[int] = []
    raw_ports = spec.get("ports", [])
    if not isinstance(raw_ports, list):
        doc.problem("spec.ports", "must be a list of port numbers, e.g. [9443]")
    else:
        for i, port in enumerate(raw_ports):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                doc.problem(f"spec.ports[{i}]", f"{port!r} is not a port number (1 to 65535)")
            elif port in ports:
                doc.problem(f"spec.ports[{i}]", f"port {port} is listed twice")
            else:
                ports.append(port)
    mode = spec.get("mode", "enforce")
    if mode not in MODES:
        doc.problem("spec.mode", f"unknown mode {mode!r}; use enforce or audit")
    rules: list[AllowRule] = []
    raw_rules = spec.get("allow")
    if not isinstance(raw_rules, list) or not raw_rules:
        doc.problem("spec.allow", "is required: a list of {from: SPIFFE ID or prefix/*, expires: optional time}")
        raw_rules = []
    seen: dict[str, int] = {}
    for i, rule in enumerate(raw_rules):
        where = f"spec.allow[{i}]"
        if not isinstance(rule, dict):
            doc.problem(where, "must be a mapping with 'from'")
            continue
        doc.unknown(rule, RULE_KEYS, where)
        try:
            source = IdPattern.parse(rule.get("from"))  # type: ignore[arg-type]
        except PolicyError as err:
            doc.problem(f"{where}.from", str(err))
            continue
        expires = None
        if "expires" in rule:
            try:
                expires = _parse_time(rule["expires"])
            except ValueError as err:
                doc.problem(f"{where}.expires", f"{rule['expires']!r} is not an ISO time: {err}")
                continue
            if reject_expired and expires <= now:
                doc.problem(f"{where}.expires", f"{expires:%Y-%m-%dT%H:%M:%SZ} is in the past; remove the rule")
        if str(source) in seen:
            doc.problem(f"{where}.from", f"duplicates spec.allow[{seen[str(source)]}] ({source})")
        seen[str(source)] = i
        rules.append(AllowRule(source, expires))
    if destination is None or mode not in MODES or not name:
        return None
    return Allowlist(name=name, destination=destination, allow=tuple(rules), ports=tuple(ports),
                     mode=mode, owner=owner)


def load_text(text: str, source: str, now: datetime | None = None, *, reject_expired: bool = True) -> Loaded:
    return load_many([(source, text)], now, reject_expired=reject_expired)


def load_many(sources: Iterable[tuple[str, str]], now: datetime | None = None, *,
              reject_expired: bool = True) -> Loaded:
    """`reject_expired` flags rules whose expiry has passed (right when applying new text;
    wrong when re-reading a stored revision, where lapsed rules simply stop matching)."""
    now = now or utc_now()
    problems: list[Problem] = []
    allowlists: list[tuple[Allowlist, Problem]] = []
    for source, text in sources:
        if len(text.encode()) > MAX_DOCUMENT_BYTES:
            problems.append(Problem(source, 1, "(file)", f"larger than {MAX_DOCUMENT_BYTES} bytes"))
            continue
        try:
            documents = list(yaml.safe_load_all(text))
        except yaml.YAMLError as err:
            problems.append(Problem(source, 1, "(yaml)", f"not valid YAML: {err}"))
            continue
        for index, raw in enumerate(documents, start=1):
            if raw is None:
                continue
            doc = _Doc(source, index, problems)
            allowlist = _load_one(raw, doc, now, reject_expired)
            if allowlist is not None:
                allowlists.append((allowlist, Problem(source, index, "", "")))
    names: dict[str, Problem] = {}
    scopes: dict[tuple[str, tuple[int, ...]], tuple[str, Problem]] = {}
    for allowlist, where in allowlists:
        if allowlist.name in names:
            first = names[allowlist.name]
            problems.append(Problem(where.source, where.document, "metadata.name",
                                    f"{allowlist.name!r} is also defined in {first.source} document {first.document}"))
        names.setdefault(allowlist.name, where)
        scope = (str(allowlist.destination), tuple(sorted(allowlist.ports)))
        if scope in scopes:
            other, first = scopes[scope]
            problems.append(Problem(where.source, where.document, "spec.destination",
                                    f"overlaps allowlist {other!r} ({first.source} document {first.document}): "
                                    "same destination and ports; merge their rules into one allowlist"))
        scopes.setdefault(scope, (allowlist.name, where))
    return Loaded(Policy(tuple(a for a, _ in allowlists)), tuple(problems))


def load_paths(paths: Iterable[str | Path], now: datetime | None = None) -> Loaded:
    """Load files, or every *.yaml/*.yml under a directory (sorted), as one policy."""
    sources: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            try:
                sources.append((str(file), file.read_text()))
            except (OSError, UnicodeDecodeError) as err:
                problems.append(Problem(str(file), 1, "(file)", f"cannot read: {err}"))
    loaded = load_many(sources, now)
    return Loaded(loaded.policy, tuple(problems) + loaded.problems)


def bundle_documents(paths: Iterable[str | Path]) -> str:
    """All documents of the given files as one YAML text, each preceded by its origin."""
    parts = []
    for raw in paths:
        path = Path(raw)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            parts.append(f"# from {file}\n{file.read_text().strip()}\n")
    return "---\n".join(parts)
