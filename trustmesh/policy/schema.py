"""The policy files' JSON Schema: what editors check while a person types, and the first
stage of `policy lint`.

`schemas/policy-v1.json` (in the repository; installed beside this module through the
`schemas` link, see pyproject's package-data) describes one document of apiVersion
trustmesh/v1, both kinds. The loader stays the authority: the schema says what it can of the
same rules (types, keys, enums, the SPIFFE ID, method and path grammars, sizes), so a mistake
shows in the editor, and lint reports it with its YAML line and column. What a schema cannot
say is left to the loader: a rule listed twice, names and destinations repeated across
documents, rules already expired, and the file-level limits. tests/unit/test_policy_schema.py
checks that the two agree on generated documents.

The validator keeps the schema's meaning as editors read it: JSON Schema patterns are
ECMA-262 regular expressions, where `$` ends the text (Python's `$` also matches before a
final newline), and JSON has no floats for ports nor NaN for scores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Any

import yaml

# jsonschema ships no type hints (and types-jsonschema is no dependency): its objects are Any here.
from jsonschema import Draft202012Validator, FormatChecker, ValidationError, validators  # type: ignore[import-untyped]
from jsonschema.exceptions import best_match  # type: ignore[import-untyped]
from yaml.nodes import MappingNode, Node, SequenceNode

from trustmesh.clip import shown
from trustmesh.policy.loader import MAX_FILE_BYTES, Loaded, Problem, _parse_time
from trustmesh.policy.strict_yaml import StrictLoader, load_all_strict

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
# Each apiVersion this trustmesh reads, and the file in schemas/ that describes it.
SCHEMA_FILES = {"trustmesh/v1": "policy-v1.json"}

Path_ = tuple[str | int, ...]
_TYPE_WORDS = {"string": "text", "integer": "a whole number", "number": "a number", "boolean": "true or false",
               "array": "a list", "object": "a mapping", "null": "empty"}
_PY_TYPES: dict[str, type | tuple[type, ...]] = {"array": list, "object": dict, "string": str}
_FIELD_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")
# `$` outside a character class (written `\$` inside one in our schemas): the end of the text.
_ECMA_END = re.compile(r"(?<!\\)\$")


class SchemaFileError(Exception):
    """The installed schema is missing or unreadable: a broken installation, not a bad policy."""


@dataclass(frozen=True)
class Finding:
    """A problem or warning of `policy lint`: the loader's Problem (source, document, field,
    message) with where it is in the YAML, and which stage found it."""

    source: str
    document: int  # 1-based
    field: str
    message: str
    line: int | None = None  # 1-based, when the field is in the text
    column: int | None = None
    check: str = "loader"  # "schema": the JSON Schema found it; "loader": only the loader's checks did

    def __str__(self) -> str:
        where = f" (line {self.line}, column {self.column})" if self.line is not None else ""
        return f"{self.source}: document {self.document}: {self.field}: {self.message}{where}"

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class SchemaReport:
    """The schema stage of lint: its findings, and where each field of each document is."""

    findings: list[Finding] = field(default_factory=list)
    # (source, document) -> field path -> (line, column), both 1-based.
    positions: dict[tuple[str, int], dict[Path_, tuple[int, int]]] = field(default_factory=dict)

    def locate(self, source: str, document: int, field_name: str) -> tuple[int, int] | None:
        """Where `field_name` is (a missing field: where its nearest parent is), if known."""
        marks = self.positions.get((source, document))
        if marks is None:
            return None
        path = field_path(field_name)
        if path is None:
            return marks.get(()) if field_name in ("(document)", "(file)") else None
        while path not in marks and path:
            path = path[:-1]
        return marks.get(path)


def field_name(path: Iterable[str | int]) -> str:
    """The loader's name of a field: spec.allow[0].from."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(document)"


