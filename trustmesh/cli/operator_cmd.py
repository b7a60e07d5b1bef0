"""`trustmesh operator …`, `login`, `logout`, `whoami`: people as identities, with two factors.

Administration (add, list, disable, remove, reset) goes over the admin API like every admin
command. Enrollment and login go to the server's login listener (TLS, no client certificate),
by default the --server port + 1; the operator's key is made here and never leaves.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc
from trustmesh.cli.admin_client import (
    TIMEOUT,
    AdminCallError,
    add_socket_flag,
    call,
    message_dict,
    print_json,
    tls_channel,
)
from trustmesh.cli.config import show_help
from trustmesh.cli.profile import Profile, clear_profile, load_profile, profile_dir, save_profile
from trustmesh.clock import format_utc
from trustmesh.duration import parse_duration
from trustmesh.hostport import join_host_port, split_host_port
from trustmesh.naming import OPERATOR_ROLES

DEFAULT_BUNDLE = Path("./.trustmesh/server/bundle.pem")
MAX_PASSWORD_FILE = 4096

OPERATOR_EXAMPLES = """\
examples:
  trustmesh operator add alice --role security-officer --team payments   # prints alice's enrollment token
  trustmesh operator enroll --server cp.internal:9443 --token TOKEN --password-file pw --trust-bundle bundle.pem
  trustmesh login --server cp.internal:9443 --operator alice --trust-bundle bundle.pem
  trustmesh operator list --json
  trustmesh operator reset alice --otp 123456      # a new token; alice's password, TOTP and certificates die
"""

LOGIN_EXAMPLES = """\
examples:
  trustmesh login --server cp.internal:9443 --operator alice --trust-bundle bundle.pem   # prompts
  trustmesh login --server cp.internal:9443 --operator alice --password-file pw --otp 123456
  trustmesh whoami
  trustmesh logout
