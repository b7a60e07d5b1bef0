"""`trustmesh check`'s rules (pure: protobuf facts in, checks out), its output, and the
readiness probes behind /readyz (server status service, agent, metrics endpoint)."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tests.unit.test_metrics import _get
from trustmesh._proto.trustmesh.v1 import admin_pb2, types_pb2
from trustmesh.agent.agent import AgentReadiness
from trustmesh.agent.node_client import ServerState
from trustmesh.cli import check_cmd as c
from trustmesh.controlplane.status import AgentPresence, Listeners
from trustmesh.controlplane.store import StoreMember
from trustmesh.controlplane.store.etcd import EtcdKV, parse_endpoints
from trustmesh.controlplane.store.sqlite import SqliteKV
from trustmesh.metrics import Readiness, Registry, serve_metrics

NOW = 1_800_000_000.0
DAY = 86400.0
LIMITS = c.Limits()


def _status(**fields: Any) -> admin_pb2.GetStatusResponse:
    base: dict[str, Any] = dict(trust_domain="example.org", replica_id="r1", server_time_ms=int(NOW * 1000),
                                leader="r1", ready=True, store_backend="sqlite", agent_ttl_seconds=3600)
    base.update(fields)
    return admin_pb2.GetStatusResponse(**base)


def _root(key_id: str, state: int, not_after: float) -> admin_pb2.CAAuthority:
    return admin_pb2.CAAuthority(kind=admin_pb2.CA_AUTHORITY_KIND_X509_ROOT, state=state, key_id=key_id,
                                 not_before=int(NOW - DAY), not_after=int(not_after))


def _signing(replica: str, activated: float, not_after: float) -> admin_pb2.CAAuthority:
    return admin_pb2.CAAuthority(kind=admin_pb2.CA_AUTHORITY_KIND_X509_SIGNING,
                                 state=admin_pb2.CA_AUTHORITY_STATE_ACTIVE, replica=replica,
                                 activated_at=int(activated), not_before=int(activated - 60), not_after=int(not_after))


def _agent(node: str, connected: bool = True, revision: int = 0, **fields: Any) -> types_pb2.AttestedNode:
    return types_pb2.AttestedNode(spiffe_id=f"spiffe://example.org/agent/{node}", node_name=node,
                                  connected=connected, policy_revision=revision,
                                  updated_at=fields.pop("updated_at", int(NOW - 600)), **fields)


ACTIVE, PREPARED = admin_pb2.CA_AUTHORITY_STATE_ACTIVE, admin_pb2.CA_AUTHORITY_STATE_PREPARED


# --- certificates -------------------------------------------------------------------------------

def test_a_root_far_from_expiry_passes_and_one_near_it_fails_with_the_date_and_what_to_do() -> None:
    ok = c.root_expiry(_status(authorities=[_root("abc", ACTIVE, NOW + 300 * DAY)]), LIMITS)
    assert ok.status == "ok" and "root abc expires" in ok.detail and "(in 300d)" in ok.detail
    near = c.root_expiry(_status(authorities=[_root("abc", ACTIVE, NOW + DAY)]), LIMITS)
    assert near.status == "fail"
    assert near.detail == ("root abc expires 2027-01-16T08:00:00Z (in 1d, within --ca-expiry-warning 30d, and no "
                           "successor is prepared)")
    assert "trustmesh ca rotate --step prepare" in near.fix
    gone = c.root_expiry(_status(authorities=[_root("abc", ACTIVE, NOW - 3600)]), LIMITS)
    assert gone.status == "fail" and "expired 1h ago" in gone.detail
    # A narrower window (a deployment of short roots) passes the same root.
    assert c.root_expiry(_status(authorities=[_root("abc", ACTIVE, NOW + DAY)]),
                         c.Limits(ca_expiry_warning=3600)).status == "ok"


def test_a_near_root_with_a_prepared_successor_is_a_warning_and_no_active_root_fails() -> None:
    check = c.root_expiry(_status(authorities=[_root("old", ACTIVE, NOW + DAY),
                                               _root("new", PREPARED, NOW + 365 * DAY)]), LIMITS)
    assert check.status == "warn" and "root new is prepared" in check.detail
    assert c.root_expiry(_status(authorities=[_root("new", PREPARED, NOW + 365 * DAY)]), LIMITS).status == "fail"


def test_the_signing_ca_fails_when_it_was_not_renewed_at_half_life() -> None:
    fresh = _status(authorities=[_signing("r1", NOW - 3600, NOW + 20 * 3600)])
    assert c.signing_ca_expiry(fresh).status == "ok"
    # 1 h left of a 24 h life: rotation at 12 h did not happen.
    late = c.signing_ca_expiry(_status(authorities=[_signing("r1", NOW - 23 * 3600, NOW + 3600)]))
    assert late.status == "fail" and "replica r1's signing CA expires" in late.detail
    assert "under a quarter of its 1d life" in late.detail
    # Another replica's old signing CA is not this replica's: it holds none.
    other = c.signing_ca_expiry(_status(authorities=[_signing("gone-123", NOW - 23 * 3600, NOW + 3600)]))
    assert other.status == "fail" and other.detail == "replica r1 holds no signing CA"


def test_the_chain_check_refuses_an_empty_chain_and_a_root_missing_from_the_bundle() -> None:
    root = _root("abc", ACTIVE, NOW + DAY)
    root.certificate = b"root-der"
    assert "reports no serving SVID chain" in c.certificates_chain(_status(authorities=[root]), []).detail
    assert "reports no serving SVID chain" in c.certificates_chain(_status(authorities=[root]), [b"root-der"]).detail
    assert c.certificates_chain(_status(), []).detail == "the CA journal has no active root"


def test_the_chain_check_follows_an_upstream_authority_to_the_banks_root() -> None:
    from cryptography.hazmat.primitives import serialization

    from trustmesh.keys import generate_private_key
    from trustmesh.spiffeid import SpiffeId, TrustDomain
    from trustmesh.x509svid import build_ca_certificate, build_leaf_certificate

    td, now = TrustDomain("example.org"), datetime.fromtimestamp(NOW, timezone.utc)
    window = {"not_before": now - timedelta(hours=1), "not_after": now + timedelta(days=30)}
    bank_key, mesh_key, signing_key = generate_private_key(), generate_private_key(), generate_private_key()
    bank = build_ca_certificate(trust_domain=td, public_key=bank_key.public_key(), issuer=None, issuer_key=bank_key,
                                path_length=None, common_name="bank root", **window)
    mesh = build_ca_certificate(trust_domain=td, public_key=mesh_key.public_key(), issuer=bank, issuer_key=bank_key,
                                path_length=1, common_name="mesh root", **window)
    signing = build_ca_certificate(trust_domain=td, public_key=signing_key.public_key(), issuer=mesh,
                                   issuer_key=mesh_key, path_length=0, common_name="signing", **window)
    leaf = build_leaf_certificate(spiffe_id=SpiffeId.parse("spiffe://example.org/trustmesh/server"),
                                  public_key=generate_private_key().public_key(), issuer=signing,
                                  issuer_key=signing_key, **window)
    der = [x.public_bytes(serialization.Encoding.DER) for x in (leaf, signing, mesh, bank)]
    root = _root("mesh", ACTIVE, NOW + DAY)
    root.certificate = der[2]
    status = _status(authorities=[root], server_svid_chain=der[:3])
    good = c.certificates_chain(status, [der[3]])
    assert good.status == "ok" and "1 upstream CA certificate(s)" in good.detail
    assert "chains to no root" in c.certificates_chain(status, [der[1]]).detail
    broken = c.certificates_chain(_status(authorities=[root], server_svid_chain=[der[0], der[2]]), [der[3]])
    assert "not signed by the certificate the server presents after it" in broken.detail


# --- control plane --------------------------------------------------------------------------------

def test_clock_skew_counts_only_what_lies_outside_the_round_trip() -> None:
    assert c.clock_skew(NOW + 0.5, NOW, NOW + 1, LIMITS).status == "ok"
    behind = c.clock_skew(NOW - 12, NOW, NOW + 1, LIMITS)
    assert behind.status == "fail" and behind.detail.startswith("the server's clock is 12.0s behind this host's")
    assert "NTP" in behind.fix
    assert c.clock_skew(NOW + 4, NOW, NOW + 1, LIMITS).status == "ok"  # 3 s ahead, within 5 s


def test_leader_and_store_checks() -> None:
    assert c.leader_elected(_status()).detail == "r1 (this replica)"
    assert c.leader_elected(_status(leader="")).status == "fail"
    sqlite = _status(store_members=[admin_pb2.StoreMember(name="embedded", endpoint="/d/store.db", healthy=True,
                                                          leader=True)])
    assert c.store_healthy(sqlite).detail == "sqlite, embedded, one member (/d/store.db)"
    members = [admin_pb2.StoreMember(name=n, endpoint=f"http://{n}:2379", healthy=n != "e3", leader=n == "e1",
                                     error="UNAVAILABLE: down" if n == "e3" else "") for n in ("e1", "e2", "e3")]
    degraded = c.store_healthy(_status(store_backend="etcd", store_members=members))
    assert degraded.status == "warn" and "2 of 3 member(s) healthy, leader e1" in degraded.detail
    assert "e3 (http://e3:2379): UNAVAILABLE: down" in degraded.detail
    for m in members[1:]:
        m.healthy = False
    assert c.store_healthy(_status(store_backend="etcd", store_members=members)).status == "fail"
    assert c.store_healthy(_status(store_backend="etcd", store_error="cannot use etcd")).status == "fail"


# --- agents ---------------------------------------------------------------------------------------

def test_a_stopped_agent_is_named_with_when_it_was_last_seen() -> None:
    agents = [_agent("node-1"), _agent("node-2", connected=False)]
    seen = [admin_pb2.AgentPresence(spiffe_id="spiffe://example.org/agent/node-2", last_seen=int(NOW - 300))]
    stale = c.agents_connected(agents, _status(agents=seen), LIMITS)
    assert stale.status == "fail"
    assert stale.detail == ("node-2 last seen 2027-01-15T07:55:00Z (stale 5m) — 1 of 2 connected to replica r1")
    assert "trustmesh agent evict NODE" in stale.fix
    # Within --stale-after: reconnecting?
    recent = c.agents_connected(agents, _status(agents=seen), c.Limits(stale_after=3600))
    assert recent.status == "warn" and "node-2 last seen 2027-01-15T07:55:00Z (5m ago)" in recent.detail
    assert c.agents_connected([_agent("node-1")], _status(), LIMITS).detail == "1 of 1 connected to replica r1"


def test_banned_agents_do_not_count_and_no_agent_passes() -> None:
    assert c.agents_connected([_agent("x", connected=False, banned=True)], _status(), LIMITS).detail == \
        "no agent has attested yet (1 banned, not counted)"


def test_on_etcd_an_agent_renewing_on_time_may_stream_to_another_replica() -> None:
    agent = _agent("node-3", connected=False, updated_at=int(NOW - 600))
    check = c.agents_connected([agent], _status(store_backend="etcd"), LIMITS)
    assert check.status == "warn" and "not streaming to this replica: node-3" in check.detail
    overdue = _agent("node-3", connected=False, updated_at=int(NOW - 3 * 3600))
    assert c.agents_connected([overdue], _status(store_backend="etcd"), LIMITS).status == "fail"


def test_policy_converged_names_the_agents_behind() -> None:
    assert c.policy_converged([_agent("a", revision=4), _agent("b", revision=4)], 4).status == "ok"
    behind = c.policy_converged([_agent("a", revision=4), _agent("b", revision=3)], 4)
    assert behind.status == "fail" and behind.detail == "b enforces revision 3; revision 4 is in force"
    assert c.policy_converged([_agent("a", connected=False, revision=0)], 4).status == "ok"


# --- endpoints and federation ---------------------------------------------------------------------

def test_endpoints_fail_on_errors_and_on_the_wrong_document() -> None:
    status = _status(oidc_issuer="https://oidc.example.org", bundle_endpoint_profile="https_spiffe")
    assert c.bundle_endpoint(status, None, "").status == "ok"
    refused = c.bundle_endpoint(status, c.Fetched(error="Connection refused"), "127.0.0.1:1")
    assert refused.status == "fail" and refused.detail == "https://127.0.0.1:1/: Connection refused"
    good = c.Fetched(200, "application/json", json.dumps({"keys": [{}, {}]}).encode())
    assert c.bundle_endpoint(status, good, "h:1").detail == "https://h:1/ (https_spiffe; 2 key(s))"
    doc = c.Fetched(200, "application/json", json.dumps({"issuer": "https://oidc.example.org"}).encode())
    assert c.oidc_endpoint(status, doc, "u").status == "ok"
    other = c.Fetched(200, "application/json", json.dumps({"issuer": "https://else"}).encode())
    assert "relying parties will refuse" in c.oidc_endpoint(status, other, "u").detail
    assert c.oidc_endpoint(status, c.Fetched(404, "text/plain", b"nope"), "u").status == "fail"


def test_federation_is_fresh_within_three_refresh_hints() -> None:
    rel = admin_pb2.FederationRelationship
    fresh = rel(trust_domain="p.example", bundle_endpoint_url="https://p/", last_refreshed_at=int(NOW - 600))
    assert c.federation_fresh([fresh], {"p.example": 300}, NOW).status == "ok"
    stale = c.federation_fresh([fresh], {"p.example": 60}, NOW)
    assert stale.status == "fail" and "p.example: last refreshed" in stale.detail and "due every 1m" in stale.detail
    failing = rel(trust_domain="q.example", bundle_endpoint_url="https://q/", last_refreshed_at=int(NOW),
                  last_error="certificate expired")
    assert "q.example: last refresh failed: certificate expired" in c.federation_fresh([failing], {}, NOW).detail
    assert c.federation_fresh([rel(trust_domain="static.example")], {}, NOW).status == "ok"


# --- posture --------------------------------------------------------------------------------------

def test_posture_findings_are_checks() -> None:
    agents = [_agent("node-1", permissive_listeners=["fx 127.0.0.1:9"]),
              _agent("node-2", status=types_pb2.AGENT_STATUS_SUSPECTED_CLONE, status_reason="two addresses")]
    assert c.permissive_listeners(agents).status == "fail"
    assert "node-1: fx 127.0.0.1:9" in c.permissive_listeners(agents).detail
    assert c.suspected_clones(agents).detail == "node-2: two addresses"
    assert c.break_glass([], "").status == "ok"
    assert c.break_glass(None, "may not call this method").status == "warn"
    assert c.audit_mode(None).status == "ok"
    edges = [admin_pb2.FlowEdge(destination="spiffe://example.org/fx", source_address="10.0.0.1")]
    assert c.unverified_callers(edges).status == "warn"


# --- output ---------------------------------------------------------------------------------------

CHECKS = [c.Check("control plane", "server reachable", "ok", "r1 answered"),
          c.Check("agents", "agents connected", "fail", "node-2 last seen X (stale 5m)", "start it"),
          c.Check("posture", "allowlists enforce", "warn", "fx in audit mode", "enforce it")]


def test_text_output_groups_checks_and_shows_the_fix_under_each_problem() -> None:
    text = c.render(CHECKS, c.marks_for("utf-8"))
    assert "√ server reachable: r1 answered" in text
    assert "× agents connected: node-2 last seen X (stale 5m)\n    fix: start it" in text
    assert "‼ allowlists enforce: fx in audit mode" in text
    assert text.splitlines()[:2] == ["control plane", "-------------"]
    assert text.endswith("× 1 of 3 check(s) failed, 1 warning(s)")


def test_plain_ascii_where_the_terminal_cannot_show_the_marks() -> None:
    text = c.render(CHECKS, c.marks_for("ascii"))
    text.encode("ascii")
    assert "[ok] server reachable" in text and "[FAIL] agents connected" in text and "[warn] allowlists" in text
    assert c.marks_for("latin-1") is c.marks_for(None) is c.marks_for("no-such-codec")


def test_warnings_pass_unless_strict() -> None:
    assert c.exit_code(CHECKS) == c.FAILED
    assert c.exit_code(CHECKS[::2]) == c.PASSED
    assert c.exit_code(CHECKS[::2], strict=True) == c.FAILED


# --- readiness --------------------------------------------------------------------------------------

def test_agent_readiness_needs_an_identity_a_valid_svid_and_the_sync_stream() -> None:
    state = ServerState(Registry())
    ready = AgentReadiness(state)
    assert ready.check() == Readiness(False, "not attested yet (control plane unreachable)")
    later = datetime.now(timezone.utc) + timedelta(hours=1)
    ready.client = SimpleNamespace(identity=SimpleNamespace(expires_at=later))  # type: ignore[assignment]
    assert ready.check().reason == "the sync stream to the control plane is not connected (unreachable)"
    state.set("connected")
    assert ready.check() == Readiness(True)
    ready.client = SimpleNamespace(identity=SimpleNamespace(  # type: ignore[assignment]
        expires_at=datetime(2020, 1, 1, tzinfo=timezone.utc)))
    assert ready.check().reason.startswith("the agent SVID expired at 2020-01-01T00:00:00Z")


def test_listeners_and_presence() -> None:
    listening = Listeners(frozenset({"node", "attest"}))
    listening.up("node", "127.0.0.1:1")
    assert listening.missing() == ["attest"]
    listening.up("attest", "127.0.0.1:2")
    assert listening.missing() == []
    streams = {"a": 1}
    clock = iter([10.0, 20.0])
    presence = AgentPresence(SimpleNamespace(delivered_revisions=lambda: streams), lambda: next(clock))
    assert presence.observe() == {"a": 10.0}
    streams.clear()
    assert presence.observe() == {"a": 10.0}  # gone: remembered as last seen at 10


async def test_readyz_answers_json_with_the_reason() -> None:
    answer = [Readiness(False, "the store does not answer: etcd down")]

    async def probe() -> Readiness:
        await asyncio.sleep(0)
        return answer[0]

    server = await serve_metrics(Registry(), "127.0.0.1", 0, ready=probe)
    port = server.sockets[0].getsockname()[1]
    try:
        status, headers, body = await _get(port, "/readyz")
        assert status == 503 and headers["content-type"] == "application/json"
        assert json.loads(body) == {"status": "not ready", "reason": "the store does not answer: etcd down"}
        answer[0] = Readiness(True)
        status, _, body = await _get(port, "/readyz")
        assert status == 200 and json.loads(body) == {"status": "ready"}
        status, _, body = await _get(port, "/healthz")
        assert status == 200 and json.loads(body) == {"status": "ok"}
    finally:
        await server.wait_closed()


@pytest.mark.parametrize("text", ["soon", "-1s"])
def test_a_bad_duration_is_one_error_naming_the_flag(text: str) -> None:
    args = SimpleNamespace(ca_expiry_warning="30d", stale_after=text, skew_max="5s")
    with pytest.raises(c.TrustmeshError, match="--stale-after"):
        c._limits(args)  # type: ignore[arg-type]


@pytest.mark.etcd
async def test_store_members_on_both_backends(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """SQLite is embedded, one member; etcd lists its members, each asked for its status."""
    sqlite = await SqliteKV.open(tmp_path / "store.db")
    try:
        assert await sqlite.members() == [StoreMember("embedded", str(tmp_path / "store.db"), healthy=True,
                                                      leader=True)]
    finally:
        await sqlite.close()
    etcd = await EtcdKV.connect(parse_endpoints(request.getfixturevalue("etcd_server")), namespace="/check/")
    try:
        [member] = await etcd.members()
        assert member.healthy and member.leader and member.endpoint.startswith("http://127.0.0.1:"), member
    finally:
        await etcd.close()
