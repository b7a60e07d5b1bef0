"""Operators as identities: enrollment, login with password and TOTP, roles from the call
table, step-up codes, lockout, and an audit trail that names people — against a real server
over real mTLS, with TOTP codes computed here from the secret each operator enrolled with."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from tests.integration.harness import ServerProcess
from tests.integration.operators_kit import PASSWORD, Operator, add_operator, audit, one_line
from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.controlplane.api.calls import CALLS, CallerKind
from trustmesh.naming import OPERATOR_ROLES, OTP_HEADER, server_dns_name


def test_enroll_login_use_and_audit(admin_server: tuple[ServerProcess, str, str], tmp_path: Path) -> None:
    server = admin_server[0]
    alice = add_operator(admin_server, tmp_path, "alice", "admin")
    # The token was single use.
    again = alice.run("operator", "enroll", *alice.login_flags(), "--token", "x" * 43)
    one_line(again, 1, "enrollment refused", "UNAUTHENTICATED")

    result = alice.login()
    assert result.returncode == 0, result.stderr
    assert "logged in as spiffe://example.org/operator/alice (admin) until 20" in result.stdout
    profile = alice.home / "profile"
    assert (profile / "operator-key.pem").stat().st_mode & 0o777 == 0o600
    assert (profile.stat().st_mode & 0o777) == 0o700

    who = json.loads(alice.run("whoami", "--json").stdout)
    assert who["actor"] == "spiffe://example.org/operator/alice" and who["roles"] == ["admin"]
    assert who["kind"] == "operator" and who["source"].startswith("127.0.0.1:")

    # Admin commands now go over mTLS with the operator certificate.
    listed = alice.run("agent", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    # A privileged call needs a fresh code on top of the certificate.
    one_line(alice.run("operator", "add", "carol", "--role", "viewer"), 1, "--otp", "PERMISSION_DENIED")
    added = alice.run("operator", "add", "carol", "--role", "viewer", "--otp", alice.code())
    assert added.returncode == 0 and len(added.stdout.splitlines()) == 1, added.stderr

    events = audit(server, "--actor", "alice")
    kinds = [e["kind"] for e in events]
    assert "operator.login" in kinds and "operator.add" in kinds
    add = next(e for e in events if e["kind"] == "operator.add" and e["subject"] == "carol")
    details = add["details"]
    assert isinstance(details, dict)
    assert add["actor"] == "spiffe://example.org/operator/alice" and details["role"] == "admin"
    assert str(details["source"]).startswith("127.0.0.1:")
    root_add = next(e for e in audit(server) if e["kind"] == "operator.add" and e["subject"] == "alice")
    assert str(root_add["actor"]).startswith("local-root (uid ")
    step_up = [e for e in events if e["kind"] == "operator.step_up"]
    assert step_up and step_up[0]["outcome"] == "denied"

    # Disabled: the certificate stops working at once, and so does login.
    server.cli("operator", "disable", "alice", check=True)
    one_line(alice.run("whoami"), 1, "no longer valid", "trustmesh login")
    one_line(alice.login(), 1, "login refused")
    assert alice.run("logout").returncode == 0 and not (profile / "operator-key.pem").exists()


def test_roles_follow_the_call_table(admin_server: tuple[ServerProcess, str, str], tmp_path: Path) -> None:
    """Every admin method x every role, over mTLS with each role's certificate: refused exactly
    where the table does not list the role; allowed step-up methods refuse a call without a code."""
    server = admin_server[0]
    people = {role: add_operator(admin_server, tmp_path, f"op-{role}", role) for role in OPERATOR_ROLES}
    methods = sorted(m for m in CALLS if m.startswith("/trustmesh.v1.Admin/"))
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    roots = server.bundle_path.read_bytes()
    for role, person in people.items():
        assert person.login().returncode == 0
        profile = person.home / "profile"
        creds = grpc.ssl_channel_credentials(roots, (profile / "operator-key.pem").read_bytes(),
                                             (profile / "operator.pem").read_bytes())
        options = [("grpc.ssl_target_name_override", server_dns_name(server.td))]
        with grpc.secure_channel(admin_server[1], creds, options=options) as channel:
            for full in methods:
                name = full.rsplit("/", 1)[1]
                rule = CALLS[full]
                request_type = service.methods_by_name[name].input_type._concrete_class
                call = channel.unary_unary(full, request_serializer=request_type.SerializeToString,
                                           response_deserializer=lambda b: b)
                allowed = role in rule.roles
                try:
                    call(request_type(), timeout=30)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as err:
                    code, details = err.code(), err.details() or ""
                where = f"{role} {name}: {code} {details}"
                if not allowed:
                    assert code == grpc.StatusCode.PERMISSION_DENIED and "does not hold a role" in details, where
                elif rule.step_up:
                    assert code == grpc.StatusCode.PERMISSION_DENIED and "--otp" in details, where
                else:
                    # Admitted by the table: whatever the handler says, it is not the role refusal.
                    assert "does not hold a role" not in details and "--otp" not in details, where
                    assert CallerKind.LOCAL_ADMIN in rule.kinds  # the root socket keeps every method
    denied = [e for e in audit(server, "--kind", "admin.call") if e["outcome"] == "denied"]
    assert any("op-viewer" in str(e["actor"]) for e in denied)


def test_lockout_reused_codes_and_reset(admin_server: tuple[ServerProcess, str, str], tmp_path: Path) -> None:
    server = admin_server[0]
    bob = add_operator(admin_server, tmp_path, "bob", "auditor")
    assert bob.login().returncode == 0
    used = bob.totp.at(bob.step * 30) if bob.totp else ""
    replay = bob.login(otp=used)  # the right password, a code already used
    one_line(replay, 1, "login refused")
    wrong = bob.run("login", *bob.login_flags(), "--operator", "nobody", "--otp", "123456")
    assert wrong.stderr == replay.stderr  # an unknown name reads exactly like a wrong factor

    (bob.home / "pw").write_text("not the password at all\n")
    for _ in range(4):  # 1 (the replay) + 4 = 5 failures in the window: locked
        one_line(bob.login(otp="000000"), 1, "login refused")
    (bob.home / "pw").write_text(PASSWORD + "\n")
    locked = bob.login()
    one_line(locked, 1, "login refused")
    assert locked.stderr == replay.stderr  # locked reads like any other refusal
    events = audit(server, "--kind", "operator.locked")
    assert [e["subject"] for e in events] == ["bob"]
    listed = json.loads(server.cli("operator", "list", "--json", check=True).stdout)
    assert next(o for o in listed if o["name"] == "bob")["locked_until"] > time.time()

    # A reset gives a new token; the old certificate dies; enrolling again unlocks.
    token = server.cli("operator", "reset", "bob", check=True).stdout.strip()
    one_line(bob.run("whoami"), 1, "no longer valid")
    bob.step = 0
    bob.enroll(token)
    assert bob.login().returncode == 0
    assert json.loads(bob.run("whoami", "--json").stdout)["roles"] == ["auditor"]


def test_refusals_are_one_line(admin_server: tuple[ServerProcess, str, str], tmp_path: Path) -> None:
    server = admin_server[0]
    one_line(server.cli("operator", "add", "Alice", "--role", "admin"), 1, "operator name", "a-z")
    one_line(server.cli("operator", "add", "al", "--role", "root"), 2, "invalid choice")
    server.cli("operator", "add", "dave", "--role", "viewer", check=True)
    one_line(server.cli("operator", "add", "dave", "--role", "viewer"), 1, "already exists", "reset")
    one_line(server.cli("operator", "disable", "nobody"), 1, "no operator nobody")
    home = tmp_path / "x"
    home.mkdir()
    person = Operator("dave", server, admin_server[1], admin_server[2], home)
    (home / "pw").write_text("short\n")
    token = server.cli("operator", "reset", "dave", check=True).stdout.strip()
    one_line(person.run("operator", "enroll", *person.login_flags(), "--token", token), 1, "12")
    gone = person.run("login", "--server", "127.0.0.1:1", "--login-server", "127.0.0.1:1", "--trust-bundle",
                      str(server.bundle_path), "--password-file", str(home / "pw"), "--operator", "dave", "--otp", "1")
    one_line(gone, 1, "cannot reach the login listener")
    assert OTP_HEADER == "x-trustmesh-otp"


def test_an_expired_operator_certificate_is_refused(admin_server: tuple[ServerProcess, str, str],
                                                    tmp_path: Path) -> None:
    server = admin_server[0]
    erin = add_operator(admin_server, tmp_path, "erin", "viewer")
    result = erin.run("login", *erin.login_flags(), "--operator", "erin", "--otp", erin.code(), "--ttl", "5s")
    assert result.returncode == 0, result.stderr
    profile = erin.home / "profile"
    cert = x509.load_pem_x509_certificate((profile / "operator.pem").read_bytes())
    not_after = cert.not_valid_after_utc.timestamp()
    assert not_after <= time.time() + 5
    assert erin.run("whoami").returncode == 0
    time.sleep(max(0.0, not_after - time.time()) + 1)
    # The CLI says so before trying; the server refuses the certificate itself at the handshake.
    one_line(erin.run("whoami"), 1, "expired at", "trustmesh login")
    creds = grpc.ssl_channel_credentials(server.bundle_path.read_bytes(), (profile / "operator-key.pem").read_bytes(),
                                         (profile / "operator.pem").read_bytes())
    options = [("grpc.ssl_target_name_override", server_dns_name(server.td))]
    with grpc.secure_channel(admin_server[1], creds, options=options) as channel:
        call = channel.unary_unary("/trustmesh.v1.Admin/WhoAmI", request_serializer=lambda m: m.SerializeToString(),
                                   response_deserializer=admin_pb2.WhoAmIResponse.FromString)
        with pytest.raises(grpc.RpcError) as refused:
            call(admin_pb2.WhoAmIRequest(), timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_login_attempts_are_rate_limited_per_address(make_server: Callable[..., ServerProcess],
                                                     tmp_path: Path) -> None:
    """Before any factor is checked (an Argon2 hash and an audit event each): a burst, then the
    refill rate, per source address, whatever operator names it tries."""
    server = make_server(extra=["--admin-bind", "127.0.0.1:0", "--login-bind", "127.0.0.1:0",
                                "--login-per-minute", "1", "--login-burst", "3"])
    admin = re.search(r"admin_bind=(\S+)", server.log())
    login = re.search(r"login_bind=(\S+)", server.log())
    assert admin and login
    home = tmp_path / "x"
    home.mkdir()
    (home / "pw").write_text(PASSWORD + "\n")
    spray = Operator("nobody", server, admin.group(1), login.group(1), home)
    for name in ("ann", "ben", "cat"):
        one_line(spray.run("login", *spray.login_flags(), "--operator", name, "--otp", "123456"), 1, "login refused")
    limited = spray.run("login", *spray.login_flags(), "--operator", "dan", "--otp", "123456")
    one_line(limited, 1, "too many login attempts from 127.0.0.1", "retry in", "RESOURCE_EXHAUSTED")
    assert [e["subject"] for e in audit(server, "--kind", "operator.login")] == ["ann", "ben", "cat"]
