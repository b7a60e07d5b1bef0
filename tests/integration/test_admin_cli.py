"""The admin CLI against the real server (SQLite and etcd): join tokens, entries, agents,
every validation refusal, hostile input on the Admin API, and the CLI's own errors.
(The audit commands have their own file, test_audit_cli.py.)"""

from __future__ import annotations

import asyncio
import hashlib
import json
import string
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.integration.harness import ServerProcess
from tests.integration.node_client import NodeClient
from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, types_pb2
from trustmesh.controlplane.store import Store, open_store

TD = "example.org"


def _entries(server: ServerProcess, *args: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(server.cli("entry", "list", "--json", *args, check=True).stdout)
    return data


def _audit(server: ServerProcess, kind: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = json.loads(server.cli("audit", "show", "--kind", kind, "--json", check=True).stdout)
    return data


async def _all_stored_bytes(store_url: str, data_dir: Path) -> list[tuple[str, bytes]]:
    store: Store = await open_store(store_url, data_dir)
    try:
        return [(kv.key, kv.value) for kv in await store._kv.range("")]  # noqa: SLF001 - reading raw on purpose
    finally:
        await store.close()


# --- join tokens ----------------------------------------------------------------------------


def test_token_create_prints_only_a_strong_token_stored_hashed(server: ServerProcess) -> None:
    first = server.cli("token", "create", "--node", "node-1", check=True)
    second = server.cli("token", "create", "--node", "node-1", "--ttl", "1h", check=True)
    assert first.stdout.count("\n") == 1 and first.stderr == ""
    token, other = first.stdout.strip(), second.stdout.strip()
    assert token != other
    assert token.startswith("tmjt_")  # never starts with "-", so it is safe on a command line
    body = token.removeprefix("tmjt_")
    assert len(body) >= 43 and set(body) <= set(string.ascii_letters + string.digits + "-_")  # 256 bits, urlsafe
    server.stop()
    stored = asyncio.run(_all_stored_bytes(server.store, server.data_dir))
    digest = hashlib.sha256(token.encode()).hexdigest()
    assert any(digest in key for key, _ in stored), "positive control: the hash is what is stored"
    for key, value in stored:
        assert token not in key and token.encode() not in value, key
        assert body not in key and body.encode() not in value, key
    for path in server.data_dir.glob("store.db*"):  # SQLite: not in the files either (WAL included)
        assert body.encode() not in path.read_bytes()


def test_token_refusals(server: ServerProcess) -> None:
    for args, message in (
        (["--node", "bad name"], "invalid node name"),
        (["--node", "x" * 200], "invalid node name"),
        (["--node", "n1", "--ttl", "30s"], "1m to 7d"),
        (["--node", "n1", "--ttl", "8d"], "1m to 7d"),
    ):
        result = server.cli("token", "create", *args)
        assert result.returncode == 1 and message in result.stderr and result.stdout == "", (args, result)
        assert "INVALID_ARGUMENT" in result.stderr
    for args, message in ((["--node", "n1", "--ttl", "0"], "at least 1m"),
                          (["--node", "n1", "--ttl", "soon"], "invalid duration")):
        result = server.cli("token", "create", *args)  # refused by the CLI, before any call
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert [e["outcome"] for e in _audit(server, "token.create")] == ["denied"] * 4


# --- entries -------------------------------------------------------------------------------

SEL = ["--selector", "unix:uid:1"]
REFUSED = [
    (["--spiffe-id", "not-an-id", "--node", "n1", *SEL], "invalid SPIFFE ID"),
    (["--spiffe-id", "spiffe://partner.example/x", "--node", "n1", *SEL], "trust domain"),
    (["--spiffe-id", "spiffe://example.org/agent/x", "--node", "n1", *SEL], "reserved"),
    (["--spiffe-id", "spiffe://example.org/trustmesh/server", "--node", "n1", *SEL], "reserved"),
    (["--spiffe-id", "spiffe://example.org", "--node", "n1", *SEL], "has no path"),
    (["--spiffe-id", "spiffe://example.org/x", "--parent-id", "spiffe://other.org/agent/n1", *SEL],
     "not in trust domain"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", "--selector", "k8s:ns:x"], "unknown selector type"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", "--selector", "unix:uid:root"], "decimal number"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1"], "at least one --selector"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", *SEL, "--x509-ttl", "90d"], "out of range"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", *SEL, "--jwt-ttl", "2d"], "out of range"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", *SEL, "--dns-name", "bad_name!"], "invalid DNS name"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", *SEL, "--dns-name", "trustmesh-server.example.org"],
     "reserved"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", *SEL, "--federates-with", "example.org"],
     "own trust domain"),
    (["--spiffe-id", "spiffe://example.org/x", "--node", "n1", *SEL, "--federates-with", "Not A TD"],
     "invalid SPIFFE ID"),
    (["--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1", "--selector", "unix:gid:1000",
      "--selector", "unix:uid:1000"], "ALREADY_EXISTS"),
]


