"""The service graph (`trustmesh graph`): identities and unverified addresses as nodes, one
edge per (source, destination, decision) carrying its ports and sums, as JSON, Graphviz DOT or
Mermaid. The texts are built here, not by a library: every name in them is a SPIFFE ID or an
address an agent reported, so each is quoted for its format and nothing else is interpolated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from trustmesh.clock import format_utc
from trustmesh.flows import Flow

FORMATS = ("json", "dot", "mermaid")
# Edge styles per decision, in both renderings: denials and audit-mode traffic stand out.
_DOT_STYLE = {"allow": 'color="#2e7d32"', "audit": 'color="#ef6c00", style=dashed',
              "deny": 'color="#c62828", style=bold', "unverified": 'color="#6a1b9a", style=dotted'}
_MERMAID_ARROW = {"allow": "-->", "audit": "-.->", "deny": "--x", "unverified": "-.->"}


def node_of_source(flow: Flow) -> str:
    """A flow's calling node: its SPIFFE ID, or `unverified:<address>` for a plaintext caller."""
    return flow.source or f"unverified:{flow.source_address or 'unknown'}"


@dataclass
class Edge:
    source: str
    destination: str
    decision: str
    ports: set[int] = field(default_factory=set)
    connections: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    first_seen: float = 0.0
    last_seen: float = 0.0

    def add(self, flow: Flow) -> None:
        self.ports.add(flow.port)
        self.connections += flow.connections
        self.bytes_in += flow.bytes_in
        self.bytes_out += flow.bytes_out
        self.first_seen = min(self.first_seen or flow.first_seen, flow.first_seen)
        self.last_seen = max(self.last_seen, flow.last_seen)

    @property
    def label(self) -> str:
        ports = ",".join(str(p) for p in sorted(self.ports))
        return f"{self.decision} :{ports} x{self.connections}"


@dataclass(frozen=True)
class Graph:
    nodes: list[tuple[str, str]]  # (id, kind: identity | unverified), sorted
    edges: list[Edge]


def build(flows: list[Flow]) -> Graph:
    edges: dict[tuple[str, str, str], Edge] = {}
    for flow in flows:
        key = (node_of_source(flow), flow.destination, flow.decision)
        edges.setdefault(key, Edge(*key)).add(flow)
    names = {e.source for e in edges.values()} | {e.destination for e in edges.values()}
    nodes = sorted((n, "unverified" if n.startswith("unverified:") else "identity") for n in names)
    return Graph(nodes, sorted(edges.values(), key=lambda e: (e.source, e.destination, e.decision)))


def to_json(graph: Graph) -> str:
    return json.dumps({
        "nodes": [{"id": n, "kind": kind} for n, kind in graph.nodes],
        "edges": [{"source": e.source, "destination": e.destination, "decision": e.decision,
                   "ports": sorted(e.ports), "connections": e.connections, "bytes_in": e.bytes_in,
                   "bytes_out": e.bytes_out, "first_seen": format_utc(e.first_seen),
                   "last_seen": format_utc(e.last_seen)} for e in graph.edges]}, indent=2)


def _dot_quote(text: str) -> str:
    # A DOT quoted string ends only at an unescaped '"'; backslashes and newlines are escaped too.
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(graph: Graph) -> str:
    lines = ["digraph trustmesh {", "  rankdir=LR;", '  node [shape=box, style=rounded, fontname="Helvetica"];',
             '  edge [fontname="Helvetica", fontsize=10];']
    for name, kind in graph.nodes:
        extra = ", shape=ellipse, style=dashed" if kind == "unverified" else ""
        lines.append(f"  {_dot_quote(name)} [label={_dot_quote(name)}{extra}];")
    for e in graph.edges:
        lines.append(f"  {_dot_quote(e.source)} -> {_dot_quote(e.destination)} "
                     f"[label={_dot_quote(e.label)}, {_DOT_STYLE[e.decision]}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _mermaid_text(text: str) -> str:
    # Inside a Mermaid "…" label, a double quote or markup is written as an entity code.
    return text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")


def to_mermaid(graph: Graph) -> str:
    ids = {name: f"n{i}" for i, (name, _) in enumerate(graph.nodes)}
    lines = ["flowchart LR"]
    for name, kind in graph.nodes:
        shape = ('(["', '"])') if kind == "unverified" else ('["', '"]')
        lines.append(f"  {ids[name]}{shape[0]}{_mermaid_text(name)}{shape[1]}")
    for e in graph.edges:
        lines.append(f'  {ids[e.source]} {_MERMAID_ARROW[e.decision]}|"{_mermaid_text(e.label)}"| '
                     f"{ids[e.destination]}")
    return "\n".join(lines) + "\n"


def render(graph: Graph, form: str) -> str:
    return {"json": to_json, "dot": to_dot, "mermaid": to_mermaid}[form](graph)
