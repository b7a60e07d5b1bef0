"""The console's way into the server: the operator login listener and the admin listener,
reached over the network like the CLI reaches them, never through the server's internals.

`log_in` makes a fresh P-256 key in memory, sends a CSR with the three factors to
OperatorLogin/Login and returns the certificate with the key. `AdminClient` then makes every
Admin call of one session over mTLS with that certificate, so the server's one role table,
its step-up codes and its audit trail (the operator's name) apply exactly as for the CLI.
The key is handed to gRPC as bytes and kept in the session's memory only.

Both connections check the server against the trust domain's roots as they are at the time
(a root rotation adds a new root before anything chains to it), under the reserved name
trustmesh-server.<td>, as agents and the CLI do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc
from trustmesh.controlplane.api.calls import CALLS, Caller, CallerKind
from trustmesh.errors import TrustmeshError
from trustmesh.naming import OTP_HEADER

CALL_TIMEOUT = 20.0
ADMIN_SERVICE = "/trustmesh.v1.Admin/"

# The server's answer, as the console's HTTP status and error code (CONTRACT.md).
_STATUSES: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_argument"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "unauthenticated"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "forbidden"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "already_exists"),
    grpc.StatusCode.FAILED_PRECONDITION: (409, "failed_precondition"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "resource_exhausted"),
    grpc.StatusCode.UNAVAILABLE: (502, "unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "deadline_exceeded"),
}


class ApiError(TrustmeshError):
    """An answer the console gives as `{"error": code, "message": message}` with `status`."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def api_error(err: grpc.aio.AioRpcError) -> ApiError:
    status, code = _STATUSES.get(err.code(), (502, "upstream_error"))
    if err.code() is grpc.StatusCode.UNAVAILABLE:
        return ApiError(status, code, "the console cannot reach the server's admin listener; try again shortly")
    return ApiError(status, code, err.details() or err.code().name.lower())


@dataclass(frozen=True)
class Upstream:
    """Where the server's listeners are and how to recognise the server there."""

    admin_address: str  # host:port to connect to (the admin listener as bound)
    login_address: str  # the login listener beside it
    server_name: str  # trustmesh-server.<td>, the name in the server's certificate
    roots: Callable[[], bytes]  # the trust domain's roots now, PEM


@dataclass(frozen=True)
class OperatorIdentity:
    """What a login returned: the operator's certificate, and the key it certifies."""

    operator: str
    spiffe_id: str
    roles: tuple[str, ...]
    expires_at: float  # unix seconds
    chain_pem: bytes
    key_pem: bytes

    def __repr__(self) -> str:  # never the key, whatever prints this
        return f"OperatorIdentity({self.operator!r}, {self.spiffe_id!r}, roles={self.roles!r})"


class LoginRefused(TrustmeshError):
    """A login that did not succeed; `reason` is refused, rate_limited or unavailable, and the
    message never says which factor was wrong."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


REFUSED = "login refused"


def _channel(address: str, upstream: Upstream, roots: bytes, chain_pem: bytes | None = None,
             key_pem: bytes | None = None) -> grpc.aio.Channel:
    creds = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key_pem, certificate_chain=chain_pem)
    return grpc.aio.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", upstream.server_name)])


def _csr(operator: str) -> tuple[bytes, bytes]:
    """A fresh key (PEM, unencrypted: it never leaves this process) and a CSR for it (DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, operator[:64] or "operator")]))
           .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, csr.public_bytes(serialization.Encoding.DER)


async def log_in(upstream: Upstream, operator: str, password: str, otp: str, ttl: timedelta) -> OperatorIdentity:
    """The three factors and a CSR to the login listener; the certificate with its key, or
    LoginRefused."""
    key_pem, csr = _csr(operator)
    request = admin_pb2.LoginRequest(operator=operator, password=password, otp=otp.strip(), csr=csr,
                                     ttl_seconds=int(ttl.total_seconds()))
    channel = _channel(upstream.login_address, upstream, upstream.roots())
    try:
        reply = await admin_pb2_grpc.OperatorLoginStub(channel).Login(request, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as err:
        if err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise LoginRefused("rate_limited", "too many login attempts; wait a minute and try again") from None
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise LoginRefused("unavailable", "the server's login listener cannot be reached; try again "
                                              "shortly") from None
        # Whichever factor was wrong, or a malformed name: the same words, as the server says.
        raise LoginRefused("refused", REFUSED) from None
    finally:
        await channel.close()
    chain_pem = b"".join(x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM)
                         for c in reply.cert_chain)
    return OperatorIdentity(operator, reply.spiffe_id, tuple(reply.roles), float(reply.expires_at), chain_pem,
                            key_pem)


def may_call(roles: tuple[str, ...], method: str) -> bool:
    """Whether the server's role table lets an operator with `roles` call Admin/`method`.

    The server decides every call; the console asks first only so that pages and live updates
    do not make calls the roles cannot (each refused call is an audit event)."""
    rule = CALLS.get(ADMIN_SERVICE + method)
    return rule is not None and rule.permits(Caller(CallerKind.OPERATOR, "", roles=frozenset(roles)))


class AdminClient:
    """One session's Admin API: calls over mTLS with the operator's certificate."""

    def __init__(self, upstream: Upstream, identity: OperatorIdentity) -> None:
        self._upstream = upstream
        self.identity = identity
        self._roots = b""
        self._stub: admin_pb2_grpc.AdminStub | None = None
        self._channels: list[grpc.aio.Channel] = []  # the current one last; older ones close with the session

    def may(self, method: str) -> bool:
        return may_call(self.identity.roles, method)

    def _current(self) -> admin_pb2_grpc.AdminStub:
        roots = self._upstream.roots()
        if self._stub is None or roots != self._roots:
            # A channel keeps the roots it was made with: after a root rotation a new one is
            # needed. The old one may still carry calls in flight; it closes with the session.
            channel = _channel(self._upstream.admin_address, self._upstream, roots, self.identity.chain_pem,
                               self.identity.key_pem)
            self._channels.append(channel)
            self._roots, self._stub = roots, admin_pb2_grpc.AdminStub(channel)
        return self._stub

    async def call(self, method: str, request: Any, *, otp: str = "") -> Any:
        """Admin/`method` with `request`; ApiError when the server refuses it or cannot be reached."""
        metadata = ((OTP_HEADER, otp.strip()),) if otp.strip() else None
        try:
            return await getattr(self._current(), method)(request, timeout=CALL_TIMEOUT, metadata=metadata)
        except grpc.aio.AioRpcError as err:
            raise api_error(err) from None

    async def call_if_allowed(self, method: str, request: Any) -> Any | None:
        """The reply, or None when the operator's roles may not make the call (not asked)."""
        if not self.may(method):
            return None
        return await self.call(method, request)

    async def close(self) -> None:
        channels, self._channels, self._stub = self._channels, [], None
        for channel in channels:
            await channel.close()
