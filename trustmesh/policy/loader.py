"""Loading allowlists from YAML, reporting every problem with file, document and field.

A file may hold several documents (`---`). Loading never stops at the first problem: a
platform team sees everything to fix in one CI run. Nothing with a problem is ever applied.
YAML is read by the strict loader (strict_yaml.py: no duplicate keys, aliases, YAML 1.1
numbers or deep nesting); every size is bounded by a named limit that the message names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

import yaml

from trustmesh.clock import utc_now
from trustmesh.policy.model import MODES, Allowlist, AllowRule, IdPattern, Policy, PolicyError
from trustmesh.policy.responses import KIND as RESPONSE_KIND
from trustmesh.policy.responses import ResponseDocument, ResponsePolicy, load_response
from trustmesh.policy.responses import to_document as response_document
from trustmesh.policy.routes import STANDARD_METHODS, PathPattern, check_method
from trustmesh.policy.strict_yaml import describe, load_all_strict
from trustmesh.policy.windows import MAX_WINDOWS_PER_RULE, WINDOW_KEYS, WINDOW_SHAPE, TimeWindow, check_window

_T = TypeVar("_T")

API_VERSION = "trustmesh/v1"
KIND = "Allowlist"
KINDS = (KIND, RESPONSE_KIND)
TOP_KEYS = {"apiVersion", "kind", "metadata", "spec"}
META_KEYS = {"name", "owner"}
SPEC_KEYS = {"destination", "ports", "mode", "allow"}
RULE_KEYS = {"from", "expires", "methods", "paths", "when"}
MAX_FILE_BYTES = 1024 * 1024  # one policy file
MAX_REVISION_BYTES = 3 * 1024 * 1024  # every file of a revision together: under gRPC's 4 MiB message limit
MAX_ALLOWLISTS_PER_FILE = 1000
MAX_ALLOWLISTS_PER_REVISION = 10_000
MAX_RULES_PER_ALLOWLIST = 1000
MAX_PORTS_PER_ALLOWLIST = 100
MAX_METHODS_PER_RULE = 32
MAX_PATHS_PER_RULE = 64
MAX_NAME_CHARS = 128
MAX_OWNER_CHARS = 256


@dataclass(frozen=True)
class Limits:
    """What one text may hold: a file on disk, or a whole revision as the server gets it."""

    max_bytes: int
    max_bytes_name: str
    max_allowlists: int
    max_allowlists_name: str


FILE = Limits(MAX_FILE_BYTES, "MAX_FILE_BYTES", MAX_ALLOWLISTS_PER_FILE, "MAX_ALLOWLISTS_PER_FILE")
REVISION = Limits(MAX_REVISION_BYTES, "MAX_REVISION_BYTES", MAX_ALLOWLISTS_PER_REVISION,
                  "MAX_ALLOWLISTS_PER_REVISION")


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
    # Rules already expired, when not refused (`reject_expired=False`): they simply never match.
    warnings: tuple[Problem, ...] = ()
    unreadable: bool = False  # a file could not be read at all (lint's exit 2)

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
    def __init__(self, source: str, index: int, problems: list[Problem], warnings: list[Problem]) -> None:
        self.source, self.index, self.problems, self.warnings = source, index, problems, warnings

    def problem(self, field: str, message: str) -> None:
        self.problems.append(Problem(self.source, self.index, field, message))

    def warning(self, field: str, message: str) -> None:
        self.warnings.append(Problem(self.source, self.index, field, message))

    def unknown(self, mapping: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in sorted(set(map(str, mapping)) - allowed):
            self.problem(f"{where}.{key}" if where else key,
                         f"unknown key; allowed here: {', '.join(sorted(allowed))}")


def _load_one(raw: Any, doc: _Doc, now: datetime, reject_expired: bool) -> Allowlist | ResponseDocument | None:
    if not isinstance(raw, dict):
        doc.problem("(document)", "a policy document must be a mapping (kind: Allowlist or Response)")
        return None
    doc.unknown(raw, TOP_KEYS, "")
    if raw.get("apiVersion") != API_VERSION:
        doc.problem("apiVersion", f"must be {API_VERSION!r}, got {raw.get('apiVersion')!r}")
    kind = raw.get("kind")
    if kind not in KINDS:
        doc.problem("kind", f"must be {' or '.join(map(repr, KINDS))}, got {kind!r}")
    name, owner = _metadata(raw, doc)
    if kind == RESPONSE_KIND:
        loaded = load_response(raw, name, doc.problem)
        if loaded is None or not name:
            return None
        return ResponseDocument(name, owner, *loaded)
    return _load_allowlist(raw, doc, name, owner, now, reject_expired)


def _metadata(raw: dict[str, Any], doc: _Doc) -> tuple[str, str]:
    meta = raw.get("metadata")
    name, owner = "", ""
    if not isinstance(meta, dict):
        doc.problem("metadata", "is required: {name: ..., owner: ...}")
        return name, owner
    doc.unknown(meta, META_KEYS, "metadata")
    name = str(meta["name"]) if isinstance(meta.get("name"), str) else ""
    if not name or len(name) > MAX_NAME_CHARS:
        doc.problem("metadata.name", f"is required: a name of 1 to {MAX_NAME_CHARS} characters (MAX_NAME_CHARS)")
        name = ""
    raw_owner = meta.get("owner")
    if raw_owner is not None and not isinstance(raw_owner, str):
        doc.problem("metadata.owner", f"must be text, got {type(raw_owner).__name__}")
    elif raw_owner is not None and len(raw_owner) > MAX_OWNER_CHARS:
        doc.problem("metadata.owner", f"{len(raw_owner)} characters, above the limit of {MAX_OWNER_CHARS} "
                                      "(MAX_OWNER_CHARS)")
    else:
        owner = raw_owner or ""
    return name, owner


def _route_items(raw: dict[str, Any], key: str, where: str, doc: _Doc, limit: int, limit_name: str,
                 example: str, parse: Callable[[object], _T]) -> tuple[_T, ...] | None:
    """A rule's `methods` or `paths`, each parsed ((): the key is absent), or None after
    reporting every problem with its field name (the list itself, an item, a repeat)."""
    if key not in raw:
        return ()
    items = raw[key]
    field = f"{where}.{key}"
    if not isinstance(items, list) or not items:
        doc.problem(field, f"must be a non-empty list, e.g. {example}; leave it out to allow every {key[:-1]}")
        return None
    if len(items) > limit:
        doc.problem(field, f"{len(items)} {key}, above the limit of {limit} ({limit_name}); split the rule")
        return None
    parsed: list[_T] = []
    ok = True
    for j, item in enumerate(items):
        try:
            value = parse(item)
        except PolicyError as err:
            doc.problem(f"{field}[{j}]", str(err))
            ok = False
            continue
        if value in parsed:
            doc.problem(f"{field}[{j}]", f"{value} is listed twice")
            ok = False
            continue
        parsed.append(value)
        if isinstance(value, str):  # a method: warn about what can only be a mistake
            if value == "CONNECT":
                doc.warning(f"{field}[{j}]", "http listeners refuse CONNECT (tunnels belong on a tcp listener), so "
                                             "this allows nothing")
            elif value not in STANDARD_METHODS:
                doc.warning(f"{field}[{j}]", f"{value} is not a standard method ({', '.join(STANDARD_METHODS)}); "
                                             "check the spelling")
    return tuple(parsed) if ok else None


def _rule_methods(raw: dict[str, Any], where: str, doc: _Doc) -> tuple[str, ...] | None:
    """A rule's methods (() when it names none), or None after reporting its problems."""
    return _route_items(raw, "methods", where, doc, MAX_METHODS_PER_RULE, "MAX_METHODS_PER_RULE", "[GET, HEAD]",
                        check_method)