def test_every_refusal_exits_1_writes_nothing_and_is_audited(server: ServerProcess) -> None:
    existing = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1",
                          "--selector", "unix:uid:1000", "--selector", "unix:gid:1000", check=True).stdout.strip()
    before = _entries(server)
    for args, message in REFUSED:
        result = server.cli("entry", "create", *args)
        assert result.returncode == 1, (args, result.stdout)
        assert result.stderr.startswith("trustmesh: error: ") and message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and result.stdout == ""
    dup = server.cli("entry", "create", *REFUSED[-1][0])
    assert existing in dup.stderr, "a duplicate names the entry that already holds the identity"
    assert _entries(server) == before, "a refusal writes nothing"
    denied = [e for e in _audit(server, "entry.create") if e["outcome"] == "denied"]
    assert len(denied) == len(REFUSED) + 1
    for event, (_, message) in zip(denied, REFUSED, strict=False):  # the last denial is the duplicate
        assert event["actor"] == "local-root (uid 0)"
        assert message.replace("ALREADY_EXISTS", existing) in event["details"]["reason"], event

    # What the CLI itself refuses (nothing reaches the server): exit 1 with the fix.
    for args, message in (
        (["--spiffe-id", "spiffe://example.org/x", *SEL], "--node NAME or --parent-id"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "a", "--parent-id", "spiffe://example.org/agent/a",
          *SEL], "not both"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "a", "--selector", "uid1000"], "TYPE:VALUE"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "a", *SEL, "--x509-ttl", "ages"], "invalid duration"),
        (["--spiffe-id", "spiffe://example.org/x", "--node", "a", *SEL, "--x509-ttl", "9" * 30 + "d"], "--x509-ttl"),
    ):
        result = server.cli("entry", "create", *args)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result
    assert _entries(server) == before


