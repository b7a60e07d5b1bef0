"""The one strict YAML loader: what a policy file says is what it means, or it is refused.

PyYAML's SafeLoader follows YAML 1.1: a repeated key silently replaces the first (`mode:
enforce` then `mode: audit`), `010` is 8, `1:20` is 80, `yes` is True, and an alias bomb
of a few hundred bytes expands to megabytes. This loader refuses all of that, with the
line, while composing, so no limit is ever discovered by expanding a document first:

- duplicate keys in any mapping;
- anchors (`&a`), aliases (`*a`) and merge keys (`<<`);
- explicit tags other than the core ones (str, int, float, bool, null, seq, map);
- plain scalars YAML 1.1 reads as a number or boolean that is not a plain decimal
  (`010`, `0x1f`, `1:20`, `1_000`, `yes`, `off`): write the decimal, or quote it;
- nesting deeper than MAX_DEPTH (checked on each node before descending, so a 50,000-deep
  document is one line, not a RecursionError) and scalars longer than MAX_SCALAR_CHARS.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.events import AliasEvent, CollectionStartEvent, NodeEvent, ScalarEvent
from yaml.nodes import MappingNode, Node

MAX_DEPTH = 20  # an Allowlist needs 5 (document, spec, allow, rule, value)
MAX_SCALAR_CHARS = 4096  # a SPIFFE ID is at most 2048 bytes

_CORE = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL, SEQ, MAP = (_CORE + t for t in ("str", "int", "float", "bool", "null", "seq", "map"))
TIMESTAMP = _CORE + "timestamp"
CORE_TAGS = frozenset({STR, INT, FLOAT, BOOL, NULL, SEQ, MAP})

# The core schema's scalars: decimal integers, plain floats, true/false, null.
_STRICT_SCALARS: tuple[tuple[str, str, list[str]], ...] = (
    (BOOL, r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    (INT, r"^[-+]?(?:0|[1-9][0-9]*)$", list("-+0123456789")),
    (FLOAT, r"^(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+][0-9]+)?|[-+]?\.[0-9]+(?:[eE][-+][0-9]+)?"
            r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", list("-+0123456789.")),
    (NULL, r"^(?:~|null|Null|NULL|)$", [*"~nN", ""]),
)


class StrictYamlError(yaml.MarkedYAMLError):  # type: ignore[misc]  # PyYAML has no types
    """A document this loader refuses; `problem_mark` says where."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


def _yaml11_tag(value: str) -> str | None:
    """The tag PyYAML's default (YAML 1.1) resolver gives a plain scalar."""
    for tag, regexp in yaml.resolver.Resolver.yaml_implicit_resolvers.get(value[:1], []):
        if regexp.match(value):
            return str(tag)
    return None


