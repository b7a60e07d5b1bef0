"""Node labels and node-selector entries with a real server and two real agents: an entry
with --node-selector reaches exactly the labelled node, a label removed withdraws the SVID
from that node's Workload API stream, changes are audited, and no node can label itself."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.harness import AgentProcess, ServerProcess
from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
from trustmesh.keys import generate_private_key
from trustmesh.x509svid import build_csr

HEADER = [("workload.spiffe.io", "true")]
UID = os.getuid()
TD = "spiffe://example.org"


@dataclass
class Mesh:
    server: ServerProcess
    a: AgentProcess  # node-a: labelled zone=cde by the tests
    b: AgentProcess  # node-b: never labelled
    remote: str  # the server's --admin-bind address


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    work = tmp_path_factory.mktemp("labels")
    server = ServerProcess(data_dir=work / "server", extra=["--admin-bind", "127.0.0.1:0", "--signing-workers", "0"])
    server.start()
    agents: list[AgentProcess] = []
    try:
        for name in ("node-a", "node-b"):
            token = server.cli("token", "create", "--node", name, check=True).stdout.strip()
            agents.append(AgentProcess(server, work / name, join_token=token).start())
            # Each node gets one ordinary entry, so its Workload API always has an SVID to send.
            server.cli("entry", "create", "--spiffe-id", f"{TD}/plain-{name}", "--node", name,
                       "--selector", f"unix:uid:{UID}", check=True)
        address = re.search(r"admin_bind=(\S+)", server.log())
        assert address is not None
        yield Mesh(server, agents[0], agents[1], address.group(1))
    finally:
        for agent in agents:
            agent.stop()
        server.stop()


def svid_ids(agent: AgentProcess, until: str, present: bool) -> list[str]:
    """The SPIFFE IDs of the first FetchX509SVID message in which `until` is (or is not) present."""
    channel = grpc.insecure_channel(f"unix:{agent.socket}")
    try:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=60)
        for message in stream:
            ids = sorted(s.spiffe_id for s in message.svids)
            if (until in ids) == present:
                return ids
        raise AssertionError("the stream ended")
    finally:
        channel.close()


def agents_json(server: ServerProcess) -> dict[str, dict[str, Any]]:
    agents = json.loads(server.cli("agent", "list", "--json", check=True).stdout)
    return {a["node_name"]: a for a in agents}


def test_selector_reaches_exactly_the_labelled_node_and_a_removed_label_withdraws_it(mesh: Mesh) -> None:
    server = mesh.server
    out = server.cli("agent", "label", "node-a", "zone=cde", check=True).stdout
    assert "zone=cde" in out and "attestation=join_token" in out
    vault = f"{TD}/card-vault"
    entry_id = server.cli("entry", "create", "--spiffe-id", vault, "--node-selector", "zone=cde",
                          "--selector", f"unix:uid:{UID}", check=True).stdout.strip()
    assert svid_ids(mesh.a, vault, present=True) == [vault, f"{TD}/plain-node-a"]
    # node-b's stream carries its own entry and never the vault's.
    assert svid_ids(mesh.b, f"{TD}/plain-node-b", present=True) == [f"{TD}/plain-node-b"]
    shown = json.loads(server.cli("entry", "show", entry_id, "--json", check=True).stdout)
    assert shown["reaches"] == [f"{TD}/agent/node-a"]
    assert shown["node_selector"] == {"zone": "cde"}
    text = server.cli("entry", "show", entry_id, check=True).stdout
    assert "node selector:   zone=cde" in text and f"{TD}/agent/node-a" in text
    listed = agents_json(server)
    assert listed["node-a"]["labels"] == {"attestation": "join_token", "zone": "cde"}
    assert listed["node-b"]["labels"] == {"attestation": "join_token"}
    assert "zone=cde" in server.cli("agent", "list", check=True).stdout

    # The label goes: the SVID leaves node-a's open Workload API stream.
    out = server.cli("agent", "unlabel", "node-a", "zone", check=True).stdout
    assert "zone" not in out
    assert svid_ids(mesh.a, vault, present=False) == [f"{TD}/plain-node-a"]
    shown = json.loads(server.cli("entry", "show", entry_id, "--json", check=True).stdout)
    assert shown["reaches"] == []

    # Both changes are audited: who, from where, the old and new labels.
    events = json.loads(server.cli("audit", "show", "--json", check=True).stdout)
    labels = [e for e in events if e["kind"] == "agent.label" and e["outcome"] == "ok"]
    details = [e["details"] for e in labels[-2:]]
    assert details[0]["old_labels"] == {} and details[0]["labels"] == {"zone": "cde"}
    assert details[1]["old_labels"] == {"zone": "cde"} and details[1]["labels"] == {}
    assert all(e["subject"] == f"{TD}/agent/node-a" and e["actor"] and e["source"] for e in labels[-2:])
    server.cli("entry", "delete", entry_id, check=True)


@pytest.mark.parametrize("args, says", [
    (("agent", "label", "node-a", "Zone=cde"), "label key 'Zone'"),
    (("agent", "label", "node-a", "zone=c d e"), "the value must be"),
    (("agent", "label", "node-a", "attestation=x509pop"), "reserved"),
    (("agent", "unlabel", "node-a", "attestation"), "reserved"),
    (("agent", "label", "node-z", "zone=cde"), "node-z"),
    (("entry", "create", "--spiffe-id", f"{TD}/x", "--node", "node-a", "--node-selector", "zone=cde",
      "--selector", "unix:uid:1"), "not both"),
    (("entry", "create", "--spiffe-id", f"{TD}/x", "--node-selector", "zone", "--selector", "unix:uid:1"),
     "--node-selector"),
    (("entry", "create", "--spiffe-id", f"{TD}/x", "--parent-id", f"{TD}/trustmesh/node-selector",
      "--selector", "unix:uid:1"), "only for entries with a --node-selector"),
])
def test_bad_labels_and_selectors_are_refused_in_one_line(mesh: Mesh, args: tuple[str, ...], says: str) -> None:
    result = mesh.server.cli(*args)
    assert result.returncode != 0 and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_node_cannot_label_itself(mesh: Mesh) -> None:
    """The agent's own SVID has no admin rights: it cannot set a label on the remote admin API."""
    server = mesh.server
    result = server.cli("agent", "label", "node-b", "zone=cde", "--admin-server", mesh.remote,
                        "--admin-cert", str(mesh.b.data_dir / "agent_svid.pem"),
                        "--admin-key", str(mesh.b.data_dir / "agent_key.pem"),
                        "--trust-bundle", str(server.bundle_path), "--admin-socket", "/nonexistent")
    assert result.returncode == 1 and "may not use the admin API" in result.stderr, result.stderr
    assert agents_json(server)["node-b"]["labels"] == {"attestation": "join_token"}


