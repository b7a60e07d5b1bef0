"""The wire contracts: generated code is fresh, and the SPIFFE Workload API is the standard's.

The Workload API tables below are transcribed from the SPIFFE standard
(spiffe/spiffe standards/workloadapi.proto, SPIFFE_Workload_API.md). Every SPIFFE client
library calls those method paths and decodes those field numbers, so a mismatch here breaks
every workload, not just ours.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import pytest

from trustmesh._proto.spiffe.workload import workload_grpc, workload_pb2, workload_pb2_grpc
from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc, types_pb2

ROOT = Path(__file__).resolve().parents[2]
GENERATED = ROOT / "trustmesh" / "_proto"

# ---------------------------------------------------------------------------------------
# (a) freshness


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gen-proto"), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, f"scripts/gen-proto failed:\n{run.stderr}"
    fresh, committed = _tree(out), _tree(GENERATED)
    stale = sorted(name for name in fresh.keys() | committed.keys() if fresh.get(name) != committed.get(name))
    assert not stale, (
        f"trustmesh/_proto is stale (differs from proto/ in: {', '.join(stale)}); "
        f"run scripts/gen-proto (this check used grpcio-tools {version('grpcio-tools')}; "
        "the committed copy must come from the same version)"
    )


# ---------------------------------------------------------------------------------------
# (b) the SPIFFE Workload API is the standard's

WORKLOAD_SERVICE = workload_pb2.DESCRIPTOR.services_by_name["SpiffeWorkloadAPI"]

# method -> (request, response, client streaming, server streaming)
WORKLOAD_METHODS = {
    "FetchX509SVID": ("X509SVIDRequest", "X509SVIDResponse", False, True),
    "FetchX509Bundles": ("X509BundlesRequest", "X509BundlesResponse", False, True),
    "FetchJWTSVID": ("JWTSVIDRequest", "JWTSVIDResponse", False, False),
    "FetchJWTBundles": ("JWTBundlesRequest", "JWTBundlesResponse", False, True),
    "ValidateJWTSVID": ("ValidateJWTSVIDRequest", "ValidateJWTSVIDResponse", False, False),
}

# FieldDescriptorProto.Type numbers from google/protobuf/descriptor.proto (wire-stable).
S, MSG, B = 9, 11, 12  # TYPE_STRING, TYPE_MESSAGE, TYPE_BYTES
ONE, MANY, MAP = "one", "repeated", "map<string, bytes>"

# message -> {field: (number, type, kind, message type name or "")}
WORKLOAD_MESSAGES: dict[str, dict[str, tuple[int, int, str, str]]] = {
    "X509SVIDRequest": {},
    "X509SVIDResponse": {
        "svids": (1, MSG, MANY, "X509SVID"),
        "crl": (2, B, MANY, ""),
        "federated_bundles": (3, MSG, MAP, ""),
    },
    "X509SVID": {
        "spiffe_id": (1, S, ONE, ""),
        "x509_svid": (2, B, ONE, ""),
        "x509_svid_key": (3, B, ONE, ""),
        "bundle": (4, B, ONE, ""),
        "hint": (5, S, ONE, ""),
    },
    "X509BundlesRequest": {},
    "X509BundlesResponse": {
        "crl": (1, B, MANY, ""),
        "bundles": (2, MSG, MAP, ""),
    },
    "JWTSVIDRequest": {
        "audience": (1, S, MANY, ""),
        "spiffe_id": (2, S, ONE, ""),
    },
    "JWTSVIDResponse": {"svids": (1, MSG, MANY, "JWTSVID")},
    "JWTSVID": {
        "spiffe_id": (1, S, ONE, ""),
        "svid": (2, S, ONE, ""),
        "hint": (3, S, ONE, ""),
    },
    "JWTBundlesRequest": {},
    "JWTBundlesResponse": {"bundles": (1, MSG, MAP, "")},
    "ValidateJWTSVIDRequest": {
        "audience": (1, S, ONE, ""),
        "svid": (2, S, ONE, ""),
    },
    "ValidateJWTSVIDResponse": {
        "spiffe_id": (1, S, ONE, ""),
        "claims": (2, MSG, ONE, "google.protobuf.Struct"),
    },
}


# Descriptors are typed Any: the project has no protobuf type stubs.
def _is_repeated(field: Any) -> bool:
    # protobuf 7 dropped FieldDescriptor.label in favour of is_repeated.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == 3)  # LABEL_REPEATED


def _kind(field: Any) -> str:
    if not _is_repeated(field):
        return ONE
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return f"map<{'string' if key.type == S else key.type}, {'bytes' if value.type == B else value.type}>"
    return MANY


def test_workload_api_has_no_package_and_the_standard_service_name() -> None:
    assert workload_pb2.DESCRIPTOR.name == "spiffe/workload/workload.proto"
    assert workload_pb2.DESCRIPTOR.package == ""
    assert list(workload_pb2.DESCRIPTOR.services_by_name) == ["SpiffeWorkloadAPI"]
    assert WORKLOAD_SERVICE.full_name == "SpiffeWorkloadAPI"


def test_workload_api_methods_and_streaming() -> None:
    got = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
        for m in WORKLOAD_SERVICE.methods
    }
    assert got == WORKLOAD_METHODS


@pytest.mark.parametrize("message", sorted(WORKLOAD_MESSAGES))
def test_workload_api_message_fields_match_the_standard(message: str) -> None:
    desc = workload_pb2.DESCRIPTOR.message_types_by_name[message]
    assert desc.full_name == message  # no package: top-level names, as in the standard
    got = {
        f.name: (
            f.number,
            f.type,
            _kind(f),
            f.message_type.full_name if f.message_type and _kind(f) != MAP else "",
        )
        for f in desc.fields
    }
    assert got == WORKLOAD_MESSAGES[message]


def test_workload_api_declares_only_the_standard_messages() -> None:
    assert set(workload_pb2.DESCRIPTOR.message_types_by_name) == set(WORKLOAD_MESSAGES)


class _RecordingChannel:
    """Stands in for a grpc.Channel: records the method paths a stub registers."""

    def __init__(self) -> None:
        self.paths: dict[str, str] = {}

    def __getattr__(self, cardinality: str) -> Callable[..., None]:
        if cardinality not in {"unary_unary", "unary_stream", "stream_unary", "stream_stream"}:
            raise AttributeError(cardinality)

        def register(path: str, *args: Any, **kwargs: Any) -> None:
            self.paths[path] = cardinality

        return register


def test_grpcio_stub_calls_the_standard_paths() -> None:
    channel = _RecordingChannel()
    workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
    assert channel.paths == {
        "/SpiffeWorkloadAPI/FetchX509SVID": "unary_stream",
        "/SpiffeWorkloadAPI/FetchX509Bundles": "unary_stream",
        "/SpiffeWorkloadAPI/FetchJWTSVID": "unary_unary",
        "/SpiffeWorkloadAPI/FetchJWTBundles": "unary_stream",
        "/SpiffeWorkloadAPI/ValidateJWTSVID": "unary_unary",
    }


class _WorkloadApi(workload_grpc.SpiffeWorkloadAPIBase):
    """A canned Workload API on grpclib, to prove the generated code interoperates."""

    async def FetchX509SVID(self, stream: Any) -> None:
        await stream.recv_message()
        svid = workload_pb2.X509SVID(
            spiffe_id="spiffe://example.org/ledger", x509_svid=b"cert", x509_svid_key=b"key",
            bundle=b"root", hint="internal",
        )
        await stream.send_message(
            workload_pb2.X509SVIDResponse(
                svids=[svid], crl=[b"crl"], federated_bundles={"spiffe://partner.example": b"p"}
            )
        )

    async def FetchX509Bundles(self, stream: Any) -> None:
        raise NotImplementedError

    async def FetchJWTSVID(self, stream: Any) -> None:
        request = await stream.recv_message()
        await stream.send_message(
            workload_pb2.JWTSVIDResponse(
                svids=[workload_pb2.JWTSVID(spiffe_id=request.spiffe_id, svid=",".join(request.audience))]
            )
        )

    async def FetchJWTBundles(self, stream: Any) -> None:
        raise NotImplementedError

    async def ValidateJWTSVID(self, stream: Any) -> None:
        request = await stream.recv_message()
        response = workload_pb2.ValidateJWTSVIDResponse(spiffe_id="spiffe://example.org/ledger")
        response.claims.update({"aud": [request.audience], "sub": "spiffe://example.org/ledger"})
        await stream.send_message(response)


async def test_grpcio_client_talks_to_a_grpclib_server_over_a_unix_socket(tmp_path: Path) -> None:
    from grpclib.server import Server

    assert set(_WorkloadApi().__mapping__()) == {
        f"/SpiffeWorkloadAPI/{name}" for name in WORKLOAD_METHODS
    }
    socket_path = tmp_path / "api.sock"
    server = Server([_WorkloadApi()])
    await server.start(path=str(socket_path))
    try:
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            header = (("workload.spiffe.io", "true"),)

            call = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=header)
            first = await call.read()
            call.cancel()
            assert first.svids[0].spiffe_id == "spiffe://example.org/ledger"
            assert first.svids[0].hint == "internal"
            assert dict(first.federated_bundles) == {"spiffe://partner.example": b"p"}

            jwt = await stub.FetchJWTSVID(
                workload_pb2.JWTSVIDRequest(audience=["a", "b"], spiffe_id="spiffe://example.org/x"),
                metadata=header,
            )
            assert [(s.spiffe_id, s.svid) for s in jwt.svids] == [("spiffe://example.org/x", "a,b")]

            valid = await stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="ledger", svid="t"), metadata=header
            )
            assert valid.claims["sub"] == "spiffe://example.org/ledger"
            assert list(valid.claims["aud"]) == ["ledger"]
    finally:
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------------------
# (c) the trustmesh services


def _rpcs(service: Any) -> dict[str, tuple[bool, bool]]:
    return {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}


def test_node_service() -> None:
    service = node_pb2.DESCRIPTOR.services_by_name["Node"]
    assert service.full_name == "trustmesh.v1.Node"
    assert _rpcs(service) == {
        "Attest": (True, True),
        "RenewAgent": (False, False),
        "Sync": (False, True),
        "BatchSignX509": (False, False),
        "SignJWT": (False, False),
        "ReportFlows": (False, False),
    }
    for name in ("NodeStub", "NodeServicer", "add_NodeServicer_to_server"):
        assert hasattr(node_pb2_grpc, name)


ADMIN_RPCS = {
    "CreateEntry", "GetEntry", "ListEntries", "UpdateEntry", "DeleteEntry",
    "CreateJoinToken",
    "ListAgents", "BanAgent", "EvictAgent", "ClearAgent", "LabelAgent",
    "GetBundle", "ListFederationRelationships", "CreateFederationRelationship",
    "DeleteFederationRelationship", "RefreshFederatedBundle",
    "ApplyPolicy", "DiffPolicy", "GetPolicy", "ListPolicyRevisions", "RollbackPolicy",
    "GetCAJournal", "RotateRoot",
    "IssuePartnerCertificate", "RevokePartnerCertificate",
    "ListAuditEvents", "VerifyAudit",
    "AddOperator", "ListOperators", "DisableOperator", "RemoveOperator", "ResetOperator", "WhoAmI",
    "GetPolicyOwners", "SetPolicyOwners", "ListFlows",
    "RequestAccess", "ApproveAccess", "DenyAccess", "ListAccess", "RevokeAccess", "BreakGlass", "ReviewAccess",
    "ListQuarantines", "AddQuarantine", "ReleaseQuarantine",
    "GetStatus",
}  # fmt: skip
ADMIN_SERVER_STREAMS = {"ExportTrace"}


def test_admin_service() -> None:
    service = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
    assert service.full_name == "trustmesh.v1.Admin"
    assert _rpcs(service) == {name: (False, False) for name in ADMIN_RPCS} | {
        name: (False, True) for name in ADMIN_SERVER_STREAMS}
    for name in ("AdminStub", "AdminServicer", "add_AdminServicer_to_server"):
        assert hasattr(admin_pb2_grpc, name)


def test_every_rpc_has_its_own_request_and_response() -> None:
    for module in (node_pb2, admin_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                assert m.input_type.name == f"{m.name}Request", m.full_name
                assert m.output_type.name == f"{m.name}Response", m.full_name


def test_shared_types_live_in_types_proto() -> None:
    for name in ("Entry", "Selector", "Bundle", "JwtAuthority", "CompiledPolicy", "AuditEvent", "AttestedNode"):
        assert types_pb2.DESCRIPTOR.message_types_by_name[name].full_name == f"trustmesh.v1.{name}"
    snapshot = node_pb2.SyncSnapshot.DESCRIPTOR
    assert snapshot.fields_by_name["entries"].message_type is types_pb2.Entry.DESCRIPTOR
    assert snapshot.fields_by_name["bundles"].message_type is types_pb2.Bundle.DESCRIPTOR
    assert admin_pb2.CreateEntryRequest.DESCRIPTOR.fields_by_name["entry"].message_type is types_pb2.Entry.DESCRIPTOR


def test_batch_sign_reports_errors_per_item() -> None:
    result = node_pb2.X509SignResult.DESCRIPTOR
    assert [f.name for f in result.oneofs_by_name["outcome"].fields] == ["svid", "error"]
    ok = node_pb2.X509SignResult(entry_id="e1", svid=node_pb2.X509Svid(cert_chain=[b"leaf"]))
    bad = node_pb2.X509SignResult(entry_id="e2", error=node_pb2.ItemError(code=5, message="no such entry"))
    decoded = node_pb2.BatchSignX509Response.FromString(
        node_pb2.BatchSignX509Response(results=[ok, bad]).SerializeToString()
    )
    assert [r.WhichOneof("outcome") for r in decoded.results] == ["svid", "error"]


def test_attest_steps_are_one_of() -> None:
    first = node_pb2.AttestRequest(csr=b"csr", x509pop=node_pb2.X509PopEvidence(cert_chain=[b"node"]))
    assert first.WhichOneof("step") == "x509pop"
    first.join_token = "t"
    assert first.WhichOneof("step") == "join_token"
    reply = node_pb2.AttestResponse(challenge=node_pb2.X509PopChallenge(nonce=b"n" * 32))
    assert reply.WhichOneof("step") == "challenge"


def test_generated_messages_report_their_package_module() -> None:
    # Pickling and reprs find classes by __module__; the generator rewrites it.
    assert types_pb2.Entry.__module__ == "trustmesh._proto.trustmesh.v1.types_pb2"
    assert workload_pb2.X509SVID.__module__ == "trustmesh._proto.spiffe.workload.workload_pb2"


def test_generated_code_is_loaded_only_under_its_package() -> None:
    # A generated module loaded as "spiffe.workload..." or "trustmesh.v1..." would mean an
    # import was not rewritten: a second copy of the module, or a clash with other SPIFFE
    # libraries' top-level "spiffe" package.
    stray = [
        name
        for name, module in list(sys.modules.items())
        if GENERATED in Path(getattr(module, "__file__", None) or "/").resolve().parents
        and not name.startswith("trustmesh._proto")
    ]
    assert stray == []
    assert "trustmesh.v1" not in sys.modules