"""


def _add(args: argparse.Namespace) -> int:
    req = admin_pb2.AddOperatorRequest(name=args.name, roles=args.role, team=args.team or "")
    reply = call(args, lambda s: s.AddOperator(req, timeout=TIMEOUT))
    print(reply.enrollment_token)  # one line: the token, for a script to hand over
    return 0


def _reset(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ResetOperator(admin_pb2.ResetOperatorRequest(name=args.name), timeout=TIMEOUT))
    print(reply.enrollment_token)
    return 0


def _list(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.ListOperators(admin_pb2.ListOperatorsRequest(), timeout=TIMEOUT))
    if args.json:
        print_json([message_dict(o) for o in reply.operators])
        return 0
    print(f"{'NAME':<20} {'STATE':<9} {'ROLES':<36} {'TEAM':<14} LOCKED UNTIL")
    for o in reply.operators:
        print(f"{o.name:<20} {o.state:<9} {','.join(o.roles):<36} {o.team or '-':<14} {format_utc(o.locked_until)}")
    return 0


def _disable(args: argparse.Namespace) -> int:
    call(args, lambda s: s.DisableOperator(admin_pb2.DisableOperatorRequest(name=args.name), timeout=TIMEOUT))
    print(f"operator {args.name} disabled: it cannot log in, and its certificates no longer work")
    return 0


def _remove(args: argparse.Namespace) -> int:
    call(args, lambda s: s.RemoveOperator(admin_pb2.RemoveOperatorRequest(name=args.name), timeout=TIMEOUT))
    print(f"operator {args.name} removed")
    return 0


# --- enrollment and login -----------------------------------------------------------------------


def _login_address(args: argparse.Namespace) -> str:
    """--login-server, else --server's host with its port + 1 (the server's default --login-bind)."""
    try:
        if args.login_server:
            host, port = split_host_port(args.login_server)
            return join_host_port(host, port)
        host, port = split_host_port(args.server)
    except ValueError as err:
        raise AdminCallError(f"{'--login-server' if args.login_server else '--server'}: {err}") from err
    if port >= 65535:
        raise AdminCallError("--server on port 65535 has no port + 1; give --login-server")
    return join_host_port(host, port + 1)


def _bundle(args: argparse.Namespace) -> Path:
    if args.trust_bundle:
        return Path(args.trust_bundle)
    profile = load_profile()
    if profile is not None and profile.bundle.exists():
        return profile.bundle
    if DEFAULT_BUNDLE.exists():
        return DEFAULT_BUNDLE
    raise AdminCallError("give --trust-bundle FILE: the server's bundle.pem, to check that it is the server")


def _password(args: argparse.Namespace, confirm: bool) -> str:
    if args.password_file:
        path = Path(args.password_file)
        try:
            if path.stat().st_size > MAX_PASSWORD_FILE:
                raise AdminCallError(f"--password-file {path} is larger than {MAX_PASSWORD_FILE} bytes")
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise AdminCallError(f"cannot read --password-file {path}: {getattr(err, 'strerror', None) or err}") \
                from err
        return text.removesuffix("\n").removesuffix("\r")
    if not sys.stdin.isatty():
        raise AdminCallError("give --password-file FILE (no terminal to ask on)")
    first = getpass.getpass("password: ")
    if confirm and getpass.getpass("password again: ") != first:
        raise AdminCallError("the passwords differ; run the command again")
    return first


def _login_call(args: argparse.Namespace, bundle: Path, invoke: object) -> object:
    address = _login_address(args)
    with tls_channel(address, bundle) as channel:
        stub = admin_pb2_grpc.OperatorLoginStub(channel)
        try:
            return invoke(stub)  # type: ignore[operator]
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                raise AdminCallError(f"cannot reach the login listener at {address} ({err.details()}): is the "
                                     "server running with --admin-bind, and is this its address?") from None
            raise AdminCallError(f"{err.details()} ({err.code().name})") from None


def _enroll(args: argparse.Namespace) -> int:
    bundle = _bundle(args)
    password = _password(args, confirm=True)
    req = admin_pb2.EnrollRequest(enrollment_token=args.token.strip(), password=password)
    reply = _login_call(args, bundle, lambda s: s.Enroll(req, timeout=TIMEOUT))
    assert isinstance(reply, admin_pb2.EnrollResponse)
    # One line: the TOTP URI, shown once. Add it to an authenticator app (or `qrencode -t ansi`).
    print(reply.totp_uri)
    return 0


def _login(args: argparse.Namespace) -> int:
    bundle = _bundle(args)
    try:
        ttl = parse_duration(args.ttl) if args.ttl else timedelta(0)
    except ValueError as err:
        raise AdminCallError(f"--ttl {args.ttl!r}: {err}") from err
    password = _password(args, confirm=False)
    otp = args.otp if args.otp is not None else (input("one-time code: ") if sys.stdin.isatty() else "")
    if not otp:
        raise AdminCallError("give --otp CODE: the current code of your authenticator")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.operator[:64] or "operator")]))
           .sign(key, hashes.SHA256()))
    req = admin_pb2.LoginRequest(operator=args.operator, password=password, otp=otp.strip(),
                                 csr=csr.public_bytes(serialization.Encoding.DER),
                                 ttl_seconds=int(ttl.total_seconds()))
    reply = _login_call(args, bundle, lambda s: s.Login(req, timeout=TIMEOUT))
    assert isinstance(reply, admin_pb2.LoginResponse)
    chain = b"".join(x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
                     for c in reply.cert_chain)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    profile = Profile(profile_dir(), args.server, args.operator, reply.spiffe_id, float(reply.expires_at),
                      tuple(reply.roles))
    save_profile(profile, chain, key_pem, bundle.read_bytes())
    print(f"logged in as {reply.spiffe_id} ({', '.join(reply.roles)}) until {format_utc(reply.expires_at)}")
    return 0


def _logout(args: argparse.Namespace) -> int:
    directory = profile_dir()
    if clear_profile(directory):
        print(f"logged out: removed the operator certificate and key from {directory}")
    else:
        print(f"not logged in (no profile in {directory})")
    return 0


def _whoami(args: argparse.Namespace) -> int:
    reply = call(args, lambda s: s.WhoAmI(admin_pb2.WhoAmIRequest(), timeout=TIMEOUT))
    if args.json:
        print_json(message_dict(reply))
        return 0
    roles = ", ".join(reply.roles) or ("all (break-glass)" if reply.kind == "local_admin" else "admin")
    until = f" until {format_utc(reply.expires_at)}" if reply.expires_at else ""
    team = f", team {reply.team}" if reply.team else ""
    print(f"{reply.actor}: roles {roles}{team}{until}")
    return 0


def _login_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="the server's --admin-bind address")
    p.add_argument("--login-server", metavar="HOST:PORT",
                   help="the server's --login-bind address (default: --server's port + 1)")
    p.add_argument("--trust-bundle", metavar="PEM",
                   help=f"the server's bundle.pem (default: the profile's, else {DEFAULT_BUNDLE})")
    p.add_argument("--password-file", metavar="FILE", help="read the password from FILE (default: ask, no echo)")


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    op = commands.add_parser(
        "operator", help="people who administer trustmesh: add, enroll, list, disable, remove, reset",
        description="Operators are people. Each logs in with a password and a TOTP code (two factors), gets a "
                    "short-lived certificate, and holds only its roles: " + ", ".join(OPERATOR_ROLES) + ".",
        epilog=OPERATOR_EXAMPLES, formatter_class=fmt)
    sub = op.add_subparsers(dest="operator_command", metavar="SUBCOMMAND", title="subcommands")

    p = sub.add_parser("add", help="add an operator; prints only its one-time enrollment token (24h)",
                       description="Add an operator with its roles (and team). Prints one line: the enrollment "
                                   "token, single use, valid 24 hours, stored only as a hash. Needs the admin "
                                   "socket or the admin role, and --otp.",
                       epilog=OPERATOR_EXAMPLES, formatter_class=fmt)
    p.add_argument("name", metavar="NAME", help="a-z, 0-9 and '-', starting with a letter (e.g. alice)")
    p.add_argument("--role", action="append", required=True, choices=OPERATOR_ROLES,
                   help="a role to hold; repeat for several")
    p.add_argument("--team", metavar="TEAM", help="the team the operator belongs to (e.g. payments)")
    add_socket_flag(p)
    p.set_defaults(func=_add)

    p = sub.add_parser("list", help="list operators (a table, or --json)",
                       description="List operators: state (pending, active, disabled), roles, team, lockout.",
                       epilog="example:\n  trustmesh operator list --json", formatter_class=fmt)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=_list)

    for name, func, text in (
            ("disable", _disable, "disable an operator: no login, and its certificates stop working at once"),
            ("remove", _remove, "remove an operator and its credentials"),
            ("reset", _reset, "new enrollment token (printed); the old password, TOTP secret and certificates "
                              "die; needs --otp")):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                           epilog=f"example:\n  trustmesh operator {name} alice", formatter_class=fmt)
        p.add_argument("name", metavar="NAME", help="the operator")
        add_socket_flag(p)
        p.set_defaults(func=func)

    p = sub.add_parser("enroll", help="set your password with your enrollment token; prints your TOTP URI once",
                       description="Enroll with the token an admin gave you: set your password (at least 12 "
                                   "characters) and receive your TOTP secret as one otpauth:// URI line, shown "
                                   "once, for your authenticator app.",
                       epilog=OPERATOR_EXAMPLES, formatter_class=fmt)
    _login_flags(p)
    p.add_argument("--token", required=True, metavar="TOKEN", help="the enrollment token from `operator add`")
    p.set_defaults(func=_enroll)
    op.set_defaults(func=show_help(op))

    p = commands.add_parser(
        "login", help="log in as an operator (password + TOTP) and keep a short-lived certificate",
        description="Log in with your password and a current TOTP code. A key pair is made here; the server "
                    "signs a certificate for spiffe://<td>/operator/NAME (8h by default, at most 12h), kept "
                    "with the key (mode 0600) in $TRUSTMESH_PROFILE_DIR (default ~/.trustmesh). Admin commands "
                    "then use it, unless --admin-socket or $TRUSTMESH_ADMIN_SOCKET is given. Five failures in "
                    "15 minutes lock the operator for 15 minutes.",
        epilog=LOGIN_EXAMPLES, formatter_class=fmt)
    _login_flags(p)
    p.add_argument("--operator", required=True, metavar="NAME", help="your operator name")
    p.add_argument("--otp", metavar="CODE", help="the current code of your authenticator (default: ask)")
    p.add_argument("--ttl", metavar="DURATION", help="certificate lifetime, at most 12h (default: the server's, 8h)")
    p.set_defaults(func=_login)

    p = commands.add_parser("logout", help="remove the operator certificate and key of `trustmesh login`",
                            description="Remove the operator certificate, key and profile from "
                                        "$TRUSTMESH_PROFILE_DIR (default ~/.trustmesh).",
                            epilog="example:\n  trustmesh logout", formatter_class=fmt)
    p.set_defaults(func=_logout)

    p = commands.add_parser("whoami", help="who the server takes you for: identity, roles, certificate expiry",
                            description="Ask the server who you are: your operator ID, roles and team, or "
                                        "local-root on the admin socket.",
                            epilog="examples:\n  trustmesh whoami\n  trustmesh whoami --json", formatter_class=fmt)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_socket_flag(p)
    p.set_defaults(func=_whoami)
