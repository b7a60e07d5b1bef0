"""The dependency rules of DESIGN.md, checked on every run so they cannot rot silently.

- one import root: `controlplane/` and `agent/` are imported as `trustmesh.controlplane` and
  `trustmesh.agent` (the links trustmesh/controlplane and trustmesh/agent point at them), never
  as top-level packages;
- the kernel (`trustmesh`) imports neither `trustmesh.controlplane` nor `trustmesh.agent`, except
  `trustmesh.cli`, the composition root;
- `trustmesh.controlplane` and `trustmesh.agent` never import each other;
- only `controlplane/store` knows which storage backend runs (sqlite3, aetcd);
- `controlplane/api` translates protobuf and nothing else: it reaches the store, the CA and the
  audit log only through the domain services, never `trustmesh.controlplane.store`,
  `trustmesh.controlplane.ca` or `trustmesh.controlplane.audit` (the writer) directly;
- the domain (`controlplane/` outside `api/`) never imports grpc or protobuf; only the composition
  root `server.py` wires gRPC servers, and the etcd backend speaks etcd's own protobuf API;
- the web console (`controlplane/console`) is a client of the server's admin and login listeners:
  it imports no domain service, store, CA or audit writer;
- grpclib is only for the agent's unix-socket servers; generated code is only imported, never
  written by hand (its freshness is checked in test_proto.py).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


SIDES = {"controlplane": "trustmesh.controlplane", "agent": "trustmesh.agent"}


def _modules(package: str) -> list[Path]:
    # os.walk does not follow the links trustmesh/controlplane and trustmesh/agent, so each
    # file is checked once, under the folder it really lives in.
    found = []
    for folder, dirs, files in os.walk(ROOT / package):
        dirs[:] = [d for d in dirs if d not in ("_proto", "__pycache__")]
        found += [Path(folder) / f for f in files if f.endswith(".py")]
    return sorted(found)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(package: str, forbidden: set[str], exempt: tuple[str, ...] = ()) -> list[str]:
    bad = []
    for path in _modules(package):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(exempt):
            continue
        for name in _imports(path):
            if any(_within(name, prefix) for prefix in forbidden):
                bad.append(f"{rel} imports {name}")
    return bad


def test_one_import_root() -> None:
    bad = []
    for package in ("trustmesh", "controlplane", "agent", "tests", "benchmarks", "scripts"):
        bad += _violations(package, set(SIDES))
    assert bad == []
    for folder in SIDES:
        link = ROOT / "trustmesh" / folder
        assert link.is_symlink() and link.resolve() == (ROOT / folder).resolve(), f"{link} must link to {folder}/"


def test_kernel_imports_neither_side_except_the_cli() -> None:
    assert _violations("trustmesh", set(SIDES.values()), exempt=("trustmesh/cli/",)) == []


def test_controlplane_never_imports_the_agent() -> None:
    assert _violations("controlplane", {"trustmesh.agent"}) == []


def test_agent_never_imports_the_controlplane() -> None:
    assert _violations("agent", {"trustmesh.controlplane"}) == []


def test_only_the_store_package_knows_the_backend() -> None:
    backends = {"sqlite3", "aetcd"}
    bad = []
    for package in ("trustmesh", "controlplane", "agent"):
        if (ROOT / package).exists():
            bad += _violations(package, backends, exempt=("controlplane/store/",))
    assert bad == []


# What the API layer reaches only through domain services (registration, policy_store,
# federation_admin, partners, ca_admin, audit_query, ...).
API_MAY_NOT_IMPORT = {"trustmesh.controlplane.store", "trustmesh.controlplane.ca", "trustmesh.controlplane.audit"}


def test_the_api_layer_reaches_store_ca_and_audit_only_through_the_domain() -> None:
    assert _violations("controlplane/api", API_MAY_NOT_IMPORT) == []


def test_the_domain_never_imports_grpc_or_protobuf() -> None:
    wire = {"grpc", "grpc_health", "google.protobuf", "trustmesh._proto"}
    # The sync delta is built in its wire form (pages are sized by their encoded bytes, and a
    # stream remembers what it sent as encoded messages), like agent/sync.py on the other side.
    exempt = ("controlplane/api/", "controlplane/server.py", "controlplane/store/etcd.py",
              "controlplane/sync_delta.py", "controlplane/sync_service.py",
              # The console is a gRPC client of the admin and login listeners: admin.py calls them
              # and views.py translates their replies (test below).
              "controlplane/console/admin.py", "controlplane/console/views.py")
    assert _violations("controlplane", wire, exempt=exempt) == []


# The console is a client of the server's listeners, not a way around them: of the server it
# knows only the role table (to skip calls a role cannot make) and the policy diff text.
CONSOLE_MAY_IMPORT = ("trustmesh.controlplane.console", "trustmesh.controlplane.api.calls",
                      "trustmesh.controlplane.policy_store")


def test_the_console_reaches_the_server_only_through_its_listeners() -> None:
    bad = [f"{path.relative_to(ROOT).as_posix()} imports {name}" for path in _modules("controlplane/console")
           for name in _imports(path)
           if _within(name, "trustmesh.controlplane") and not any(_within(name, m) for m in CONSOLE_MAY_IMPORT)]
    assert bad == []
    assert _modules("controlplane/console"), "no console modules found"


def test_the_checker_sees_imports() -> None:
    # Guard against a checker that silently finds nothing (e.g. a wrong ROOT).
    assert _modules("trustmesh"), "no kernel modules found"
    assert "trustmesh.errors" in _imports(ROOT / "trustmesh" / "spiffeid.py")
    assert _violations("controlplane", {"trustmesh.controlplane.store"}), "the checker misses the store imports"
    assert _modules("controlplane/api"), "no API modules found"
    # A prefix is a package, not a string prefix: audit_query is not the audit writer.
    assert not _within("trustmesh.controlplane.audit_query", "trustmesh.controlplane.audit")
    assert _within("trustmesh.controlplane.ca.journal", "trustmesh.controlplane.ca")
    assert not any("controlplane" in p.parts for p in _modules("trustmesh")), "the walk followed a link"
