"""Allowlists through the real CLI and server: lint/test in CI, apply, diff, history,
rollback, refusals that change nothing, and push to connected agents."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc

from tests.integration.harness import ServerProcess
from tests.integration.node_client import NodeClient
from tests.unit.test_policy_store import large_allowlist
from tests.unit.test_policy_strict import BOMB
from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc
from trustmesh.policy.wire import policy_from_pb

DOC = """\
apiVersion: trustmesh/v1
kind: Allowlist
metadata: {{name: ledger-access, owner: payments-platform}}
spec:
  destination: spiffe://example.org/ledger
  ports: [9443]
  allow:
{rules}
"""


def write(path: Path, *sources: str) -> Path:
    path.write_text(DOC.format(rules="".join(f"    - from: {s}\n" for s in sources)))
    return path


def test_lint_and_test_work_on_files_without_a_server(tmp_path: Path) -> None:
    server = ServerProcess(data_dir=tmp_path / "none")
    good = write(tmp_path / "good.yaml", "spiffe://example.org/payments")
    bad = tmp_path / "bad.yaml"
    bad.write_text(DOC.format(rules="    - from: not-an-id\n").replace("ports: [9443]", "ports: [99999]"))
    ok = server.cli("policy", "lint", str(good))
    assert ok.returncode == 0 and "ok: 1 allowlist" in ok.stdout
    lint = server.cli("policy", "lint", str(tmp_path))
    assert lint.returncode == 1
    assert "bad.yaml: document 1: spec.ports[0]" in lint.stdout and "spec.allow[0].from" in lint.stdout
    allow = server.cli("policy", "test", str(good), "--from", "spiffe://example.org/payments",
                       "--to", "spiffe://example.org/ledger", "--port", "9443")
    assert allow.returncode == 0 and allow.stdout.startswith("ALLOW  ledger-access allow[0]")
    deny = server.cli("policy", "test", str(good), "--from", "spiffe://example.org/frontend",
                      "--to", "spiffe://example.org/ledger", "--port", "9443")
    assert deny.returncode == 1 and deny.stdout.startswith("DENY  default deny")


def test_apply_diff_history_rollback_and_refusals(server: ServerProcess, tmp_path: Path) -> None:
    first = write(tmp_path / "p.yaml", "spiffe://example.org/payments")
    assert "applied as revision 1" in server.cli("policy", "apply", str(first), "--comment", "first", check=True).stdout
    assert "no change" in server.cli("policy", "apply", str(first), check=True).stdout
    write(first, "spiffe://example.org/payments", "spiffe://example.org/ns/batch/*")
    diff = server.cli("policy", "diff", str(first), check=True).stdout
    assert "+- from: spiffe://example.org/ns/batch/*" in diff
    assert "applied as revision 2" in server.cli("policy", "apply", str(first), check=True).stdout
    # A bad file never reaches the server, and the server refuses bad text on its own too.
    bad = tmp_path / "bad.yaml"
    bad.write_text(DOC.format(rules="    - from: spiffe://Example.org/x\n"))
    refused = server.cli("policy", "apply", str(bad))
    assert refused.returncode == 1 and "nothing was sent" in refused.stderr
    history = server.cli("policy", "history", check=True).stdout
    assert history.count("\n") == 2 and "first" in history
    test_server = server.cli("policy", "test", "--from", "spiffe://example.org/ns/batch/job",
                             "--to", "spiffe://example.org/ledger", "--port", "9443")
    assert test_server.returncode == 0, test_server.stdout + test_server.stderr
    assert (
        "revision 3 now holds the documents of revision 1" in server.cli("policy", "rollback", "1", check=True).stdout
    )
    shown = server.cli("policy", "show", check=True).stdout
    assert "revision 3" in shown and "ns/batch" not in shown
    stale = server.cli("policy", "apply", str(first), "--expected-revision", "1")
    assert stale.returncode == 1 and "ABORTED" in stale.stderr
    audit = server.cli("audit", "show", "--json", check=True).stdout
    assert '"policy.apply"' in audit and '"policy.rollback"' in audit and '"denied"' in audit


async def test_a_new_revision_is_pushed_to_connected_agents(server: ServerProcess, tmp_path: Path) -> None:
    agent = NodeClient(server)
    await agent.attest(server.cli("token", "create", "--node", "node-1", check=True).stdout.strip())
    server.cli(
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/ledger",
        "--node",
        "node-1",
        "--selector",
        "unix:uid:1000",
        check=True,
    )
    async with agent.channel() as channel:
        call = node_pb2_grpc.NodeStub(channel).Sync(node_pb2.SyncRequest())
        snapshot = await asyncio.wait_for(call.read(), 10)
        assert policy_from_pb(snapshot.snapshot.policy).allowlists == ()
        path = write(tmp_path / "p.yaml", "spiffe://example.org/payments")
        server.cli("policy", "apply", str(path), check=True)
        applied = time.monotonic()
        delta = await asyncio.wait_for(call.read(), 10)
        assert time.monotonic() - applied < 1.0
        policy = policy_from_pb(delta.delta.policy)
        assert [a.name for a in policy.allowlists] == ["ledger-access"] and policy.revision == 1
        # An allowlist for a service this node does not run is not sent to it.
        other = tmp_path / "other.yaml"
        other.write_text(
            DOC.format(rules="    - from: spiffe://example.org/payments\n")
            .replace("ledger-access", "reports")
            .replace("/ledger", "/reports")
        )
        server.cli("policy", "apply", str(path), str(other), check=True)
        delta = await asyncio.wait_for(call.read(), 10)
        pushed = policy_from_pb(delta.delta.policy)
        assert pushed.revision == 2 and [a.name for a in pushed.allowlists] == ["ledger-access"]
        call.cancel()


async def test_hostile_policies_are_refused_and_the_previous_revision_stays(server: ServerProcess,
                                                                           tmp_path: Path) -> None:
    good = write(tmp_path / "p.yaml", "spiffe://example.org/payments")
    server.cli("policy", "apply", str(good), check=True)
    # Straight to the server, as a client that skips the CLI's own checks would send them.
    hostile = {"alias bomb": BOMB, "50,000-deep nesting": "[" * 50_000 + "]" * 50_000,
               "duplicate mode": good.read_text().replace("spec:\n", "spec:\n  mode: enforce\n  mode: audit\n")}
    async with server.admin_channel() as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        for what, documents in hostile.items():
            try:
                await stub.ApplyPolicy(admin_pb2.ApplyPolicyRequest(documents=documents, author="mallory"))
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.details())
                assert "nothing was applied" in (err.details() or ""), what
            else:
                raise AssertionError(f"{what} was applied")
    # Files that each pass lint but together compile to more than any node may be sent.
    big = tmp_path / "big"
    big.mkdir()
    for name in ("a", "b"):
        (big / f"{name}.yaml").write_text(large_allowlist(name))
    assert server.cli("policy", "lint", str(big)).returncode == 0
    refused = server.cli("policy", "apply", str(big))
    assert refused.returncode == 1
    assert "above the limit of 1048576 bytes (MAX_COMPILED_POLICY_BYTES)" in refused.stderr
    assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    (tmp_path / "empty").mkdir()
    empty = server.cli("policy", "apply", str(tmp_path / "empty"))
    assert empty.returncode == 1 and "pass --allow-empty to deny everything deliberately" in empty.stderr
    assert server.cli("policy", "history", check=True).stdout.count("\n") == 1
    still = server.cli("policy", "test", "--from", "spiffe://example.org/payments",
                       "--to", "spiffe://example.org/ledger", "--port", "9443")
    assert still.returncode == 0 and "ledger-access" in still.stdout