def _rule_paths(raw: dict[str, Any], where: str, doc: _Doc) -> tuple[PathPattern, ...] | None:
    """A rule's path patterns (() when it names none), or None after reporting its problems."""
    return _route_items(raw, "paths", where, doc, MAX_PATHS_PER_RULE, "MAX_PATHS_PER_RULE",
                        '["/transactions/*", "/health"]', PathPattern.parse)


def _rule_windows(raw: dict[str, Any], where: str, doc: _Doc) -> tuple[TimeWindow, ...] | None:
    """A rule's `when`: one window or a list of them (any one holding allows); () when absent,
    None after reporting every problem with its field name."""
    if "when" not in raw:
        return ()
    value, field = raw["when"], f"{where}.when"
    if isinstance(value, dict):
        window = _window(value, field, doc)
        return None if window is None else (window,)
    if not isinstance(value, list) or not value:
        doc.problem(field, f"must be a window {WINDOW_SHAPE} or a non-empty list of them; leave it out to allow "
                           "at every time")
        return None
    if len(value) > MAX_WINDOWS_PER_RULE:
        doc.problem(field, f"{len(value)} windows, above the limit of {MAX_WINDOWS_PER_RULE} "
                           "(MAX_WINDOWS_PER_RULE); split the rule")
        return None
    windows: list[TimeWindow] = []
    ok = True
    for j, item in enumerate(value):
        window = _window(item, f"{field}[{j}]", doc)
        if window is None:
            ok = False
            continue
        if window in windows:
            # "duplicates", as for rules: equal windows may be written differently (days in
            # another order, every day spelled out), which only the loader can see.
            doc.problem(f"{field}[{j}]", f"duplicates {field}[{windows.index(window)}] ({window})")
            ok = False
            continue
        windows.append(window)
    return tuple(windows) if ok else None