async def test_x509pop_nodes_get_labels_from_their_certificate(make_server: Callable[..., ServerProcess],
                                                               tmp_path: Path) -> None:
    """--x509pop-label maps certificate fields to labels, and attestation=x509pop is set."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
          .not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    pem = tmp_path / "node-ca.pem"
    pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server = make_server(extra=["--x509pop-ca", str(pem), "--x509pop-label", "zone=subject:OU",
                                "--x509pop-label", "rack=san-uri-prefix:spiffe://bank/rack/"])
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pci-7"),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "cde")]))
            .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://bank/rack/r12")]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    async with server.node_channel() as channel:
        call = node_pb2_grpc.NodeStub(channel).Attest(timeout=20)
        await call.write(node_pb2.AttestRequest(
            csr=build_csr(generate_private_key()),
            x509pop=node_pb2.X509PopEvidence(cert_chain=[cert.public_bytes(serialization.Encoding.DER)])))
        challenge = await call.read()
        signature = key.sign(b"trustmesh-x509pop-v1:" + challenge.challenge.nonce, ec.ECDSA(hashes.SHA256()))
        await call.write(node_pb2.AttestRequest(
            challenge_response=node_pb2.X509PopChallengeResponse(signature=signature)))
        await call.done_writing()
        assert (await call.read()).result.spiffe_id == f"{TD}/agent/pci-7"
    assert agents_json(server)["pci-7"]["labels"] == {"attestation": "x509pop", "rack": "r12", "zone": "cde"}
    # Other keys stay the operator's to set.
    server.cli("agent", "label", "pci-7", "owner=payments", check=True)
    assert agents_json(server)["pci-7"]["labels"]["owner"] == "payments"
