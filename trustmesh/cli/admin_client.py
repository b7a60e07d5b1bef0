"""The CLI's connection to the server's admin socket, shared by every admin command."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import grpc
from cryptography import x509
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from trustmesh._proto.trustmesh.v1 import admin_pb2_grpc
from trustmesh.cli.profile import Profile, load_profile
from trustmesh.clock import format_utc
from trustmesh.errors import TrustmeshError, VerificationError
from trustmesh.hostport import split_host_port
from trustmesh.naming import OTP_HEADER, server_dns_name
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import spiffe_id_from_certificate

ENV = "TRUSTMESH_ADMIN_SOCKET"
SERVER_ENV = "TRUSTMESH_ADMIN_SERVER"
DEFAULT_SOCKET = "./.trustmesh/server/admin.sock"
TIMEOUT = 30.0

T = TypeVar("T")


class AdminCallError(TrustmeshError):
    """The server refused an admin call; the message is the server's own."""


def add_socket_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-socket", metavar="PATH",
        help=f"the server's admin socket (default ${ENV}, else {DEFAULT_SOCKET})",
    )
    remote = parser.add_argument_group(
        "remote administration (instead of the socket; the server runs with --admin-bind)")
    remote.add_argument(
        "--admin-server", metavar="HOST:PORT", help=f"the server's --admin-bind address (or ${SERVER_ENV})"
    )
    remote.add_argument("--admin-cert", metavar="PEM", help="your admin X509-SVID chain (an entry marked --admin)")
    remote.add_argument("--admin-key", metavar="PEM", help="its private key")
    remote.add_argument("--trust-bundle", metavar="PEM", help="the trust domain's roots (the server's bundle.pem)")
    parser.add_argument("--otp", metavar="CODE",
                        help="a current one-time code from your authenticator, for calls that need one "
                             "(CA rotation, operator add/reset, agent ban, partner issue, access approve, break-glass)")


def _remote_channel(args: argparse.Namespace, server: str) -> grpc.Channel:
    files = {"--admin-cert": args.admin_cert, "--admin-key": args.admin_key, "--trust-bundle": args.trust_bundle}
    missing = [flag for flag, value in files.items() if not value]
    if missing:
        raise AdminCallError(f"--admin-server needs {', '.join(missing)} as well")
    try:
        split_host_port(server)
    except ValueError as err:
        raise AdminCallError(f"--admin-server: {err}") from err
    return tls_channel(server, Path(args.trust_bundle), Path(args.admin_cert), Path(args.admin_key))


def tls_channel(server: str, bundle: Path, cert: Path | None = None, key: Path | None = None) -> grpc.Channel:
    """A TLS channel to the trustmesh server at `server`, checked against the roots in `bundle`
    (the server's name is derived from the trust domain they name), with a client certificate
    when `cert` and `key` are given."""
    try:
        roots_pem = bundle.read_bytes()
        creds = grpc.ssl_channel_credentials(
            root_certificates=roots_pem,
            private_key=key.read_bytes() if key else None,
            certificate_chain=cert.read_bytes() if cert else None,
        )
        # Under an upstream authority the bundle is the bank's root, which names no trust
        # domain; an operator or admin certificate does.
        named = x509.load_pem_x509_certificates(roots_pem)
        if cert is not None:
            named += x509.load_pem_x509_certificates(cert.read_bytes())[:1]
        td = trust_domain_of(named)
    except (OSError, ValueError) as err:
        raise AdminCallError(f"cannot read the credentials for {server}: {err}") from err
    return grpc.secure_channel(server, creds, options=[("grpc.ssl_target_name_override", server_dns_name(td))])


def _profile_channel(profile: Profile) -> grpc.Channel:
    if profile.expired:
        raise AdminCallError(f"your operator certificate ({profile.operator}) expired at "
                             f"{format_utc(profile.expires_at)}: run `trustmesh login` again")
    return tls_channel(profile.server, profile.bundle, profile.cert, profile.key)