def _window(raw: object, field: str, doc: _Doc) -> TimeWindow | None:
    """One window of a rule's `when`, or None after reporting each problem on its own field."""
    if isinstance(raw, dict):
        doc.unknown(raw, WINDOW_KEYS, field)
    window, problems = check_window(raw)
    for below, message in problems:
        doc.problem(field + below, message)
    return window


def _load_allowlist(raw: dict[str, Any], doc: _Doc, name: str, owner: str, now: datetime,
                    reject_expired: bool) -> Allowlist | None:
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
    elif len(raw_ports) > MAX_PORTS_PER_ALLOWLIST:
        doc.problem("spec.ports", f"{len(raw_ports)} ports, above the limit of {MAX_PORTS_PER_ALLOWLIST} "
                                  "(MAX_PORTS_PER_ALLOWLIST); use one allowlist without ports for all of them")
    else:
        for i, port in enumerate(raw_ports):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                doc.problem(f"spec.ports[{i}]", f"{port!r} is not a port number (a decimal 1 to 65535)")
            elif port in ports:
                doc.problem(f"spec.ports[{i}]", f"port {port} is listed twice")
            else:
                ports.append(port)
    mode = spec.get("mode", "enforce")
    if mode not in MODES:
        doc.problem("spec.mode", f"unknown mode {mode!r}; use enforce or audit")
    rules: list[AllowRule] = []
    raw_rules = spec.get("allow")
    if raw_rules == [] and mode == "audit":
        pass  # discovery: cover destinations, deny nothing, and see in the flows what enforce would deny
    elif not isinstance(raw_rules, list) or not raw_rules:
        doc.problem("spec.allow", "is required: a list of {from: SPIFFE ID or prefix/*, expires: optional time, "
                                  "methods and paths: optional HTTP routes} (only an audit-mode allowlist may say "
                                  "`allow: []`, to discover traffic)")
        raw_rules = []
    elif len(raw_rules) > MAX_RULES_PER_ALLOWLIST:
        doc.problem("spec.allow", f"{len(raw_rules)} rules, above the limit of {MAX_RULES_PER_ALLOWLIST} "
                                  "(MAX_RULES_PER_ALLOWLIST); split it by destination or use a prefix/*")
        raw_rules = []
    # Two rules for one source are fine when their routes differ (GET on /a, POST on /b);
    # the same source, methods and paths twice is a mistake (order within a list does not matter).
    seen: dict[tuple[str, frozenset[str], frozenset[PathPattern], frozenset[TimeWindow]], int] = {}
    for i, rule in enumerate(raw_rules):
        where = f"spec.allow[{i}]"
        if not isinstance(rule, dict):
            doc.problem(where, "must be a mapping with 'from'")
            continue
        doc.unknown(rule, RULE_KEYS, where)
        source = None
        try:
            source = IdPattern.parse(rule.get("from"))  # type: ignore[arg-type]
        except PolicyError as err:
            doc.problem(f"{where}.from", str(err))
        # Every field is checked even when one fails, so one run shows every problem.
        methods, paths = _rule_methods(rule, where, doc), _rule_paths(rule, where, doc)
        windows = _rule_windows(rule, where, doc)
        expires, expires_ok = None, True
        if "expires" in rule:
            try:
                expires = _parse_time(rule["expires"])
            except ValueError as err:
                doc.problem(f"{where}.expires", f"{rule['expires']!r} is not an ISO time: {err}")
                expires_ok = False
            else:
                if expires <= now and reject_expired:
                    doc.problem(f"{where}.expires", f"{expires:%Y-%m-%dT%H:%M:%SZ} is in the past; remove the rule")
                elif expires <= now:
                    doc.warning(f"{where}.expires", f"expired at {expires:%Y-%m-%dT%H:%M:%SZ}: the rule no longer "
                                                    "matches (and a new apply refuses it); remove the rule")
        if source is None or methods is None or paths is None or windows is None or not expires_ok:
            continue
        key = (str(source), frozenset(methods), frozenset(paths), frozenset(windows))
        if key in seen:
            same = ", the same methods and paths" if methods or paths else ""
            same += ", the same windows" if windows else ""
            doc.problem(f"{where}.from", f"duplicates spec.allow[{seen[key]}] ({source}{same})")
        seen[key] = i
        rules.append(AllowRule(source, expires, methods, paths, windows))
    if destination is None or mode not in MODES or not name:
        return None
    return Allowlist(name=name, destination=destination, allow=tuple(rules), ports=tuple(ports),
                     mode=mode, owner=owner)


