"""The SPIFFE Workload API on a unix socket, wire-compatible with the standard.

It runs on grpclib because a grpclib handler can reach the asyncio transport of its
connection, and so the socket, whose SO_PEERCRED tells who the caller is; grpcio gives a
handler no such access. Semantics follow the standard:

- a request without the ``workload.spiffe.io: true`` header is INVALID_ARGUMENT;
- a caller that cannot be attested gets UNAVAILABLE, one that matches no entry PERMISSION_DENIED;
- a stream sends its first message as soon as the caller has an SVID, then a complete
  snapshot on every change (what is absent is withdrawn), and never ends with OK;
- JWT-SVIDs carry every requested audience; JWT bundles hold only keys with a ``kid``.

A slow reader never holds others up: each stream computes the latest snapshot when it can
send, so at most one snapshot per stream is ever pending.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Collection
from datetime import datetime, timezone
from pathlib import Path

from google.protobuf import struct_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib._typing import IServable
from grpclib.server import Server, Stream

from trustmesh._proto.spiffe.workload import workload_pb2
from trustmesh._proto.spiffe.workload.workload_grpc import SpiffeWorkloadAPIBase
from trustmesh.bundle import Bundle
from trustmesh.errors import VerificationError
from trustmesh.jwtsvid import validate_jwt_svid
from trustmesh.keys import private_key_to_pkcs8_der
from trustmesh.logs import log_event
from trustmesh.metrics import Registry

from agent.identity import IdentitySource, NoIdentityError
from agent.workload_attestor import WorkloadAttestationError, WorkloadAttestor

log = logging.getLogger("trustmesh.workload_api")

HEADER = "workload.spiffe.io"
MAX_AUDIENCES = 16


def _now() -> datetime:
    return datetime.now(timezone.utc)


class WorkloadAPI(SpiffeWorkloadAPIBase):
    def __init__(self, source: IdentitySource, attestor: WorkloadAttestor, metrics: Registry,
                 clock: Callable[[], datetime] = _now) -> None:
        self._source = source
        self._attestor = attestor
        self._clock = clock
        self._streams = metrics.gauge("trustmesh_workload_api_streams", "open Workload API streams", ["method"])
        self._calls = metrics.counter("trustmesh_workload_api_calls_total", "Workload API calls by method and code",
                                      ["method", "code"])

    # --- common ---------------------------------------------------------------------------

    async def _attest(self, stream: Stream, method: str) -> list[str]:
        if stream.metadata is None or stream.metadata.get(HEADER) != "true":
            self._calls.inc(method=method, code="INVALID_ARGUMENT")
            raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")
        transport = stream.peer._transport  # noqa: SLF001 - grpclib exposes no public accessor
        sock: socket.socket | None = transport.get_extra_info("socket")
        if sock is None:
            raise GRPCError(Status.UNAVAILABLE, "cannot identify the caller: no socket")
        try:
            return await self._attestor.attest(sock)
        except WorkloadAttestationError as err:
            self._calls.inc(method=method, code="UNAVAILABLE")
            log_event(log, "workload_attestation_failed", level=logging.WARNING, method=method, error=str(err))
            raise GRPCError(Status.UNAVAILABLE, f"could not attest the caller: {err}") from err

    def _deny(self, method: str, selectors: Collection[str]) -> GRPCError:
        self._calls.inc(method=method, code="PERMISSION_DENIED")
        log_event(log, "no_identity", level=logging.INFO, method=method,
                  uid=next((s for s in selectors if s.startswith("unix:uid:")), "?"))
        return GRPCError(Status.PERMISSION_DENIED, "no identity issued")

    async def _watch(self, stream: Stream, method: str, selectors: list[str],
                     build: Callable[[], object | None]) -> None:
        """Send `build()` now and after every change, skipping identical snapshots."""
        self._streams.inc(method=method)
        try:
            await self._source.wait_until_synced()
            last: object | None = None
            version = self._source.version
            while True:
                if not self._source.entries_match(selectors):
                    raise self._deny(method, selectors)
                message = build()
                if message is not None and message != last:
                    await stream.send_message(message)
                    last = message
                version = await self._source.wait_for_change(version)
        finally:
            self._streams.dec(method=method)

    # --- X.509 ------------------------------------------------------------------------------

    def _x509_response(self, selectors: list[str]) -> workload_pb2.X509SVIDResponse | None:
        svids = self._source.x509_svids_for(selectors)
        if not svids:
            return None
        bundles = self._source.bundles()
        own = bundles.get(self._source.trust_domain)
        own_der = own.x509_authorities_der() if own else b""
        federated: dict[str, bytes] = {}
        for item in svids:
            for td in item.federates_with:
                bundle = bundles.get(td)
                if bundle is not None:
                    federated[str(td.id)] = bundle.x509_authorities_der()
        return workload_pb2.X509SVIDResponse(
            svids=[workload_pb2.X509SVID(
                spiffe_id=str(item.svid.spiffe_id), x509_svid=item.svid.chain_der(),
                x509_svid_key=private_key_to_pkcs8_der(item.svid.private_key),  # type: ignore[arg-type]
                bundle=own_der, hint=item.hint,
            ) for item in svids],
            federated_bundles=federated,
        )

    async def FetchX509SVID(self, stream: Stream) -> None:
        await stream.recv_message()
        selectors = await self._attest(stream, "FetchX509SVID")
        await self._watch(stream, "FetchX509SVID", selectors, lambda: self._x509_response(selectors))

    def _x509_bundles(self) -> workload_pb2.X509BundlesResponse:
        return workload_pb2.X509BundlesResponse(
            bundles={str(td.id): b.x509_authorities_der() for td, b in self._source.bundles().items()})

    async def FetchX509Bundles(self, stream: Stream) -> None:
        await stream.recv_message()
        selectors = await self._attest(stream, "FetchX509Bundles")
        await self._watch(stream, "FetchX509Bundles", selectors, self._x509_bundles)

    # --- JWT --------------------------------------------------------------------------------

    async def FetchJWTSVID(self, stream: Stream) -> None:
        request = await stream.recv_message()
        assert request is not None
        selectors = await self._attest(stream, "FetchJWTSVID")
        audiences = list(request.audience)
        if not audiences:
            self._calls.inc(method="FetchJWTSVID", code="INVALID_ARGUMENT")
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if len(audiences) > MAX_AUDIENCES or any(not a or len(a) > 256 for a in audiences):
            raise GRPCError(Status.INVALID_ARGUMENT, f"give 1 to {MAX_AUDIENCES} audiences of 1 to 256 characters")
        await self._source.wait_until_synced()
        try:
            svids = await self._source.jwt_svids_for(selectors, audiences, request.spiffe_id or None)
        except NoIdentityError:
            raise self._deny("FetchJWTSVID", selectors) from None
        self._calls.inc(method="FetchJWTSVID", code="OK")
        await stream.send_message(workload_pb2.JWTSVIDResponse(
            svids=[workload_pb2.JWTSVID(spiffe_id=s.spiffe_id, svid=s.token, hint=s.hint) for s in svids]))

    def _jwt_bundles(self) -> workload_pb2.JWTBundlesResponse:
        # Only JWT authorities: a JWT bundle is a JWKS of keys that each carry a kid.
        return workload_pb2.JWTBundlesResponse(bundles={
            str(td.id): Bundle(td, (), b.jwt_authorities).to_jwks() for td, b in self._source.bundles().items()
        })

    async def FetchJWTBundles(self, stream: Stream) -> None:
        await stream.recv_message()
        selectors = await self._attest(stream, "FetchJWTBundles")
        await self._watch(stream, "FetchJWTBundles", selectors, self._jwt_bundles)

    async def ValidateJWTSVID(self, stream: Stream) -> None:
        request = await stream.recv_message()
        assert request is not None
        await self._attest(stream, "ValidateJWTSVID")
        if not request.audience:
            raise GRPCError(Status.INVALID_ARGUMENT, "audience must be specified")
        if not request.svid:
            raise GRPCError(Status.INVALID_ARGUMENT, "svid must be specified")
        try:
            svid = validate_jwt_svid(request.svid, audience=request.audience,
                                     jwt_authorities=self._source.bundles().jwt_authorities(), now=self._clock())
        except VerificationError as err:
            self._calls.inc(method="ValidateJWTSVID", code="INVALID_ARGUMENT")
            raise GRPCError(Status.INVALID_ARGUMENT, f"the JWT-SVID is not valid: {err}") from err
        claims = struct_pb2.Struct()
        claims.update(dict(svid.claims))
        self._calls.inc(method="ValidateJWTSVID", code="OK")
        await stream.send_message(workload_pb2.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims))


class WorkloadAPIServer:
    """Owns the grpclib server and its socket file."""

    def __init__(self, socket_path: Path, api: WorkloadAPI, *extra: IServable) -> None:
        self.socket_path = socket_path
        self._server = Server([api, *extra])

    async def start(self) -> None:
        path = self.socket_path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()  # left behind by a previous run
        elif path.exists():
            raise WorkloadAttestationError(f"{path} exists and is not a socket; remove it or choose another --socket")
        await self._server.start(path=str(path))
        # Any local workload may connect: who it is comes from the kernel, not from the
        # socket's permissions. Operators restrict the directory if they want fewer callers.
        os.chmod(path, 0o777)

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()
        self.socket_path.unlink(missing_ok=True)