def field_path(name: str) -> Path_ | None:
    """The inverse of field_name, or None for names that are no field ("line 6", "(file)")."""
    if not name or name.startswith("("):
        return None
    parts: list[str | int] = []
    pos = 0
    for match in _FIELD_PART.finditer(name):
        if match.start() not in (pos, pos + 1):
            return None
        key, index = match.groups()
        parts.append(int(index) if index is not None else key)
        pos = match.end()
    return tuple(parts) if pos == len(name) and " " not in name else None


# --- the validator -------------------------------------------------------------------------

def _is_integer(_checker: object, instance: object) -> bool:
    # The loader takes a whole number only as a YAML integer: 9443.0 is no port.
    return isinstance(instance, int) and not isinstance(instance, bool)


def _is_number(_checker: object, instance: object) -> bool:
    # JSON has no NaN or infinity, and the loader's ranges refuse them (NaN compares false).
    return isinstance(instance, int | float) and not isinstance(instance, bool) and math.isfinite(instance)


@cache
def _ecma(pattern: str) -> re.Pattern[str]:
    return re.compile(_ECMA_END.sub(r"\\Z", pattern))


def _pattern(validator: Any, pattern: str, instance: object, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if isinstance(instance, str) and not _ecma(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _date_time(instance: object) -> bool:
    # The loader's own reading of a time, so lint and the loader never disagree on one.
    if isinstance(instance, str):
        _parse_time(instance)
    return True


_FORMATS = FormatChecker(formats=())
_FORMATS.checks("date-time", raises=ValueError)(_date_time)


_PolicyValidator = validators.extend(
    Draft202012Validator, {"pattern": _pattern},
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many({"integer": _is_integer, "number": _is_number}))


def schema_path(api_version: str) -> Path:
    return SCHEMA_DIR / SCHEMA_FILES[api_version]


@cache
def load_schema(api_version: str) -> dict[str, Any]:
    """The schema of `api_version` (a key of SCHEMA_FILES)."""
    path = schema_path(api_version)
    try:
        schema: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SchemaFileError(f"cannot read the policy schema {path}: {err}; reinstall trustmesh") from err
    return schema


@cache
def _validator(api_version: str) -> Any:
    schema = load_schema(api_version)
    _PolicyValidator.check_schema(schema)
    return _PolicyValidator(schema, format_checker=_FORMATS)


# --- YAML to JSON, with positions ------------------------------------------------------------

def _json_value(loader: StrictLoader, node: Node, path: Path_, marks: dict[Path_, tuple[int, int]]) -> Any:
    """`node` as the JSON value an editor's YAML language server sees (a time stays text),
    recording where every mapping key and list item is."""
    if isinstance(node, MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(loader.construct_object(key_node, deep=True))
            marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            out[key] = _json_value(loader, value_node, path + (key,), marks)
        return out
    if isinstance(node, SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            marks[path + (i,)] = (item.start_mark.line + 1, item.start_mark.column + 1)
            items.append(_json_value(loader, item, path + (i,), marks))
        return items
    value = loader.construct_object(node, deep=True)
    if isinstance(value, datetime | date):
        # An unquoted time is a YAML 1.1 timestamp; checked in its one canonical form, so the
        # loose forms YAML 1.1 reads (2026-1-5 1:00:00Z) are judged by the value they mean.
        return value.isoformat()
    return value


def _documents(text: str, source: str) -> list[tuple[Any, dict[Path_, tuple[int, int]]]] | None:
    """Each document of `text` as JSON with its positions, or None when the strict loader refuses
    the text (the loader then reports why, with the line)."""
    try:
        load_all_strict(text, source)
    except (yaml.YAMLError, ValueError):  # ValueError: a timestamp out of range (2026-13-01T00:00:00Z)
        return None
    loader = StrictLoader(text, source)
    out: list[tuple[Any, dict[Path_, tuple[int, int]]]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            marks: dict[Path_, tuple[int, int]] = {(): (node.start_mark.line + 1, node.start_mark.column + 1)}
            out.append((_json_value(loader, node, (), marks), marks))
            loader.constructed_objects = {}
    finally:
        loader.dispose()
    return out


# --- findings ------------------------------------------------------------------------------

def _message(error: ValidationError) -> str:
    """One plain sentence for a schema error (its field is said apart)."""
    schema = error.schema if isinstance(error.schema, dict) else {}
    value, keyword = error.instance, error.validator
    if "errorMessage" in schema:
        return str(schema["errorMessage"])
    if keyword == "type":
        wanted = error.validator_value if isinstance(error.validator_value, list) else [error.validator_value]
        return f"must be {' or '.join(_TYPE_WORDS.get(str(t), str(t)) for t in wanted)}, got {_kind(value)}"
    if keyword == "pattern":
        return f"{shown(str(value))} {schema.get('patternErrorMessage', 'is not in the expected form')}"
    if keyword == "format":
        return f"{shown(str(value))} is not a time: write it as 2026-12-31T00:00:00Z"
    if keyword == "enum":
        return f"must be {' or '.join(map(repr, error.validator_value))}, got {_shown_value(value)}"
    if keyword == "const":
        return f"must be {error.validator_value!r}, got {_shown_value(value)}"
    if keyword in ("minimum", "maximum"):
        return f"{_shown_value(value)} is out of range: from {schema.get('minimum')} to {schema.get('maximum')}"
    if keyword == "minItems":
        return "must not be empty" if error.validator_value == 1 else f"needs at least {error.validator_value} items"
    if keyword == "maxItems":
        return f"{len(value)} items, above the limit of {error.validator_value}"
    if keyword == "uniqueItems":
        return "lists the same item twice"
    if keyword == "minLength":
        return "must not be empty"
    if keyword == "maxLength":
        return f"{len(value)} characters, above the limit of {error.validator_value}"
    return str(error.message)


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (true/false)"
    if isinstance(value, int | float):
        return f"the number {_shown_value(value)}"
    if isinstance(value, str):
        return f"the text {shown(value)}"
    return "a list" if isinstance(value, list) else "a mapping"


def _shown_value(value: object) -> str:
    return shown(value) if isinstance(value, str) else shown(json.dumps(value, default=str))[1:-1]


def _leaves(error: ValidationError) -> Iterator[ValidationError]:
    """The errors to report for `error`: for anyOf/oneOf without a message of their own, the
    alternative that came closest."""
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator in ("anyOf", "oneOf") and "errorMessage" not in schema and error.context:
        # The alternative written for this type of value says best what is wrong inside it.
        typed = [i for i, alt in enumerate(error.validator_value)
                 if isinstance(alt, dict) and isinstance(error.instance, _PY_TYPES.get(alt.get("type", ""), ()))]
        if len(typed) == 1:
            for sub in error.context:
                if sub.relative_schema_path and sub.relative_schema_path[0] == typed[0]:
                    yield from _leaves(sub)
            return
        best = best_match(error.context)
        if best is not None:
            yield from _leaves(best)
            return
    yield error


def _schema_findings(instance: Any, source: str, index: int,
                     marks: dict[Path_, tuple[int, int]]) -> list[Finding]:
    api_version = instance.get("apiVersion") if isinstance(instance, dict) else None
    if isinstance(instance, dict) and "apiVersion" in instance and not (
            isinstance(api_version, str) and api_version in SCHEMA_FILES):
        line, column = marks.get(("apiVersion",), (None, None))
        return [Finding(source, index, "apiVersion",
                        f"unknown apiVersion {_shown_value(api_version)}; this trustmesh knows "
                        f"{', '.join(SCHEMA_FILES)} (write apiVersion: {next(iter(SCHEMA_FILES))})",
                        line, column, "schema")]
    validator = _validator(api_version if isinstance(api_version, str) else next(iter(SCHEMA_FILES)))
    findings: list[Finding] = []

    def add(path: Path_, message: str, at: Path_ | None = None) -> None:
        line, column = marks.get(path if at is None else at, (None, None))
        findings.append(Finding(source, index, field_name(path), message, line, column, "schema"))

    errors = sorted(validator.iter_errors(instance), key=lambda e: [str(p) for p in e.absolute_path])
    for top in errors:
        for error in _leaves(top):
            path = tuple(error.absolute_path)
            if error.validator == "additionalProperties" and isinstance(error.instance, dict):
                allowed = sorted(error.schema.get("properties", {}))
                for key in sorted(k for k in error.instance if k not in allowed):
                    add(path + (key,), f"unknown key; allowed here: {', '.join(allowed)}")
            elif error.validator == "uniqueItems" and isinstance(error.instance, list):
                # Named by the repeat, as the loader names it.
                seen: list[Any] = []
                for i, item in enumerate(error.instance):
                    if any(item == other and type(item) is type(other) for other in seen):
                        add(path + (i,), f"{_shown_value(item)} is listed twice")
                        break
                    seen.append(item)
            elif error.validator == "required" and isinstance(error.instance, dict):
                for name in error.validator_value:
                    if name not in error.instance:
                        add(path + (name,), "is required", at=path)
            else:
                add(path, _message(error))
    unique: dict[str, Finding] = {}
    for finding in findings:
        unique.setdefault(finding.field, finding)  # one per field: a bad time fails its pattern and its format
    return list(unique.values())


def check_text(text: str, source: str, report: SchemaReport | None = None) -> SchemaReport:
    """Check every document of one text against the schema of its apiVersion."""
    report = report if report is not None else SchemaReport()
    documents = _documents(text, source)
    for index, (instance, marks) in enumerate(documents or [], start=1):
        if instance is None:
            continue  # an empty document: nothing to check (the loader skips it too)
        report.positions[(source, index)] = marks
        report.findings.extend(_schema_findings(instance, source, index, marks))
    return report


def policy_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files `load_paths` reads: each file given, and every *.yaml/*.yml under a directory."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        files += sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    return files


def check_paths(paths: Iterable[str | Path]) -> SchemaReport:
    """The schema stage over files; a file that cannot be read is left to the loader to report."""
    report = SchemaReport()
    for file in policy_files(paths):
        try:
            if file.stat().st_size > MAX_FILE_BYTES:
                continue
            text = file.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        check_text(text, str(file), report)
    return report


def lint_findings(report: SchemaReport, loaded: Loaded) -> tuple[list[Finding], list[Finding]]:
    """(problems, warnings) of lint: the schema's findings first, then the loader's.

    Where both name the same field, one finding is kept, with the loader's message (it knows
    more: "methods are case-sensitive; use GET") and the schema's position; an unknown
    apiVersion keeps the schema's message, which names every version this trustmesh knows."""
    waiting: dict[tuple[str, int, str], list[int]] = {}
    for i, problem in enumerate(loaded.problems):
        waiting.setdefault((problem.source, problem.document, problem.field), []).append(i)
    merged: set[int] = set()
    problems: list[Finding] = []
    for finding in report.findings:
        same = waiting.get((finding.source, finding.document, finding.field))
        if same:
            i = same.pop(0)
            merged.add(i)
            if finding.field != "apiVersion":
                finding = Finding(finding.source, finding.document, finding.field, loaded.problems[i].message,
                                  finding.line, finding.column, "schema")
        problems.append(finding)
    problems += [_located(report, p) for i, p in enumerate(loaded.problems) if i not in merged]
    return problems, [_located(report, w) for w in loaded.warnings]


def _located(report: SchemaReport, problem: Problem) -> Finding:
    line, column = report.locate(problem.source, problem.document, problem.field) or (None, None)
    return Finding(problem.source, problem.document, problem.field, problem.message, line, column, "loader")
