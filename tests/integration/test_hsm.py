"""CA keys in a real SoftHSM2 token and the bank's CA above the mesh, with real server and
agent processes. The workload is this test process, asking the agent's Workload API.

SoftHSM2 keeps each token in a directory; renaming that directory under a running server is
how these tests take the token away (the server then sees what an unplugged or unreachable
HSM looks like: its session and objects are gone).
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.hsm import make_softhsm
from tests.integration.harness import AgentProcess, ServerProcess, trustmesh_cmd, wait_until
from tests.pki import bank_ca_cert, pem
from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh.der import load_der_certificates
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import verify_x509_svid

HEADER = [("workload.spiffe.io", "true")]
TD = TrustDomain("example.org")
LEDGER = SpiffeId.parse("spiffe://example.org/ledger")
NOW = datetime.now(timezone.utc)


def _entry(server: ServerProcess, name: str = "ledger", node: str = "node-1") -> None:
    server.cli("entry", "create", "--spiffe-id", f"spiffe://example.org/{name}", "--node", node,
               "--selector", f"unix:uid:{os.getuid()}", check=True)


def _agent(server: ServerProcess, directory: Path, node: str = "node-1", config: Path | None = None) -> AgentProcess:
    token = server.cli("token", "create", "--node", node, check=True).stdout.strip()
    return AgentProcess(server, directory, join_token=token, config=config).start()


def _x509(agent: AgentProcess) -> workload_pb2.X509SVIDResponse:
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER, timeout=30)
        for reply in stream:
            if reply.svids:
                return reply
    raise AssertionError("no X509-SVID")


def _jwt(agent: AgentProcess, audience: str) -> str:
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        reply = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=[audience]), metadata=HEADER, timeout=15)
        return str(reply.svids[0].svid)


def _validate(agent: AgentProcess, token: str, audience: str) -> str:
    with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
        reply = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token), metadata=HEADER, timeout=15)
        return str(reply.spiffe_id)


def _start_fails(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    """A server start that must fail: its one-line error (stderr)."""
    out = subprocess.run(trustmesh_cmd("server", "run", "--trust-domain", "example.org", "--data-dir",
                                       str(tmp_path), "--bind", "127.0.0.1:0", "--attest-bind", "127.0.0.1:0",
                                       *extra), capture_output=True, text=True, timeout=60,
                         env={**os.environ, **(env or {})})
    assert out.returncode != 0, out.stderr
    assert "Traceback" not in out.stderr
    return out.stderr


def test_ca_keys_in_the_token_issue_rotate_and_survive_the_token_going_away(
        make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    hsm = make_softhsm(tmp_path / "hsm")
    server = make_server(extra=hsm.server_flags(signing_ca=True), env=hsm.env)
    assert "event=hsm_ready" in server.log() and "signing_ca_in_hsm=True" in server.log()
    # The root and JWT keys, made in the token, sensitive and never extractable.
    keys = hsm.private_keys()
    assert len(keys) == 2 and all("never extractable" in k for k in keys)
    _entry(server)
    agent = _agent(server, tmp_path / "agent")
    try:
        reply = _x509(agent)
        chain = load_der_certificates(reply.svids[0].x509_svid)
        assert verify_x509_svid(chain, {TD: load_der_certificates(reply.svids[0].bundle)}) == LEDGER
        token = _jwt(agent, "payments")
        assert _validate(agent, token, "payments") == str(LEDGER)

        # The token goes away: issuance is refused as unavailable (never signed in software)...
        token_dir = next(hsm.tokens.iterdir())
        away = hsm.tokens.parent / "away"
        token_dir.rename(away)
        with pytest.raises(grpc.RpcError) as info:
            _jwt(agent, "while-away")
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL)
        assert wait_until(lambda: "event=hsm_unavailable" in server.log())
        # ...and comes back: the server reconnects, replaces the signing CA whose key died with
        # the old session, and issues again.
        away.rename(token_dir)
        assert wait_until(lambda: _try_jwt(agent, "back") is not None)
        assert wait_until(lambda: "event=hsm_recovered" in server.log())
        assert wait_until(lambda: "event=signing_ca_rotated" in server.log())
        second = _agent(server, tmp_path / "agent2", node="node-2")
        second.stop()

        # A root rotation makes the new root and JWT key in the token too.
        server.cli("ca", "rotate", "--step", "prepare", check=True)
        assert len(hsm.private_keys()) == 4
        shown = json.loads(server.cli("ca", "show", "--json", check=True).stdout)["authorities"]
        assert {a["key_store"] for a in shown if a["kind"] != "signing-ca"} == {"hsm"}
    finally:
        agent.stop()


def _try_jwt(agent: AgentProcess, audience: str) -> str | None:
    try:
        return _jwt(agent, audience)
    except grpc.RpcError:
        return None


def test_start_refusals_with_a_token(tmp_path: Path, make_server: Callable[..., ServerProcess]) -> None:
    hsm = make_softhsm(tmp_path / "hsm")
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("0000\n")
    wrong_pin.chmod(0o600)
    flags = hsm.server_flags()
    err = _start_fails(tmp_path / "a", *flags[:-2], "--pkcs11-pin-file", str(wrong_pin), env=hsm.env)
    assert "PIN in --pkcs11-pin-file was refused" in err
    flags_other_label = [f if f != hsm.label else "no-such-token" for f in flags]
    assert "no token labelled 'no-such-token'" in _start_fails(tmp_path / "b", *flags_other_label, env=hsm.env)
    hsm.pin_file.chmod(0o644)
    assert "--pkcs11-pin-file" in _start_fails(tmp_path / "c", *flags, env=hsm.env)
    hsm.pin_file.chmod(0o600)
    # A CA whose keys are in the token is never started with software keys instead.
    server = make_server("d", extra=flags, env=hsm.env)
    server.stop()
    err = _start_fails(server.data_dir)
    assert "start with --key-manager pkcs11" in err


@pytest.mark.etcd
def test_replicas_share_one_token(make_server: Callable[..., ServerProcess], tmp_path: Path,
                                  etcd_server: str) -> None:
    hsm = make_softhsm(tmp_path / "hsm")
    env = {**hsm.env, "TRUSTMESH_KEK": "22" * 32}
    store = f"{etcd_server}/hsm{os.getpid()}"
    first = make_server("r1", store=store, extra=hsm.server_flags(), env=env)
    second = make_server("r2", store=store, extra=hsm.server_flags(), env=env)
    assert len(hsm.private_keys()) == 2  # one CA: the second replica opened the first one's keys
    _entry(first)
    agent = _agent(second, tmp_path / "agent")
    try:
        chain = load_der_certificates(_x509(agent).svids[0].x509_svid)
        roots = x509.load_pem_x509_certificates(first.bundle_path.read_bytes())
        assert verify_x509_svid(chain, {TD: roots}) == LEDGER
    finally:
        agent.stop()


# --- the bank's CA above the mesh --------------------------------------------------------------


def test_svids_chain_to_the_banks_root_for_a_standard_tls_client(
        make_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    root_key, issuing_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = bank_ca_cert("Example Bank Root CA", root_key, None)
    issuing = bank_ca_cert("Example Bank Issuing CA 7", issuing_key, (root, root_key))
    (tmp_path / "bank-chain.pem").write_bytes(pem(issuing, root))
    (tmp_path / "bank-root.pem").write_bytes(pem(root))
    key_file = tmp_path / "bank-issuing.key"
    key_file.write_bytes(issuing_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    key_file.chmod(0o600)
    server = make_server(extra=["--upstream-ca-cert", str(tmp_path / "bank-chain.pem"),
                                "--upstream-ca-key", str(key_file)])
    # The trust bundle is the bank's root, nothing else.
    assert x509.load_pem_x509_certificates(server.bundle_path.read_bytes()) == [root]
    _entry(server)
    # The bank's root names no trust domain: the agent is told which one to expect.
    config = tmp_path / "agent.yaml"
    config.write_text("trust-domain: example.org\n")
    agent = _agent(server, tmp_path / "agent", config=config)
    try:
        svid = _x509(agent).svids[0]
        assert load_der_certificates(svid.bundle) == [root]
        chain = load_der_certificates(svid.x509_svid)
        assert chain[-1] == issuing  # leaf, signing CA, the mesh root, the bank's issuing CA
        (tmp_path / "ledger.pem").write_bytes(pem(*chain))
        key = serialization.load_der_private_key(svid.x509_svid_key, None)
        (tmp_path / "ledger.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        # A TLS server with the workload's SVID; a standard client (OpenSSL through Python's
        # ssl) that knows only the bank's root accepts it, and one that knows another root does not.
        assert _tls_handshake(tmp_path, tmp_path / "bank-root.pem") is None
        other = bank_ca_cert("Another Root", ec.generate_private_key(ec.SECP256R1()), None)
        (tmp_path / "other-root.pem").write_bytes(pem(other))
        assert "certificate verify failed" in str(_tls_handshake(tmp_path, tmp_path / "other-root.pem"))
        # A root rotation asks the bank's CA again; the bundle stays the bank's root.
        server.cli("ca", "rotate", "--step", "prepare", check=True)
        assert x509.load_pem_x509_certificates(server.bundle_path.read_bytes()) == [root]
        shown = json.loads(server.cli("ca", "show", "--json", check=True).stdout)["authorities"]
        assert [a["issuer"] for a in shown if a["kind"] == "root"] == [issuing.subject.rfc4514_string()] * 2
    finally:
        agent.stop()


def _tls_handshake(certs: Path, cafile: Path) -> Exception | None:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(certs / "ledger.pem"), str(certs / "ledger.key"))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    client_ctx.check_hostname = False  # a SPIFFE peer is named by its URI SAN, not a host name
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                client_ctx.wrap_socket(raw) as tls:
            tls.sendall(b"x")
        return None
    except ssl.SSLError as err:
        return err
    finally:
        thread.join(timeout=10)
        listener.close()