def test_entry_round_trip(server: ServerProcess) -> None:
    eid = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/ledger", "--node", "node-1",
                     "--selector", "unix:uid:1000", "--selector", "unix:gid:1000", "--x509-ttl", "30m",
                     "--dns-name", "Ledger.Internal.", "--federates-with", "partner.example",
                     check=True).stdout.strip()
    assert len(eid) == 32 and all(c in string.hexdigits for c in eid)
    other = server.cli("entry", "create", "--spiffe-id", "spiffe://example.org/batch", "--parent-id",
                       "spiffe://example.org/agent/node-2", "--selector", "unix:user:batch", "--admin",
                       check=True).stdout.strip()
    shown = json.loads(server.cli("entry", "show", eid, "--json", check=True).stdout)
    assert shown["spiffe_id"] == "spiffe://example.org/ledger"
    assert shown["parent_id"] == "spiffe://example.org/agent/node-1"
    assert [f"{s['type']}:{s['value']}" for s in shown["selectors"]] == ["unix:gid:1000", "unix:uid:1000"]
    assert shown["x509_ttl_seconds"] == 1800 and shown["jwt_ttl_seconds"] == 0  # numbers, not strings
    assert shown["dns_names"] == ["ledger.internal"] and shown["federates_with"] == ["partner.example"]
    assert shown["admin"] is False and shown["revision"] > 0
    text = server.cli("entry", "show", eid, check=True).stdout
    assert "unix:gid:1000, unix:uid:1000" in text and "30m" in text

    # Listing and its filters.
    assert {e["id"] for e in _entries(server)} == {eid, other}
    assert [e["id"] for e in _entries(server, "--node", "node-1")] == [eid]
    assert [e["id"] for e in _entries(server, "--parent-id", "spiffe://example.org/agent/node-2")] == [other]
    assert [e["id"] for e in _entries(server, "--spiffe-id", "spiffe://example.org/batch")] == [other]
    assert _entries(server, "--node", "node-9") == []
    table = server.cli("entry", "list", check=True).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "SPIFFE", "ID"] and len(table) == 3
    assert any(eid in row and "spiffe://example.org/ledger" in row and "30m" in row for row in table)
    assert any(other in row and "(admin)" in row for row in table)

    # Update: the flags given replace; the rest stays.
    server.cli("entry", "update", eid, "--selector", "unix:uid:1001", "--dns-name", "", "--node", "node-3",
               "--admin", check=True)
    shown2 = json.loads(server.cli("entry", "show", eid, "--json", check=True).stdout)
    assert [s["value"] for s in shown2["selectors"]] == ["uid:1001"]
    assert shown2["dns_names"] == [] and shown2["federates_with"] == ["partner.example"]
    assert shown2["parent_id"] == "spiffe://example.org/agent/node-3" and shown2["admin"] is True
    assert shown2["x509_ttl_seconds"] == 1800 and shown2["revision"] > shown["revision"]
    assert shown2["created_at"] == shown["created_at"]
    server.cli("entry", "update", eid, "--no-admin", "--x509-ttl", "0", check=True)
    shown3 = json.loads(server.cli("entry", "show", eid, "--json", check=True).stdout)
    assert shown3["admin"] is False and shown3["x509_ttl_seconds"] == 0

    # A stale revision is refused, for update and delete alike, and changes nothing.
    stale = server.cli("entry", "update", eid, "--x509-ttl", "5m", "--expected-revision", str(shown["revision"]))
    assert stale.returncode == 1 and "ABORTED" in stale.stderr and "re-read it and retry" in stale.stderr
    stale = server.cli("entry", "delete", eid, "--expected-revision", str(shown["revision"]))
    assert stale.returncode == 1 and "ABORTED" in stale.stderr
    assert json.loads(server.cli("entry", "show", eid, "--json", check=True).stdout) == shown3
    # An update that breaks a rule is refused like a create.
    bad = server.cli("entry", "update", eid, "--spiffe-id", "spiffe://other.org/x")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr

    # Delete.
    assert server.cli("entry", "delete", eid, check=True).stdout.strip() == f"deleted entry {eid}"
    assert [e["id"] for e in _entries(server)] == [other]
    for args in (("show", eid), ("delete", eid), ("update", eid, "--x509-ttl", "5m")):
        gone = server.cli("entry", *args)
        assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr and "does not exist" in gone.stderr
    bad_id = server.cli("entry", "show", "../../audit/head")
    assert bad_id.returncode == 1 and "invalid entry id" in bad_id.stderr

    kinds = [(e["kind"], e["outcome"], e["subject"]) for e in json.loads(
        server.cli("audit", "show", "--json", check=True).stdout) if e["kind"].startswith("entry.")]
    assert ("entry.create", "ok", "spiffe://example.org/ledger") in kinds
    assert ("entry.update", "ok", "spiffe://example.org/ledger") in kinds
    assert ("entry.update", "denied", eid) in kinds
    assert ("entry.delete", "ok", "spiffe://example.org/ledger") in kinds
    assert ("entry.delete", "denied", eid) in kinds


# --- agents --------------------------------------------------------------------------------