def load_text(text: str, source: str, now: datetime | None = None, *, reject_expired: bool = True,
              limits: Limits = FILE) -> Loaded:
    return load_many([(source, text)], now, reject_expired=reject_expired, limits=limits)


def _documents(source: str, text: str, limits: Limits, problems: list[Problem]) -> list[Any]:
    """The documents of one text, or [] after adding the one problem that refuses it."""
    size = len(text.encode())
    if size > limits.max_bytes:
        problems.append(Problem(source, 1, "(file)", f"{size} bytes, above the limit of {limits.max_bytes} bytes "
                                                     f"({limits.max_bytes_name})"))
        return []
    try:
        documents = load_all_strict(text, source)
    except yaml.YAMLError as err:
        index, line, message = describe(err)
        problems.append(Problem(source, index, f"line {line}" if line else "(yaml)", message))
        return []
    count = sum(raw is not None for raw in documents)
    if count > limits.max_allowlists:
        problems.append(Problem(source, 1, "(file)", f"{count} documents, above the limit of {limits.max_allowlists} "
                                                     f"({limits.max_allowlists_name})"))
        return []
    return documents


def load_many(sources: Iterable[tuple[str, str]], now: datetime | None = None, *,
              reject_expired: bool = True, limits: Limits = FILE) -> Loaded:
    """`reject_expired` refuses rules whose expiry has passed (right when applying new text);
    without it they are warnings (lint, and re-reading a stored revision, where lapsed rules
    simply stop matching). `limits` bound each text (a file, or a revision on the server)."""
    now = now or utc_now()
    problems: list[Problem] = []
    warnings: list[Problem] = []
    allowlists: list[tuple[Allowlist, Problem]] = []
    responses: list[tuple[ResponseDocument, Problem]] = []
    for source, text in sources:
        for index, raw in enumerate(_documents(source, text, limits, problems), start=1):
            if raw is None:
                continue
            doc = _Doc(source, index, problems, warnings)
            loaded = _load_one(raw, doc, now, reject_expired)
            if isinstance(loaded, Allowlist):
                allowlists.append((loaded, Problem(source, index, "", "")))
            elif loaded is not None:
                responses.append((loaded, Problem(source, index, "", "")))
    names: dict[str, Problem] = {}
    for response, where in responses:
        if response.name in names:
            first = names[response.name]
            problems.append(Problem(where.source, where.document, "metadata.name",
                                    f"Response {response.name!r} is also defined in {first.source} "
                                    f"document {first.document}"))
        names.setdefault(response.name, where)
    names = {}
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
    policy = Policy(tuple(a for a, _ in allowlists), responses=ResponsePolicy(tuple(r for r, _ in responses)))
    return Loaded(policy, tuple(problems), tuple(warnings))