class _WithMetadata(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Adds fixed metadata (the step-up code) to every call of a channel."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> Any:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
                            details.credentials, getattr(details, "wait_for_ready", None),
                            getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any


def trust_domain_of(roots: list[x509.Certificate]) -> TrustDomain:
    for root in roots:
        try:
            return spiffe_id_from_certificate(root).trust_domain
        except VerificationError:
            continue
    if value := os.environ.get(TRUST_DOMAIN_ENV):
        try:
            return TrustDomain(value)
        except ValueError as err:
            raise AdminCallError(f"${TRUST_DOMAIN_ENV}: {err}") from err
    raise AdminCallError("the trust bundle has no root with a SPIFFE ID; pass the server's bundle.pem (when the "
                         f"mesh's root is signed by the bank's CA, set {TRUST_DOMAIN_ENV}=<trust domain>)")


# The trust domain when the bundle cannot say it (an upstream authority's root).
TRUST_DOMAIN_ENV = "TRUSTMESH_TRUST_DOMAIN"


def socket_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "admin_socket", None) or os.environ.get(ENV) or DEFAULT_SOCKET)


def _check_socket(path: Path) -> None:
    """Say why the admin socket cannot be used before gRPC would, in words a person can act on:
    missing (no server), or out of this user's reach (the data directory is the server user's)."""
    try:
        there = path.exists()
        usable = os.access(path, os.R_OK | os.W_OK) if there else False
    except PermissionError:
        there, usable = True, False  # a directory on the way may not be entered
    if not there:
        raise AdminCallError(
            f"cannot reach the trustmesh server at {path}: is `trustmesh server run` running? "
            f"set --admin-socket or {ENV}"
        )
    if not usable:
        raise AdminCallError(
            f"permission denied opening the admin socket {path} as uid {os.getuid()}: run trustmesh as "
            "the user that runs the server (or root), or use --admin-server with an admin SVID"
        )


def _channel(args: argparse.Namespace) -> tuple[grpc.Channel, str]:
    """--admin-server (flag or environment) with an admin SVID; else the socket when one is
    named (flag or environment); else the operator profile of `trustmesh login`; else the
    default socket."""
    server = getattr(args, "admin_server", None) or os.environ.get(SERVER_ENV)
    explicit_socket = getattr(args, "admin_socket", None) or os.environ.get(ENV)
    if server:
        return _remote_channel(args, server), server
    if not explicit_socket and (profile := load_profile()) is not None:
        return _profile_channel(profile), f"{profile.server} as {profile.operator}"
    path = socket_path(args)
    _check_socket(path)
    return grpc.insecure_channel(f"unix:{path}"), str(path)


def call(args: argparse.Namespace, invoke: Callable[[admin_pb2_grpc.AdminStub], T]) -> T:
    """Run one admin RPC; turn transport and status errors into messages a person can act on."""
    channel, where = _channel(args)
    otp = getattr(args, "otp", None)
    if otp:
        channel = grpc.intercept_channel(channel, _WithMetadata(((OTP_HEADER, otp.strip()),)))
    with channel:
        try:
            return invoke(admin_pb2_grpc.AdminStub(channel))
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise AdminCallError(
                    f"cannot reach the trustmesh server at {where} ({err.details()}): "
                    "is it running, and may you open the socket?"
                ) from None
            raise AdminCallError(f"{err.details()} ({code.name})") from None


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def message_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data with proto field names and every field present.

    Proto JSON writes 64-bit integers as strings; revisions, TTLs and times read better
    (and compare more easily in scripts) as numbers, so top-level ones are turned back."""
    data: dict[str, Any] = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    for field in message.DESCRIPTOR.fields:
        if field.type in _INT64 and field.name in data and not isinstance(data[field.name], list):
            data[field.name] = int(data[field.name])
    return data


def read_input_file(path: Path, flag: str, limit: int, what: str) -> bytes:
    """A small input file (a bundle, a CSR) read whole, refusing one far too large to be `what`."""
    try:
        if path.stat().st_size > limit:
            raise AdminCallError(f"{flag} {path} is larger than {limit // 1024} KiB; is it {what}?")
        return path.read_bytes()
    except OSError as err:
        raise AdminCallError(f"cannot read {flag} {path}: {err.strerror}") from err