async def test_agents_list_ban_evict(server: ServerProcess) -> None:
    assert server.cli("agent", "list", check=True).stdout.strip() == "no attested agents"
    one, two = NodeClient(server), NodeClient(server)
    await one.attest(server.cli("token", "create", "--node", "node-1", check=True).stdout.strip())
    await two.attest(server.cli("token", "create", "--node", "node-2", check=True).stdout.strip())
    listed = json.loads(server.cli("agent", "list", "--json", check=True).stdout)
    assert [(a["spiffe_id"], a["node_name"], a["banned"], a["status"]) for a in listed] == [
        ("spiffe://example.org/agent/node-1", "node-1", False, "active"),
        ("spiffe://example.org/agent/node-2", "node-2", False, "active")]
    assert listed[0]["renewed_from"] == "127.0.0.1", "the address it attested from"
    assert isinstance(listed[0]["cert_not_after"], int) and listed[0]["attestation_type"] == "join_token"

    # An attested node gets no second token: the message says how to replace the host.
    again = server.cli("token", "create", "--node", "node-1")
    assert again.returncode == 1 and "FAILED_PRECONDITION" in again.stderr
    assert "trustmesh agent evict node-1" in again.stderr

    # Ban by node name; the ban is sticky.
    assert "banned node-1" in server.cli("agent", "ban", "node-1", check=True).stdout
    table = server.cli("agent", "list", check=True).stdout
    assert any("node-1" in row and "banned" in row for row in table.splitlines())
    assert json.loads(server.cli("agent", "list", "--json", check=True).stdout)[0]["status"] == "banned"
    # Nothing to clear on an agent that is not marked suspected-clone; said and audited.
    assert "no suspected-clone mark (status banned)" in server.cli("agent", "clear", "node-1", check=True).stdout
    server.cli("agent", "ban", "spiffe://example.org/agent/node-1", check=True)  # again: harmless
    result = server.cli("token", "create", "--node", "node-1")
    assert result.returncode == 1 and "banned" in result.stderr
    result = server.cli("agent", "evict", "node-1")
    assert result.returncode == 1 and "FAILED_PRECONDITION" in result.stderr and "banned" in result.stderr

    # Evict by SPIFFE ID: the record goes, and the node may join again.
    server.cli("agent", "evict", "spiffe://example.org/agent/node-2", check=True)
    assert [a["node_name"] for a in json.loads(server.cli("agent", "list", "--json", check=True).stdout)] == ["node-1"]
    server.cli("token", "create", "--node", "node-2", check=True)

    ok = [(e["kind"], e["subject"]) for e in json.loads(server.cli("audit", "show", "--json", check=True).stdout)
          if e["outcome"] == "ok" and e["kind"] in ("agent.ban", "agent.evict")]
    assert ok == [("agent.ban", "spiffe://example.org/agent/node-1"), ("agent.ban", "spiffe://example.org/agent/node-1"),
                  ("agent.evict", "spiffe://example.org/agent/node-2")]


def test_unknown_and_malformed_agents(server: ServerProcess) -> None:
    for command in ("ban", "evict", "clear"):
        result = server.cli("agent", command, "node-9")
        assert result.returncode == 1 and "NOT_FOUND" in result.stderr and "no attested agent" in result.stderr
        assert "spiffe://example.org/agent/node-9" in result.stderr
        result = server.cli("agent", command, "spiffe://other.org/agent/x")
        assert result.returncode == 1 and "INVALID_ARGUMENT" in result.stderr and "not an agent ID" in result.stderr
        result = server.cli("agent", command, "spiffe://example.org/ledger")
        assert result.returncode == 1 and "not an agent ID" in result.stderr
    denied = [e for e in json.loads(server.cli("audit", "show", "--json", check=True).stdout)
              if e["kind"] in ("agent.ban", "agent.evict", "agent.clear")]
    assert len(denied) == 9 and {e["outcome"] for e in denied} == {"denied"}


# --- the Admin API with hostile input -----------------------------------------------------