def load_paths(paths: Iterable[str | Path], now: datetime | None = None, *, reject_expired: bool = True) -> Loaded:
    """Load files, or every *.yaml/*.yml under a directory (sorted), as one policy: each
    file within FILE limits, all of them together within a revision's."""
    sources: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for raw in paths:
        path = Path(raw)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            try:
                size = file.stat().st_size
                if size > MAX_FILE_BYTES:  # refused without reading it all
                    problems.append(Problem(str(file), 1, "(file)", f"{size} bytes, above the limit of "
                                                                    f"{MAX_FILE_BYTES} bytes (MAX_FILE_BYTES)"))
                    continue
                sources.append((str(file), file.read_text()))
            except (OSError, UnicodeDecodeError) as err:
                problems.append(Problem(str(file), 1, "(file)", f"cannot read: {err}"))
    unreadable = any(p.message.startswith("cannot read") for p in problems)
    loaded = load_many(sources, now, reject_expired=reject_expired)
    total = sum(len(text.encode()) for _, text in sources)
    if total > MAX_REVISION_BYTES:
        problems.append(Problem("(all files)", 1, "(size)", f"{total} bytes together, above the limit of "
                                                            f"{MAX_REVISION_BYTES} bytes (MAX_REVISION_BYTES)"))
    if len(loaded.policy.allowlists) > MAX_ALLOWLISTS_PER_REVISION:
        problems.append(Problem("(all files)", 1, "(count)", f"{len(loaded.policy.allowlists)} allowlists, above the "
                                                             f"limit of {MAX_ALLOWLISTS_PER_REVISION} "
                                                             "(MAX_ALLOWLISTS_PER_REVISION)"))
    return Loaded(loaded.policy, tuple(problems) + loaded.problems, loaded.warnings, unreadable)


def bundle_documents(paths: Iterable[str | Path]) -> str:
    """All documents of the given files as one YAML text, each preceded by its origin."""
    parts = []
    for raw in paths:
        path = Path(raw)
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            parts.append(f"# from {file}\n{file.read_text().strip()}\n")
    return "---\n".join(parts)


def allow_rule_to_dict(rule: AllowRule) -> dict[str, object]:
    """`rule` as the `allow` item that loads back to it: for documents and for `policy diff`
    (one function, so a diff shows every field a document holds)."""
    item: dict[str, object] = {"from": str(rule.source)}
    if rule.methods:
        item["methods"] = list(rule.methods)
    if rule.paths:
        item["paths"] = [str(p) for p in rule.paths]
    if rule.expires:
        item["expires"] = rule.expires.isoformat().replace("+00:00", "Z")
    if rule.windows:
        # One window as a mapping, as most documents write it; several as a list.
        item["when"] = rule.windows[0].to_dict() if len(rule.windows) == 1 else [w.to_dict() for w in rule.windows]
    return item


def to_document(allowlist: Allowlist) -> dict[str, Any]:
    """`allowlist` as the document that loads back to it (the inverse of `_load_one`)."""
    meta = {"name": allowlist.name} | ({"owner": allowlist.owner} if allowlist.owner else {})
    spec: dict[str, Any] = {"destination": str(allowlist.destination)}
    if allowlist.ports:
        spec["ports"] = list(allowlist.ports)
    spec["mode"] = allowlist.mode
    spec["allow"] = [allow_rule_to_dict(r) for r in allowlist.allow]
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": spec}


def dump_documents(allowlists: Iterable[Allowlist], responses: ResponsePolicy | None = None) -> str:
    """The allowlists (and Response documents) as one YAML text of documents (for a revision
    the server composes)."""
    docs = [to_document(a) for a in allowlists]
    docs += [response_document(r) for r in (responses.documents if responses else ())]
    return "".join("---\n" + yaml.safe_dump(d, sort_keys=False) for d in docs)