class StrictLoader(yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader with the refusals above. Use `load_all_strict`, which disposes of it."""

    yaml_implicit_resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}

    def __init__(self, stream: str, name: str = "<text>") -> None:
        super().__init__(stream)
        self.name = name
        self.depth = 0
        self.document_index = 0  # 1-based index of the document being composed

    def compose_document(self) -> Node | None:
        self.document_index += 1
        self.depth = 0
        return super().compose_document()

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise StrictYamlError(f"aliases (*{event.anchor}) are not allowed; write the value out",
                                  event.start_mark)
        if isinstance(event, NodeEvent) and event.anchor is not None:
            raise StrictYamlError(f"anchors (&{event.anchor}) are not allowed; write the value out",
                                  event.start_mark)
        if self.depth >= MAX_DEPTH:
            raise StrictYamlError(f"nested deeper than the limit of {MAX_DEPTH} levels (MAX_DEPTH)",
                                  event.start_mark)
        if isinstance(event, ScalarEvent | CollectionStartEvent):
            self._check_tag(event)
        if isinstance(event, ScalarEvent):
            self._check_scalar(event)
        self.depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def _check_tag(self, event: ScalarEvent | CollectionStartEvent) -> None:
        tag = event.tag
        if tag is None:
            return
        if tag not in CORE_TAGS:
            raise StrictYamlError(f"tag {tag!r} is not allowed; only the core tags "
                                  "(!!str, !!int, !!float, !!bool, !!null, !!seq, !!map)", event.start_mark)
        kind = SEQ if isinstance(event, yaml.SequenceStartEvent) else MAP if isinstance(event, yaml.MappingStartEvent) \
            else None
        if kind is not None and tag != kind:
            raise StrictYamlError(f"tag {tag!r} does not fit a {'sequence' if kind == SEQ else 'mapping'}",
                                  event.start_mark)
        if kind is None and tag in (INT, FLOAT, BOOL, NULL) and self._strict_tag(event.value) != tag:
            raise StrictYamlError(f"{event.value!r} is not a core {tag.removeprefix(_CORE)}", event.start_mark)
        if kind is None and tag in (SEQ, MAP):
            raise StrictYamlError(f"tag {tag!r} does not fit a scalar", event.start_mark)

    def _strict_tag(self, value: str) -> str:
        return str(self.resolve(yaml.ScalarNode, value, (True, False)))

    def _check_scalar(self, event: ScalarEvent) -> None:
        if len(event.value) > MAX_SCALAR_CHARS:
            raise StrictYamlError(f"a value of {len(event.value)} characters is above the limit of "
                                  f"{MAX_SCALAR_CHARS} (MAX_SCALAR_CHARS)", event.start_mark)
        if event.tag is not None or event.style is not None:
            return  # tagged or quoted: no implicit reading
        old = _yaml11_tag(event.value)
        if old in (INT, FLOAT, BOOL) and old != self._strict_tag(event.value):
            meant = yaml.safe_load(event.value)
            hint = "write true or false" if old == BOOL else "write a plain decimal number"
            raise StrictYamlError(f"{event.value!r} is ambiguous (YAML 1.1 reads it as {meant!r}); "
                                  f"{hint}, or quote it to mean text", event.start_mark)

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                seen = key in first
            except TypeError:
                raise StrictYamlError("a key must be a scalar, not a list or mapping", key_node.start_mark) from None
            if seen:
                raise StrictYamlError(f"duplicate key {key!r} (first at line {first[key] + 1}); keep one",
                                      key_node.start_mark)
            first[key] = key_node.start_mark.line
        mapping: dict[Any, Any] = super().construct_mapping(node, deep)
        return mapping

    def construct_yaml_timestamp(self, node: Node) -> Any:
        # The resolver matches the shape only: month 13 or 31 November reach datetime(), whose
        # ValueError would escape as an internal error instead of a problem at its line.
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as err:
            raise StrictYamlError(f"{node.value!r} is not a valid time ({err})", node.start_mark) from None


StrictLoader.add_constructor(TIMESTAMP, StrictLoader.construct_yaml_timestamp)


for _tag, _pattern, _first in _STRICT_SCALARS:
    StrictLoader.add_implicit_resolver(_tag, re.compile(_pattern), _first)
# Times stay as in YAML 1.1 (`expires: 2026-12-31T00:00:00Z`); there is no merge key (`<<`).
for _first, _resolvers in yaml.resolver.Resolver.yaml_implicit_resolvers.items():
    for _tag, _regexp in _resolvers:
        if _tag == TIMESTAMP:
            StrictLoader.add_implicit_resolver(_tag, _regexp, [_first])


def load_all_strict(text: str, name: str) -> list[Any]:
    """Every document of `text` (None for an empty one). Raises yaml.YAMLError; a
    StrictYamlError or other MarkedYAMLError carries the line, `document_of` the index."""
    loader = StrictLoader(text, name)
    try:
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        return documents
    except yaml.YAMLError as err:
        err.document = max(loader.document_index, 1)
        raise
    finally:
        loader.dispose()


def describe(err: yaml.YAMLError) -> tuple[int, int | None, str]:
    """(document, line or None, one-line message) for an error from `load_all_strict`."""
    document = int(getattr(err, "document", 1))
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        text = "; ".join(p for p in (err.context, err.problem) if p)
        if not isinstance(err, StrictYamlError):
            text = f"not valid YAML: {text}"
        return document, (mark.line + 1 if mark else None), text
    return document, None, "not valid YAML: " + " ".join(str(err).split())
