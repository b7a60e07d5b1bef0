"""Two complete trustmesh deployments (example.org and partner.example), each with its own
control plane and agent, federated through their bundle endpoints; and partner
certificates for a partner without SPIFFE. Real processes, real TLS, loopback only."""

from __future__ import annotations

import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tests.etcd_process import free_port
from tests.integration.harness import AgentProcess, ServerProcess, wait_until
from tests.integration.test_agent import HEADER, UID
from tests.integration.test_ha import Traffic, _echo_server, first_x509_message
from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh.der import load_der_certificates
from trustmesh.errors import VerificationError
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_csr, build_leaf_certificate, verify_x509_svid

HOME, PARTNER = "example.org", "partner.example"


def bundle_endpoint(server: ServerProcess) -> str:
    match = re.search(r"bundle_endpoint=(\S+)", server.log())
    assert match and match.group(1) != "off", server.log()
    return match.group(1)


def allow(server: ServerProcess, tmp_path: Path, destination: str, port: int, *sources: str) -> None:
    path = tmp_path / f"policy-{server.trust_domain}.yaml"
    rules = "".join(f"    - from: {s}\n" for s in sources)
    path.write_text(f"apiVersion: trustmesh/v1\nkind: Allowlist\nmetadata: {{name: access, owner: platform}}\n"
                    f"spec:\n  destination: {destination}\n  ports: [{port}]\n  allow:\n{rules}")
    server.cli("policy", "apply", str(path), check=True)


def federate(server: ServerProcess, partner: ServerProcess, tmp_path: Path) -> None:
    """What two platform teams do: exchange bundles once out of band, then point at each
    other's bundle endpoint (https_spiffe)."""
    bundle = tmp_path / f"{partner.trust_domain}-bundle.json"
    bundle.write_text(partner.cli("bundle", "show", check=True).stdout)
    server.cli("federation", "add", "--trust-domain", partner.trust_domain,
               "--endpoint", f"https://{bundle_endpoint(partner)}/", "--profile", "https_spiffe",
               "--endpoint-spiffe-id", f"spiffe://{partner.trust_domain}/trustmesh/server",
               "--bundle-file", str(bundle), check=True)


def federated_roots(agent: AgentProcess, td: str) -> int:
    """How many roots of `td` the agent's workload receives in its federated bundles."""
    raw = first_x509_message(agent).federated_bundles.get(f"spiffe://{td}")
    return len(load_der_certificates(raw)) if raw else 0


def own_chain(agent: AgentProcess) -> list[x509.Certificate]:
    return load_der_certificates(first_x509_message(agent).svids[0].x509_svid)


@dataclass
class Pair:
    home: ServerProcess
    partner: ServerProcess
    home_agent: AgentProcess
    partner_agent: AgentProcess
    payments: int  # home's payments outbound listener -> partner's ledger


