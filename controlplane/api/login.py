"""The OperatorLogin service, on the login listener (TLS without a client certificate): thin,
like admin.py; the factors are checked by controlplane/operators.py."""

from __future__ import annotations

from datetime import timedelta

import grpc
from cryptography.hazmat.primitives import serialization

from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc
from trustmesh.controlplane.operators import Operators


class OperatorLoginServicer(admin_pb2_grpc.OperatorLoginServicer):
    def __init__(self, operators: Operators) -> None:
        self._operators = operators

    def register(self, server: grpc.aio.Server) -> None:
        admin_pb2_grpc.add_OperatorLoginServicer_to_server(self, server)

    async def Enroll(self, request: admin_pb2.EnrollRequest,
                     context: grpc.aio.ServicerContext) -> admin_pb2.EnrollResponse:
        record, uri = await self._operators.enroll(request.enrollment_token, request.password)
        return admin_pb2.EnrollResponse(operator=record.name, totp_uri=uri)

    async def Login(self, request: admin_pb2.LoginRequest,
                    context: grpc.aio.ServicerContext) -> admin_pb2.LoginResponse:
        issued = await self._operators.login(request.operator, request.password, request.otp, request.csr,
                                             timedelta(seconds=max(request.ttl_seconds, 0)))
        return admin_pb2.LoginResponse(
            cert_chain=[c.public_bytes(serialization.Encoding.DER) for c in issued.cert_chain],
            expires_at=int(issued.expires_at), spiffe_id=str(issued.spiffe_id), roles=list(issued.roles))
