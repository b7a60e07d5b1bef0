"""The dependency rules of DESIGN.md, checked on every run so they cannot rot silently.

- the kernel (`trustmesh`) imports neither `controlplane` nor `agent`, except `trustmesh.cli`,
  the composition root;
- `controlplane` and `agent` never import each other;
- only `controlplane/store` knows which storage backend runs (sqlite3, aetcd);
- grpclib is only for the agent's unix-socket servers; generated code is only imported, never
  written by hand (its freshness is checked in test_proto.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "_proto" not in p.parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _violations(package: str, forbidden: set[str], exempt: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in _modules(package):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(exempt):
            continue
        for name in _imports(path):
            if _top(name) in forbidden:
                bad.append(f"{rel} imports {name}")
    return bad


def test_kernel_imports_neither_side_except_the_cli() -> None:
    assert _violations("trustmesh", {"controlplane", "agent"}, exempt=("trustmesh/cli/",)) == []


def test_controlplane_never_imports_the_agent() -> None:
    assert _violations("controlplane", {"agent"}) == []


@pytest.mark.skipif(not (ROOT / "agent").exists(), reason="agent package not written yet")
def test_agent_never_imports_the_controlplane() -> None:
    assert _violations("agent", {"controlplane"}) == []


def test_only_the_store_package_knows_the_backend() -> None:
    backends = {"sqlite3", "aetcd"}
    bad = []
    for package in ("trustmesh", "controlplane", "agent"):
        if (ROOT / package).exists():
            bad += _violations(package, backends, exempt=("controlplane/store/",))
    assert bad == []


def test_the_checker_sees_imports() -> None:
    # Guard against a checker that silently finds nothing (e.g. a wrong ROOT).
    assert _modules("trustmesh"), "no kernel modules found"
    assert "trustmesh.errors" in _imports(ROOT / "trustmesh" / "spiffeid.py")