@pytest.fixture
def pair(make_server: Callable[..., ServerProcess], tmp_path: Path) -> Iterator[Pair]:
    common = ["--bundle-endpoint", "127.0.0.1:0", "--bundle-refresh-hint", "1s"]
    home = make_server("home", trust_domain=HOME, extra=[*common, "--ca-ttl", "20s", "--agent-ttl", "10s"])
    partner = make_server("partner", trust_domain=PARTNER, extra=common)
    federate(home, partner, tmp_path)
    federate(partner, home, tmp_path)
    stop = threading.Event()
    echo = _echo_server(stop)
    ledger, payments = free_port(), free_port()
    # The partner runs the ledger and lets example.org's payments in; payments, at home, calls it.
    partner.cli("entry", "create", "--spiffe-id", f"spiffe://{PARTNER}/ledger", "--node", "b-1",
                "--selector", f"unix:uid:{UID}", "--federates-with", HOME, "--x509-ttl", "6s", check=True)
    home.cli("entry", "create", "--spiffe-id", f"spiffe://{HOME}/payments", "--node", "a-1",
             "--selector", f"unix:uid:{UID}", "--federates-with", PARTNER, "--x509-ttl", "4s", check=True)
    allow(partner, tmp_path, f"spiffe://{PARTNER}/ledger", ledger, f"spiffe://{HOME}/payments")
    agents = []
    for server, node, services in (
        (partner, "b-1", f"  - name: ledger\n    spiffe_id: spiffe://{PARTNER}/ledger\n"
                         f"    inbound: {{listen: 127.0.0.1:{ledger}, forward: 127.0.0.1:{echo}}}\n"),
        (home, "a-1", f"  - name: payments\n    spiffe_id: spiffe://{HOME}/payments\n    outbound:\n"
                      f"      - {{listen: 127.0.0.1:{payments}, connect: 127.0.0.1:{ledger}, "
                      f"expect: spiffe://{PARTNER}/ledger}}\n"),
    ):
        config = tmp_path / f"agent-{node}.yaml"
        config.write_text("services:\n" + services)
        token = server.cli("token", "create", "--node", node, check=True).stdout.strip()
        agents.append(AgentProcess(server, tmp_path / f"agent-{node}", join_token=token, config=config).start())
    try:
        yield Pair(home, partner, agents[1], agents[0], payments)
    finally:
        stop.set()
        for agent in agents:
            agent.stop()


@pytest.mark.slow
def test_federated_mtls_under_an_allowlist_through_a_root_rotation(pair: Pair) -> None:
    home, partner = pair.home, pair.partner
    listed = json.loads(home.cli("federation", "list", "--json", check=True).stdout)
    assert [r["trust_domain"] for r in listed] == [PARTNER] and listed[0]["profile"] == "https_spiffe"
    # JWT-SVIDs for a partner's HTTP API: issued at home, validated by the partner's agent
    # against home's JWT keys from the federated bundle.
    home_api = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{pair.home_agent.socket}"))
    partner_api = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{pair.partner_agent.socket}"))
    token = home_api.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["partner-ledger-api"]), metadata=HEADER,
                                  timeout=10).svids[0].svid
    checked = partner_api.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="partner-ledger-api",
                                                                              svid=token), metadata=HEADER, timeout=10)
    assert checked.spiffe_id == f"spiffe://{HOME}/payments"
    with pytest.raises(grpc.RpcError) as info:
        partner_api.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="another-api", svid=token),
                                    metadata=HEADER, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    traffic = Traffic(pair.payments)
    thread = threading.Thread(target=traffic.run, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: traffic.ok >= 5, timeout=30), (traffic.failures, pair.partner_agent.log()[-2000:])
        # A root rotation at home: the partner fetches the new bundle from the bundle endpoint
        # and hands it to its agent before anything chains to the new root.
        home.cli("ca", "rotate", "--step", "prepare", check=True)
        assert wait_until(lambda: federated_roots(pair.partner_agent, HOME) == 2, timeout=30), \
            partner.cli("federation", "list").stdout
        # Activation is allowed once the root has been in the bundle for the refresh hint (1 s).
        assert wait_until(lambda: home.cli("ca", "rotate", "--step", "activate").returncode == 0, timeout=10)
        roots = [x509.load_pem_x509_certificate(a["certificate_pem"].encode())
                 for a in json.loads(home.cli("ca", "show", "--json", check=True).stdout)["authorities"]
                 if a["kind"] == "root" and a["state"] == "active"]

        def under_new_root() -> bool:
            try:
                verify_x509_svid(own_chain(pair.home_agent), {TrustDomain(HOME): roots})
                return True
            except VerificationError:
                return False

        assert wait_until(under_new_root, timeout=20)
        served = traffic.ok
        assert wait_until(lambda: traffic.ok >= served + 10, timeout=20)
        # The old root retires by itself (--ca-ttl 20s); the partner follows.
        assert wait_until(lambda: federated_roots(pair.partner_agent, HOME) == 1, timeout=45)
        served = traffic.ok
        assert wait_until(lambda: traffic.ok >= served + 5, timeout=20)
        print(f"\nfederated traffic through a root rotation: {traffic.ok} exchanges, failures {len(traffic.failures)}")
        assert traffic.failures == []
        audit = partner.cli("audit", "show", "--kind", "federation.bundle_updated", "--json", check=True).stdout
        assert len(json.loads(audit)) >= 2
    finally:
        traffic.stop.set()
        thread.join(10)