async def test_hostile_admin_calls_get_clear_statuses(server: ServerProcess) -> None:
    huge = "x" * 100_000
    entry = dict(spiffe_id="spiffe://example.org/a", parent_id="spiffe://example.org/agent/n",
                 selectors=[types_pb2.Selector(type="unix", value="uid:1")])

    def create(**kw: Any) -> admin_pb2.CreateEntryRequest:
        return admin_pb2.CreateEntryRequest(entry=types_pb2.Entry(**{**entry, **kw}))

    async with server.admin_channel() as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        calls = [
            stub.GetEntry(admin_pb2.GetEntryRequest(id=huge)),
            stub.GetEntry(admin_pb2.GetEntryRequest(id="")),
            stub.DeleteEntry(admin_pb2.DeleteEntryRequest(id="a/b")),
            stub.UpdateEntry(admin_pb2.UpdateEntryRequest(entry=types_pb2.Entry(id=huge))),
            stub.CreateEntry(create(spiffe_id="spiffe://example.org/" + huge)),
            stub.CreateEntry(create(selectors=[types_pb2.Selector(type="unix" + huge, value="uid:1")])),
            stub.CreateEntry(create(selectors=[types_pb2.Selector(type="unix", value="path:/" + huge)])),
            stub.CreateEntry(create(dns_names=[huge])),
            stub.CreateEntry(create(x509_ttl_seconds=2**62)),
            stub.CreateEntry(create(jwt_ttl_seconds=-(2**62))),
            stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name=huge)),
            stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name="n", ttl_seconds=2**62)),
            stub.CreateJoinToken(admin_pb2.CreateJoinTokenRequest(node_name="n\n")),
            stub.BanAgent(admin_pb2.BanAgentRequest(spiffe_id=huge)),
            stub.EvictAgent(admin_pb2.EvictAgentRequest(spiffe_id="")),
            stub.ListEntries(admin_pb2.ListEntriesRequest(page_size=-1)),
            stub.ListAuditEvents(admin_pb2.ListAuditEventsRequest(limit=-1)),
            stub.RotateRoot(admin_pb2.RotateRootRequest(step=99)),  # type: ignore[arg-type]
            stub.IssuePartnerCertificate(admin_pb2.IssuePartnerCertificateRequest()),
            stub.IssuePartnerCertificate(admin_pb2.IssuePartnerCertificateRequest(
                spiffe_id=f"spiffe://{TD}/ledger", csr=b"x")),
            stub.RevokePartnerCertificate(admin_pb2.RevokePartnerCertificateRequest(serial="zz")),
            stub.CreateFederationRelationship(admin_pb2.CreateFederationRelationshipRequest()),
            stub.CreateFederationRelationship(admin_pb2.CreateFederationRelationshipRequest(trust_domain=TD)),
            stub.CreateFederationRelationship(admin_pb2.CreateFederationRelationshipRequest(
                trust_domain="partner.example", bundle_endpoint_url="http://plain.example/")),
            stub.DeleteFederationRelationship(admin_pb2.DeleteFederationRelationshipRequest(trust_domain="A B")),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
            assert len(info.value.details()) < 1000
        # Our own bundle, as proto and as a SPIFFE bundle (JWKS).
        reply = await stub.GetBundle(admin_pb2.GetBundleRequest())
        assert reply.bundle.trust_domain == TD and reply.bundle.x509_authorities
        jwks = json.loads(reply.spiffe_bundle)
        assert any(k.get("use") == "x509-svid" for k in jwks["keys"])
        # Paging: every entry exactly once across pages.
        ids = set()
        for i in range(5):
            ids.add((await stub.CreateEntry(create(spiffe_id=f"spiffe://example.org/p{i}"))).entry.id)
        seen: list[str] = []
        token = ""
        while True:
            page = await stub.ListEntries(admin_pb2.ListEntriesRequest(page_size=2, page_token=token))
            assert len(page.entries) <= 2
            seen += [e.id for e in page.entries]
            token = page.next_page_token
            if not token:
                break
        assert sorted(seen) == sorted(ids)
    assert server.proc is not None and server.proc.poll() is None, "the server survived"
    assert "Traceback" not in server.log()


# --- the CLI's own errors and help -----------------------------------------------------------


def test_unreachable_server(server: ServerProcess, tmp_path: Path) -> None:
    missing = tmp_path / "nope.sock"
    result = server.cli("entry", "list", "--admin-socket", str(missing))
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"trustmesh: error: cannot reach the trustmesh server at {missing}: is `trustmesh server run` running? "
        "set --admin-socket or TRUSTMESH_ADMIN_SOCKET")
    not_a_socket = tmp_path / "file.sock"
    not_a_socket.write_text("")
    result = server.cli("token", "create", "--node", "n", "--admin-socket", str(not_a_socket))
    assert result.returncode == 1 and "cannot reach the trustmesh server" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


GROUPS = {
    "server": ["run"],
    "token": ["create"],
    "entry": ["create", "list", "show", "update", "delete"],
    "agent": ["run", "list", "ban", "evict", "clear"],
    "audit": ["show", "verify"],
}


def test_help_is_complete() -> None:
    cli = ServerProcess(data_dir=Path("/nonexistent")).cli
    top = cli("--help", check=True).stdout
    for group, subs in GROUPS.items():
        assert group in top
        text = cli(group, "--help", check=True).stdout
        for sub in subs:
            assert sub in text, (group, sub)
            sub_help = cli(group, sub, "--help", check=True).stdout
            assert "usage:" in sub_help
            if group != "server" and sub != "run":
                assert "--admin-socket" in sub_help and "example" in sub_help, (group, sub)