# --- partner certificates and hostile partner CAs -------------------------------------------


def _tls_exchange(port: int, cert: Path, key: Path) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(b"hello")
                return tls.recv(64)
    except (OSError, ssl.SSLError):
        return b""


def _write_key(path: Path, key: object) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,  # type: ignore[attr-defined]
                                       serialization.NoEncryption()))


@pytest.mark.slow
def test_partner_certificate_issue_connect_revoke_and_hostile_partner_cas(
        make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    server = make_server(trust_domain=HOME)
    stop = threading.Event()
    echo = _echo_server(stop)
    ledger = free_port()
    # A partner that runs its own CA, known by a bundle set by hand; the ledger trusts it.
    now = datetime.now(timezone.utc)
    rogue_key = generate_private_key()
    rogue = build_ca_certificate(trust_domain=TrustDomain("rogue.example"), public_key=rogue_key.public_key(),
                                 issuer=None, issuer_key=rogue_key, not_before=now - timedelta(minutes=1),
                                 not_after=now + timedelta(hours=1), path_length=1, common_name="rogue root")
    bundle_file = tmp_path / "rogue.json"
    from trustmesh.bundle import Bundle

    bundle_file.write_bytes(Bundle(TrustDomain("rogue.example"), (rogue,)).to_jwks())
    server.cli("federation", "add", "--trust-domain", "rogue.example", "--bundle-file", str(bundle_file), check=True)
    server.cli("entry", "create", "--spiffe-id", f"spiffe://{HOME}/ledger", "--node", "n-1",
               "--selector", f"unix:uid:{UID}", "--federates-with", "rogue.example", check=True)
    allow(server, tmp_path, f"spiffe://{HOME}/ledger", ledger, f"spiffe://{HOME}/partners/acme",
          "spiffe://rogue.example/*", f"spiffe://{HOME}/payments")
    config = tmp_path / "agent.yaml"
    config.write_text(f"services:\n  - name: ledger\n    spiffe_id: spiffe://{HOME}/ledger\n"
                      f"    inbound: {{listen: 127.0.0.1:{ledger}, forward: 127.0.0.1:{echo}}}\n")
    token = server.cli("token", "create", "--node", "n-1", check=True).stdout.strip()
    agent = AgentProcess(server, tmp_path / "agent", join_token=token, config=config).start()
    try:
        assert wait_until(lambda: "inbound_listening" in agent.log())
        # The partner makes its key and CSR; we sign it.
        key = generate_private_key()
        _write_key(tmp_path / "acme.key", key)
        (tmp_path / "acme.csr").write_bytes(build_csr(key))
        issued = server.cli("partner", "issue", "--spiffe-id", f"spiffe://{HOME}/partners/acme",
                            "--csr", str(tmp_path / "acme.csr"), "--ttl", "1h", "--out", str(tmp_path / "acme.pem"),
                            check=True).stdout
        serial = re.search(r"serial (\w+)", issued).group(1)  # type: ignore[union-attr]
        assert wait_until(lambda: _tls_exchange(ledger, tmp_path / "acme.pem", tmp_path / "acme.key") == b"hello")
        # Refusals of issue: another trust domain, not under /partners/, a CSR that is not one.
        for spiffe_id, csr in ((f"spiffe://{PARTNER}/partners/x", "acme.csr"),
                               (f"spiffe://{HOME}/payments", "acme.csr"),
                               (f"spiffe://{HOME}/partners/x", "acme.key")):
            refused = server.cli("partner", "issue", "--spiffe-id", spiffe_id, "--csr", str(tmp_path / csr),
                                 "--out", str(tmp_path / "x.pem"))
            assert refused.returncode == 1 and not (tmp_path / "x.pem").exists(), refused.stderr
        # Revoke: the next handshake is refused.
        server.cli("partner", "revoke", serial, "--reason", "key exposed", check=True)
        revoked_at = time.monotonic()
        assert wait_until(lambda: _tls_exchange(ledger, tmp_path / "acme.pem", tmp_path / "acme.key") == b"",
                        timeout=10)
        print(f"\npartner certificate refused {time.monotonic() - revoked_at:.2f} s after `partner revoke`")
        again = server.cli("partner", "revoke", serial)
        assert again.returncode == 1 and "already revoked" in again.stderr
        # A partner CA minting an ID in our trust domain, or in a third trust domain: refused.
        for minted in (f"spiffe://{HOME}/payments", "spiffe://third.example/svc"):
            leaf_key = generate_private_key()
            leaf = build_leaf_certificate(spiffe_id=SpiffeId.parse(minted), public_key=leaf_key.public_key(),
                                          issuer=rogue, issuer_key=rogue_key, not_before=now - timedelta(minutes=1),
                                          not_after=now + timedelta(hours=1))
            (tmp_path / "minted.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
            _write_key(tmp_path / "minted.key", leaf_key)
            assert _tls_exchange(ledger, tmp_path / "minted.pem", tmp_path / "minted.key") == b"", minted
        # While the rogue partner's own IDs pass (its bundle, its trust domain, allowed).
        leaf_key = generate_private_key()
        leaf = build_leaf_certificate(spiffe_id=SpiffeId.parse("spiffe://rogue.example/svc"),
                                      public_key=leaf_key.public_key(), issuer=rogue, issuer_key=rogue_key,
                                      not_before=now - timedelta(minutes=1), not_after=now + timedelta(hours=1))
        (tmp_path / "own.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        _write_key(tmp_path / "own.key", leaf_key)
        assert _tls_exchange(ledger, tmp_path / "own.pem", tmp_path / "own.key") == b"hello"
        # Every refusal and the revocation are audited.
        assert wait_until(lambda: "revoked" in server.cli("audit", "show", "--kind", "flows.reported", "--json",
                                                        check=True).stdout, timeout=15)
        audit = server.cli("audit", "show", "--json", check=True).stdout
        for kind in ("partner.issue", "partner.revoke", "federation.create"):
            assert f'"{kind}"' in audit, kind
    finally:
        stop.set()
        agent.stop()


def test_federation_cli_refusals_and_a_bundle_set_by_hand(server: ServerProcess, tmp_path: Path) -> None:
    own_bundle = tmp_path / "own.json"
    own_bundle.write_text(server.cli("bundle", "show", check=True).stdout)
    from trustmesh.bundle import Bundle

    now = datetime.now(timezone.utc)
    key = generate_private_key()
    root = build_ca_certificate(trust_domain=TrustDomain(PARTNER), public_key=key.public_key(), issuer=None,
                                issuer_key=key, not_before=now, not_after=now + timedelta(hours=1), path_length=1,
                                common_name="partner root")
    partner_bundle = tmp_path / "partner.json"
    partner_bundle.write_bytes(Bundle(TrustDomain(PARTNER), (root,)).to_jwks())
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{\"keys\": 7}")
    refusals = [
        (["--trust-domain", "example.org", "--bundle-file", str(own_bundle)], "own trust domain"),
        (["--trust-domain", PARTNER], "bundle endpoint"),
        (["--trust-domain", PARTNER, "--endpoint", "http://x.example/", "--profile", "https_web"], "https://"),
        (["--trust-domain", PARTNER, "--endpoint", "https://x.example/", "--profile", "https_spiffe",
          "--endpoint-spiffe-id", f"spiffe://{PARTNER}/s"], "--bundle-file"),
        (["--trust-domain", PARTNER, "--endpoint", "https://x.example/", "--profile", "https_spiffe",
          "--endpoint-spiffe-id", "spiffe://elsewhere.example/s", "--bundle-file", str(partner_bundle)],
         "not in the partner's trust domain"),
        (["--trust-domain", PARTNER, "--bundle-file", str(garbage)], "--bundle-file"),
        (["--trust-domain", PARTNER, "--bundle-file", str(own_bundle)], "trust domain example.org"),
    ]
    for args, reason in refusals:
        result = server.cli("federation", "add", *args)
        assert result.returncode != 0 and reason in result.stderr, (args, result.stderr)
    assert "no federation relationships" in server.cli("federation", "list", check=True).stdout
    server.cli("federation", "add", "--trust-domain", PARTNER, "--bundle-file", str(partner_bundle), check=True)
    again = server.cli("federation", "add", "--trust-domain", PARTNER, "--bundle-file", str(partner_bundle))
    assert again.returncode == 1 and "already exists" in again.stderr
    shown = server.cli("bundle", "show", "--trust-domain", PARTNER, "--format", "pem", check=True).stdout
    assert x509.load_pem_x509_certificate(shown.encode()) == root
    no_endpoint = server.cli("federation", "refresh", PARTNER)
    assert no_endpoint.returncode == 1 and "no bundle endpoint" in no_endpoint.stderr
    server.cli("federation", "remove", PARTNER, check=True)
    gone = server.cli("federation", "remove", PARTNER)
    assert gone.returncode == 1 and "no federation relationship" in gone.stderr
    assert server.cli("bundle", "show", "--trust-domain", PARTNER).returncode == 1
    audit = json.loads(server.cli("audit", "show", "--kind", "federation.create", "--json", check=True).stdout)
    assert sum(e["outcome"] == "denied" for e in audit) >= 5


# --- a hostile partner bundle endpoint (issue 14, hole 6) ------------------------------------


class HostileEndpoint:
    """A partner's https_spiffe bundle endpoint run by the test: it serves whatever bundle the
    test sets, in bytes that differ at every fetch when `reshuffle` (key order, whitespace),
    and counts the fetches."""

    def __init__(self, tmp_path: Path) -> None:
        now = datetime.now(timezone.utc)
        self.keys = [generate_private_key() for _ in range(2)]
        # Root 0 is the one the partner removes; root 1 stays and signs the endpoint's SVID.
        self.roots = [build_ca_certificate(trust_domain=TrustDomain(PARTNER), public_key=k.public_key(), issuer=None,
                                           issuer_key=k, not_before=now - timedelta(minutes=1),
                                           not_after=now + timedelta(hours=1), path_length=1,
                                           common_name=f"partner root {i}") for i, k in enumerate(self.keys)]
        key = generate_private_key()
        leaf = build_leaf_certificate(spiffe_id=SpiffeId.parse(f"spiffe://{PARTNER}/bundle-endpoint"),
                                      public_key=key.public_key(), issuer=self.roots[1], issuer_key=self.keys[1],
                                      not_before=now - timedelta(minutes=1), not_after=now + timedelta(hours=1))
        (tmp_path / "endpoint.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        _write_key(tmp_path / "endpoint.key", key)
        self.document: dict[str, object] = {"keys": []}
        self.reshuffle = False
        self.fetches = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server name)
                endpoint.fetches += 1
                document = dict(endpoint.document)
                if endpoint.reshuffle and endpoint.fetches % 2:
                    document["keys"] = list(reversed(document["keys"]))  # type: ignore[call-overload]
                body = json.dumps(document, indent=2 if endpoint.fetches % 2 else None).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(tmp_path / "endpoint.pem"), str(tmp_path / "endpoint.key"))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}/"

    def serve(self, roots: list[int], sequence: int | None, hint: int | None = None) -> bytes:
        """Serve these roots with this spiffe_sequence (None: none); the bundle as JWKS."""
        from trustmesh.bundle import Bundle

        jwks = Bundle(TrustDomain(PARTNER), tuple(self.roots[i] for i in roots), sequence_number=sequence,
                      refresh_hint=None if hint is None else timedelta(seconds=hint)).to_jwks()
        self.document = json.loads(jwks)
        return jwks

    def add_to(self, server: ServerProcess, tmp_path: Path, initial: bytes) -> None:
        (tmp_path / "partner-bundle.json").write_bytes(initial)
        server.cli("federation", "add", "--trust-domain", PARTNER, "--endpoint", self.url, "--profile",
                   "https_spiffe", "--endpoint-spiffe-id", f"spiffe://{PARTNER}/bundle-endpoint",
                   "--bundle-file", str(tmp_path / "partner-bundle.json"), check=True)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hostile(tmp_path: Path) -> Iterator[HostileEndpoint]:
    endpoint = HostileEndpoint(tmp_path)
    yield endpoint
    endpoint.close()


def partner_roots(server: ServerProcess) -> int:
    shown = server.cli("bundle", "show", "--trust-domain", PARTNER, "--format", "pem", check=True).stdout
    return shown.count("BEGIN CERTIFICATE")


def audit_events(server: ServerProcess, kind: str) -> list[dict[str, object]]:
    return json.loads(server.cli("audit", "show", "--kind", kind, "--json", check=True).stdout)  # type: ignore[no-any-return]


def test_a_partner_cannot_roll_its_bundle_back_by_dropping_or_lowering_its_sequence(
        make_server: Callable[..., ServerProcess], hostile: HostileEndpoint, tmp_path: Path) -> None:
    server = make_server(trust_domain=HOME)
    # Both roots, unnumbered, given out of band; then the partner removes root 0 at sequence 5.
    hostile.add_to(server, tmp_path, hostile.serve([0, 1], None))
    hostile.serve([1], 5)
    server.cli("federation", "refresh", PARTNER, check=True)
    assert partner_roots(server) == 1
    # The same partner (or whoever took its endpoint) tries to re-add the removed root: with no
    # sequence, with a lower one, with the same one; after a restart too.
    attempts = [(None, "carries no spiffe_sequence", "no_sequence"), (1, "went back from sequence 5 to 1", "rollback"),
                (5, "kept sequence 5", "sequence_reused")]
    for restart, (sequence, message, reason) in [(False, a) for a in attempts] + [(True, attempts[0])]:
        if restart:
            server.stop()
            server.start()
        hostile.serve([0, 1], sequence)
        refused = server.cli("federation", "refresh", PARTNER)
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "Traceback" not in refused.stderr
        assert partner_roots(server) == 1, f"sequence {sequence}: the removed root came back"
        failed = audit_events(server, "federation.refresh_failed")
        assert any(e["details"]["reason"] == reason for e in failed), failed  # type: ignore[index]
    # A real change, numbered higher, is still taken.
    hostile.serve([0, 1], 6)
    server.cli("federation", "refresh", PARTNER, check=True)
    assert partner_roots(server) == 2
    assert [e["details"]["sequence"] for e in audit_events(server, "federation.bundle_updated")] == [5, 6]  # type: ignore[index]


def test_an_unchanged_partner_bundle_is_stored_and_audited_once(
        make_server: Callable[..., ServerProcess], hostile: HostileEndpoint, tmp_path: Path) -> None:
    server = make_server(trust_domain=HOME)
    hostile.add_to(server, tmp_path, hostile.serve([1], 4))
    # Then sequence 5, fetched every second (the 1 s refresh hint), in other bytes each time.
    hostile.serve([1], 5, hint=1)
    hostile.reshuffle = True
    assert wait_until(lambda: hostile.fetches >= 3, timeout=30), server.log()[-2000:]
    updated = audit_events(server, "federation.bundle_updated")
    assert [e["details"]["sequence"] for e in updated] == [5], updated  # type: ignore[index]
    listed = json.loads(server.cli("federation", "list", "--json", check=True).stdout)
    assert listed[0]["last_error"] == "" and listed[0]["bundle_sequence"] == 5
