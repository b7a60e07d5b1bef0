"""The Workload API server over a real unix socket, called by a real grpcio client with the
standard messages, with the real kernel attestor. Only the SVID cache is a fake here (an
in-test IdentitySource): the agent integration tests run the real one.

Covered: the standard's refusals (missing header, no entry, failed attestation, bad JWT
requests), stream semantics (first message without waiting for a change, full snapshots,
no identical resends, rotation pushed, entry deletion ends the stream with
PERMISSION_DENIED, never OK), federation, JWT audiences and validation, a caller of another
uid, and faults: thousands of connect/disconnect cycles, garbage on the socket, a reader
that never reads.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import grpc.aio
import h2.config
import h2.connection
import h2.settings
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import given
from hypothesis import strategies as st

from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
from trustmesh.agent.identity import NoIdentityError, WorkloadJwtSvid, WorkloadX509Svid
from trustmesh.agent.workload_api import WorkloadAPI, WorkloadApiError, WorkloadAPIServer
from trustmesh.agent.workload_attestor import PeerCredentials, WorkloadAttestationError, WorkloadAttestor
from trustmesh.bundle import Bundle, BundleSet, JwtAuthority
from trustmesh.der import load_der_certificates
from trustmesh.errors import TrustmeshError
from trustmesh.jwtsvid import parse_insecure, sign_jwt_svid
from trustmesh.keys import generate_private_key
from trustmesh.metrics import Registry
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import X509Svid, build_ca_certificate, build_leaf_certificate

HEADER = (("workload.spiffe.io", "true"),)
TD = TrustDomain("example.org")
PARTNER = TrustDomain("partner.example")
NOW = datetime.now(timezone.utc)
ME = f"unix:uid:{os.getuid()}"
REPO = Path(__file__).resolve().parents[2]


# --- a PKI and a fake SVID cache ------------------------------------------------------------


@dataclass
class Authority:
    td: TrustDomain
    root: x509.Certificate
    key: object
    jwt_key: object
    kid: str

    @classmethod
    def make(cls, td: TrustDomain) -> Authority:
        key = generate_private_key()
        root = build_ca_certificate(trust_domain=td, public_key=key.public_key(), issuer=None, issuer_key=key,
                                    not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(days=1),
                                    path_length=1, common_name=f"{td} root")
        return cls(td, root, key, generate_private_key(), f"kid-{td.name}")

    def bundle(self) -> Bundle:
        return Bundle(self.td, (self.root,), (JwtAuthority(self.kid, self.jwt_key.public_key()),))  # type: ignore[attr-defined]

    def svid(self, path: str) -> X509Svid:
        key = generate_private_key()
        leaf = build_leaf_certificate(spiffe_id=self.td.spiffe_id("/" + path), public_key=key.public_key(),
                                      issuer=self.root, issuer_key=self.key,  # type: ignore[arg-type]
                                      not_before=NOW - timedelta(minutes=1), not_after=NOW + timedelta(hours=1))
        return X509Svid(self.td.spiffe_id("/" + path), (leaf,), key)

    def jwt(self, path: str, audiences: Sequence[str], expires_in: timedelta = timedelta(minutes=5)) -> str:
        # Minted at the time of the call, not of the import: under xdist a module may be
        # imported minutes before its tests run, and independent clients check `exp` by the wall clock.
        now = datetime.now(timezone.utc)
        return sign_jwt_svid(spiffe_id=self.td.spiffe_id("/" + path), audiences=audiences,
                             private_key=self.jwt_key, key_id=self.kid,  # type: ignore[arg-type]
                             expires_at=now + expires_in, issued_at=now)


@dataclass
class FakeEntry:
    entry_id: str
    path: str
    selectors: frozenset[str]
    federates_with: tuple[TrustDomain, ...] = ()


@dataclass
class FakeSource:
    """An IdentitySource whose state the test sets; every change bumps the version."""

    ours: Authority
    partner: Authority
    entries: dict[str, FakeEntry] = field(default_factory=dict)
    svids: dict[str, X509Svid] = field(default_factory=dict)
    x509_builds: int = 0
    signer_down: bool = False
    _version: int = 0
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _synced: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._bundles = BundleSet([self.ours.bundle(), self.partner.bundle()])
        self._synced.set()

    @property
    def trust_domain(self) -> TrustDomain:
        return self.ours.td

    @property
    def version(self) -> int:
        return self._version

    def bump(self) -> None:
        self._version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def wait_for_change(self, after_version: int) -> int:
        while self._version <= after_version:
            await self._changed.wait()
        return self._version

    async def wait_until_synced(self) -> None:
        await self._synced.wait()

    def _matching(self, selectors: Collection[str]) -> list[FakeEntry]:
        return [e for e in self.entries.values() if e.selectors <= set(selectors)]

    def entries_match(self, selectors: Collection[str]) -> bool:
        return bool(self._matching(selectors))

    def x509_svids_for(self, selectors: Collection[str]) -> list[WorkloadX509Svid]:
        self.x509_builds += 1
        return [WorkloadX509Svid(e.entry_id, self.svids[e.entry_id], e.federates_with)
                for e in self._matching(selectors) if e.entry_id in self.svids]

    def bundles(self) -> BundleSet:
        return self._bundles

    async def jwt_svids_for(self, selectors: Collection[str], audiences: Sequence[str],
                            spiffe_id: str | None = None) -> list[WorkloadJwtSvid]:
        if self.signer_down:
            raise TrustmeshError("the control plane is unreachable")
        entries = [e for e in self._matching(selectors)
                   if spiffe_id in (None, str(self.ours.td.spiffe_id("/" + e.path)))]
        if not entries:
            raise NoIdentityError("no identity issued")
        return [
            WorkloadJwtSvid(str(self.ours.td.spiffe_id("/" + e.path)), self.ours.jwt(e.path, audiences))
            for e in entries
        ]

    # --- what the test does to it ---

    def register(
        self,
        entry_id: str,
        path: str,
        *selectors: str,
        federates_with: tuple[TrustDomain, ...] = (),
        signed: bool = True,
    ) -> None:
        self.entries[entry_id] = FakeEntry(entry_id, path, frozenset(selectors or (ME,)), federates_with)
        if signed:
            self.svids[entry_id] = self.ours.svid(path)
        self.bump()

    def rotate(self, entry_id: str) -> X509Svid:
        self.svids[entry_id] = self.ours.svid(self.entries[entry_id].path)
        self.bump()
        return self.svids[entry_id]

    def delete(self, entry_id: str) -> None:
        del self.entries[entry_id]
        self.svids.pop(entry_id, None)
        self.bump()

    def set_bundles(self, bundles: BundleSet) -> None:
        self._bundles = bundles
        self.bump()


class Clock:
    """The wall clock, until a test sets `now` (an independent client minting or checking a
    token uses the wall clock too)."""

    def __init__(self) -> None:
        self.now: datetime | None = None

    def __call__(self) -> datetime:
        return self.now if self.now is not None else datetime.now(timezone.utc)


@dataclass
class Served:
    path: Path
    source: FakeSource
    metrics: Registry
    clock: Clock
    server: WorkloadAPIServer
    channel: grpc.aio.Channel

    @property
    def stub(self) -> workload_pb2_grpc.SpiffeWorkloadAPIStub:
        return workload_pb2_grpc.SpiffeWorkloadAPIStub(self.channel)

    def calls(self, method: str, code: str) -> float:
        return self.metrics.counter("trustmesh_workload_api_calls_total", "", ["method", "code"]).value(
            method=method, code=code
        )

    def open_streams(self) -> float:
        gauge = self.metrics.gauge("trustmesh_workload_api_streams", "", ["method"])
        return sum(gauge.value(method=m) for m in ("FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"))


@pytest.fixture(scope="module")
def authorities() -> tuple[Authority, Authority]:
    return Authority.make(TD), Authority.make(PARTNER)


@pytest.fixture
async def short_dir() -> AsyncIterator[Path]:
    # A unix socket path must fit in 108 bytes; pytest's tmp_path may not.
    directory = Path(tempfile.mkdtemp(prefix="tmwl", dir="/tmp"))
    directory.chmod(0o755)  # the other-uid workload must reach the socket
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def _serve(directory: Path, source: FakeSource, attestor: object | None = None) -> Served:
    metrics, clock = Registry(), Clock()
    path = directory / "agent" / "workload.sock"
    api = WorkloadAPI(source, attestor or WorkloadAttestor(), metrics, clock=clock)  # type: ignore[arg-type]
    server = WorkloadAPIServer(path, api)
    await server.start()
    return Served(path, source, metrics, clock, server, grpc.aio.insecure_channel(f"unix:{path}"))


@pytest.fixture
async def served(short_dir: Path, authorities: tuple[Authority, Authority]) -> AsyncIterator[Served]:
    s = await _serve(short_dir, FakeSource(*authorities))
    yield s
    await s.channel.close()
    await s.server.close()


async def eventually(condition: Callable[[], bool], what: str, limit: float = 30.0) -> None:
    """Poll until `condition` holds: the server settles asynchronously after a client leaves."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


async def code_of(call: Awaitable[object]) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code()


def leaf_serial(svid: workload_pb2.X509SVID) -> int:
    return load_der_certificates(svid.x509_svid)[0].serial_number


# --- the standard's refusals ---------------------------------------------------------------------


def _all_calls(
    stub: workload_pb2_grpc.SpiffeWorkloadAPIStub, metadata: Sequence[tuple[str, str]] | None
) -> dict[str, Callable[[], Awaitable[object]]]:
    return {
        "FetchX509SVID": lambda: stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=metadata).read(),
        "FetchX509Bundles": lambda: stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=metadata).read(),
        "FetchJWTBundles": lambda: stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=metadata).read(),
        "FetchJWTSVID": lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=metadata),
        "ValidateJWTSVID": lambda: stub.ValidateJWTSVID(
            workload_pb2.ValidateJWTSVIDRequest(audience="a", svid="x.y.z"), metadata=metadata
        ),
    }


@pytest.mark.parametrize("metadata", [None, (("workload.spiffe.io", "false"),), (("workload.spiffe.io", "TRUE "),)])
async def test_every_call_without_the_security_header_is_invalid_argument(
    served: Served, metadata: Sequence[tuple[str, str]] | None
) -> None:
    served.source.register("e1", "ledger")
    for method, call in _all_calls(served.stub, metadata).items():
        assert await code_of(call()) == grpc.StatusCode.INVALID_ARGUMENT, method
        assert served.calls(method, "INVALID_ARGUMENT") >= 1


async def test_a_caller_matching_no_entry_is_permission_denied_everywhere(served: Served) -> None:
    served.source.register("e1", "other", "unix:uid:4242")
    calls = _all_calls(served.stub, HEADER)
    for method in ("FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles", "FetchJWTSVID"):
        assert await code_of(calls[method]()) == grpc.StatusCode.PERMISSION_DENIED, method
        assert served.calls(method, "PERMISSION_DENIED") == 1
    # An entry with one selector the caller lacks does not match either (all must match).
    served.source.register("e2", "half", ME, "unix:path:/nowhere")
    assert await code_of(calls["FetchX509SVID"]()) == grpc.StatusCode.PERMISSION_DENIED


class FailingAttestor(WorkloadAttestor):
    async def selectors_for(self, creds: PeerCredentials) -> list[str]:
        raise WorkloadAttestationError("process 42 is gone")


async def test_a_caller_that_cannot_be_attested_is_unavailable(
    short_dir: Path, authorities: tuple[Authority, Authority]
) -> None:
    s = await _serve(short_dir, FakeSource(*authorities), FailingAttestor())
    try:
        s.source.register("e1", "ledger")
        for method, call in _all_calls(s.stub, HEADER).items():
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, method
            assert "gone" in (info.value.details() or "")
        failures = s.metrics.counter("trustmesh_workload_api_attestation_failures_total", "").value()
        assert failures == 5
    finally:
        await s.channel.close()
        await s.server.close()


# --- X.509 streams ----------------------------------------------------------------------------------


async def test_the_first_x509_message_is_a_complete_snapshot(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger", federates_with=(PARTNER,))
    source.register("e2", "ledger-admin", ME, "unix:gid:0" if os.getgid() == 0 else f"unix:gid:{os.getgid()}")
    source.register("e3", "not-me", "unix:uid:4242")
    call = served.stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    first = await call.read()  # no change needed to get it
    assert sorted(s.spiffe_id for s in first.svids) == [
        "spiffe://example.org/ledger",
        "spiffe://example.org/ledger-admin",
    ]
    own_root = source.ours.root.public_bytes(serialization.Encoding.DER)
    for svid in first.svids:
        chain = load_der_certificates(svid.x509_svid)
        expected = source.svids["e1" if svid.spiffe_id.endswith("/ledger") else "e2"]
        assert chain[0] == expected.leaf  # leaf first
        key = serialization.load_der_private_key(svid.x509_svid_key, None)  # PKCS#8 DER
        assert key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == chain[0].public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        assert svid.bundle == own_root
    assert dict(first.federated_bundles) == {
        "spiffe://partner.example": source.partner.root.public_bytes(serialization.Encoding.DER)
    }
    call.cancel()


async def test_rotation_is_pushed_and_identical_snapshots_are_not_resent(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger")
    call = served.stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    first = await call.read()
    source.bump()  # a change elsewhere (another workload's entry) alters nothing here
    source.register("e9", "someone-else", "unix:uid:4242")
    new = source.rotate("e1")
    second = await call.read()  # had the bumps been resent, this would be the old SVID
    assert leaf_serial(second.svids[0]) == new.leaf.serial_number != leaf_serial(first.svids[0])
    assert second.svids[0].x509_svid_key != first.svids[0].x509_svid_key
    # A bundle change is a new complete snapshot too.
    extra = Authority.make(TD)
    source.set_bundles(
        source.bundles().with_bundle(Bundle(TD, (source.ours.root, extra.root), source.ours.bundle().jwt_authorities))
    )
    third = await call.read()
    assert load_der_certificates(third.svids[0].bundle) == [source.ours.root, extra.root]
    assert leaf_serial(third.svids[0]) == new.leaf.serial_number
    call.cancel()


async def test_an_added_entry_appears_and_a_deleted_one_is_withdrawn_on_the_open_stream(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger")
    call = served.stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    assert [s.spiffe_id for s in (await call.read()).svids] == ["spiffe://example.org/ledger"]
    source.register("e2", "audit")
    assert sorted(s.spiffe_id for s in (await call.read()).svids) == [
        "spiffe://example.org/audit",
        "spiffe://example.org/ledger",
    ]
    source.delete("e1")
    assert [s.spiffe_id for s in (await call.read()).svids] == ["spiffe://example.org/audit"]
    source.delete("e2")  # the last one: the stream ends, but never with OK
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    await eventually(lambda: served.open_streams() == 0, "the stream gauge returns to zero")


async def test_an_entitled_caller_waits_for_its_first_svid_rather_than_being_denied(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger", signed=False)  # the entry is known, its SVID is being signed
    call = served.stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    reading = asyncio.ensure_future(call.read())
    await eventually(lambda: served.open_streams() == 1, "the stream is open")
    source.bump()  # unrelated changes meanwhile send nothing (no empty snapshot)
    svid = source.rotate("e1")
    first = await reading
    assert leaf_serial(first.svids[0]) == svid.leaf.serial_number
    call.cancel()


async def test_x509_bundles_stream_holds_every_trust_domain_and_follows_changes(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger")
    call = served.stub.FetchX509Bundles(workload_pb2.X509BundlesRequest(), metadata=HEADER)
    first = await call.read()
    der = serialization.Encoding.DER
    assert dict(first.bundles) == {
        "spiffe://example.org": source.ours.root.public_bytes(der),
        "spiffe://partner.example": source.partner.root.public_bytes(der),
    }
    source.rotate("e1")  # an SVID rotation does not change the bundles: nothing is sent
    source.set_bundles(source.bundles().without(PARTNER))
    second = await call.read()
    assert list(second.bundles) == ["spiffe://example.org"]  # the partner bundle is withdrawn
    call.cancel()


async def test_jwt_bundles_are_jwks_of_jwt_keys_each_with_a_kid(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger")
    call = served.stub.FetchJWTBundles(workload_pb2.JWTBundlesRequest(), metadata=HEADER)
    first = await call.read()
    assert set(first.bundles) == {"spiffe://example.org", "spiffe://partner.example"}
    for td, raw in first.bundles.items():
        keys = json.loads(raw)["keys"]
        assert [k["kid"] for k in keys] == [f"kid-{TrustDomain.parse(td).name}"]
        assert all(k.get("use") == "jwt-svid" for k in keys)
    call.cancel()


# --- JWT ----------------------------------------------------------------------------------------------


async def test_a_jwt_svid_carries_every_requested_audience(served: Served) -> None:
    served.source.register("e1", "ledger")
    served.source.register("e2", "audit")
    reply = await served.stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["payments", "audit"]), metadata=HEADER)
    assert sorted(s.spiffe_id for s in reply.svids) == ["spiffe://example.org/audit", "spiffe://example.org/ledger"]
    for svid in reply.svids:
        _, claims = parse_insecure(svid.svid)
        assert sorted(claims["aud"]) == ["audit", "payments"] and claims["sub"] == svid.spiffe_id
    only = await served.stub.FetchJWTSVID(
        workload_pb2.JWTSVIDRequest(audience=["x"], spiffe_id="spiffe://example.org/audit"), metadata=HEADER
    )
    assert [s.spiffe_id for s in only.svids] == ["spiffe://example.org/audit"]


@pytest.mark.parametrize(
    "request_, code",
    [
        (workload_pb2.JWTSVIDRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (workload_pb2.JWTSVIDRequest(audience=[""]), grpc.StatusCode.INVALID_ARGUMENT),
        (workload_pb2.JWTSVIDRequest(audience=["a"] + [f"b{i}" for i in range(20)]), grpc.StatusCode.INVALID_ARGUMENT),
        (workload_pb2.JWTSVIDRequest(audience=["a" * 257]), grpc.StatusCode.INVALID_ARGUMENT),
        (workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id="not a spiffe id"), grpc.StatusCode.INVALID_ARGUMENT),
        (
            workload_pb2.JWTSVIDRequest(audience=["a"], spiffe_id="spiffe://example.org/not-mine"),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
    ],
)
async def test_bad_jwt_svid_requests_are_refused(
    served: Served, request_: workload_pb2.JWTSVIDRequest, code: grpc.StatusCode
) -> None:
    served.source.register("e1", "ledger")
    assert await code_of(served.stub.FetchJWTSVID(request_, metadata=HEADER)) == code


async def test_a_jwt_svid_that_cannot_be_signed_now_is_unavailable(served: Served) -> None:
    served.source.register("e1", "ledger")
    served.source.signer_down = True
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await served.stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "unreachable" in (info.value.details() or "")


async def test_validate_accepts_our_tokens_and_a_federated_partners(served: Served) -> None:
    served.source.register("e1", "ledger")
    ours = served.source.ours.jwt("payments", ["ledger", "audit"])
    reply = await served.stub.ValidateJWTSVID(
        workload_pb2.ValidateJWTSVIDRequest(audience="audit", svid=ours), metadata=HEADER
    )
    assert reply.spiffe_id == "spiffe://example.org/payments"
    assert reply.claims["sub"] == "spiffe://example.org/payments"
    assert list(reply.claims["aud"]) == ["ledger", "audit"]
    assert reply.claims["exp"] > 0
    theirs = served.source.partner.jwt("settlement", ["ledger"])
    reply = await served.stub.ValidateJWTSVID(
        workload_pb2.ValidateJWTSVIDRequest(audience="ledger", svid=theirs), metadata=HEADER
    )
    assert reply.spiffe_id == "spiffe://partner.example/settlement"


async def test_validate_refuses_bad_tokens_with_the_reason(
    served: Served, authorities: tuple[Authority, Authority]
) -> None:
    source = served.source
    source.register("e1", "ledger")
    good = source.ours.jwt("payments", ["ledger"])
    head, body, sig = good.split(".")
    stranger = Authority.make(TrustDomain("stranger.example"))
    impostor = Authority(TD, source.ours.root, source.ours.key, generate_private_key(), source.ours.kid)
    cases = {
        "audience": ("someone-else", good),
        "signed": ("ledger", f"{head}.{body}.{sig[:-4]}AAAA"),
        "stranger.example": ("ledger", stranger.jwt("x", ["ledger"])),
        "signed ": ("ledger", impostor.jwt("payments", ["ledger"])),  # right kid, wrong key
        "": ("ledger", "not-a-jwt"),
        " ": ("ledger", "a" * 20000),
        "  ": ("", good),
        "   ": ("ledger", ""),
    }
    for reason, (audience, token) in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await served.stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience=audience, svid=token), metadata=HEADER
            )
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, reason
        assert reason.strip() in (info.value.details() or ""), (reason, info.value.details())
    served.clock.now = datetime.now(timezone.utc) + timedelta(hours=1)  # the token has expired by the server's clock
    assert (
        await code_of(
            served.stub.ValidateJWTSVID(
                workload_pb2.ValidateJWTSVIDRequest(audience="ledger", svid=good), metadata=HEADER
            )
        )
        == grpc.StatusCode.INVALID_ARGUMENT
    )


# --- another uid, from the kernel -------------------------------------------------------------------


# The client imports as root (the interpreter lives under /root), then drops to the other
# uid before it connects: the kernel records the credentials at connect().
OTHER_UID_CLIENT = textwrap.dedent("""
    import os, sys, grpc
    from trustmesh._proto.spiffe.workload import workload_pb2, workload_pb2_grpc
    uid = int(sys.argv[2])
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:" + sys.argv[1]))
    md = [("workload.spiffe.io", "true")]
    calls = {
        "x509": lambda: next(stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=md, timeout=20)).svids[0].spiffe_id,
        "jwt": lambda: stub.FetchJWTSVID(
            workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=md, timeout=20).svids[0].spiffe_id,
        "bundles": lambda: ",".join(sorted(next(stub.FetchX509Bundles(
            workload_pb2.X509BundlesRequest(), metadata=md, timeout=20)).bundles)),
    }
    for name, call in calls.items():
        try:
            print(name, call())
        except grpc.RpcError as err:
            print(name, err.code().name)
""")


async def _run_as(uid: int, path: Path) -> dict[str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        OTHER_UID_CLIENT,
        str(path),
        str(uid),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd="/",
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return dict(line.split(" ", 1) for line in out.decode().splitlines())


async def test_an_unregistered_uid_is_denied_and_a_registered_one_served(served: Served) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to run a workload as another uid")
    served.source.register("e1", "ledger")  # this process (uid 0)
    assert await _run_as(65534, served.path) == {
        "x509": "PERMISSION_DENIED",
        "jwt": "PERMISSION_DENIED",
        "bundles": "PERMISSION_DENIED",
    }
    served.source.register("e2", "nobody", "unix:uid:65534", "unix:user:nobody")
    assert await _run_as(65534, served.path) == {
        "x509": "spiffe://example.org/nobody",
        "jwt": "spiffe://example.org/nobody",
        "bundles": "spiffe://example.org,spiffe://partner.example",
    }
    # and uid 0 still gets only its own
    first = await served.stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER).read()
    assert [s.spiffe_id for s in first.svids] == ["spiffe://example.org/ledger"]


# --- faults: churn, garbage, slow readers ------------------------------------------------------------


def _raw_request(method: str = "FetchX509SVID", window: int = 65535, header: bool = True) -> bytes:
    """The bytes of an HTTP/2 connection that opens one Workload API call, written by hand."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
    )
    conn.initiate_connection()
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", f"/SpiffeWorkloadAPI/{method}"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
    if header:
        headers.append(("workload.spiffe.io", "true"))
    conn.send_headers(1, headers)
    conn.send_data(1, b"\x00\x00\x00\x00\x00", end_stream=True)  # one empty message
    return conn.data_to_send()


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


GARBAGE = [
    b"",
    b"\x00" * 64,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\xff" * 100,  # a valid preface, then nonsense frames
    os.urandom(4096),
]


async def test_connection_churn_and_garbage_leak_no_descriptors_or_tasks(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger")
    # Warm up: the first call starts grpc's own threads and descriptors.
    warm = served.stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    await warm.read()
    warm.cancel()
    await eventually(lambda: served.open_streams() == 0, "the warm-up stream closes")
    fds, tasks = _fds(), len(asyncio.all_tasks())

    async def raw(payload: bytes, read_first: bool) -> None:
        reader, writer = await asyncio.open_unix_connection(str(served.path))
        writer.write(payload)
        if read_first:
            await reader.read(1)  # the stream is open and answering: hang up mid-stream
        writer.close()
        await writer.wait_closed()

    for cycle in range(2000):
        if cycle % 4 == 0:
            await raw(_raw_request(), read_first=True)
        else:
            await raw(GARBAGE[cycle % len(GARBAGE)], read_first=False)
    for _ in range(50):  # and real clients hanging up mid-stream
        async with grpc.aio.insecure_channel(f"unix:{served.path}") as channel:
            call = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=HEADER
            )
            await call.read()
            call.cancel()
    await eventually(lambda: served.open_streams() == 0, "every stream is closed")
    await eventually(lambda: len(asyncio.all_tasks()) <= tasks, "handler tasks are gone")
    await eventually(lambda: _fds() <= fds, "connections are closed")
    # and the server still serves
    first = await served.stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER).read()
    assert first.svids[0].spiffe_id == "spiffe://example.org/ledger"


async def test_a_reader_that_never_reads_holds_nobody_up_and_queues_nothing(served: Served) -> None:
    source = served.source
    source.register("e1", "ledger")
    # A stream whose flow-control window is zero: the server can send it no byte of data.
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setblocking(False)
    await asyncio.get_running_loop().sock_connect(stuck, str(served.path))
    await asyncio.get_running_loop().sock_sendall(stuck, _raw_request(window=0))
    await eventually(lambda: source.x509_builds == 1, "the stuck stream built its first snapshot")
    call = served.stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=HEADER)
    await call.read()
    rotations = 50
    for _ in range(rotations):
        svid = source.rotate("e1")
        message = await call.read()
        assert leaf_serial(message.svids[0]) == svid.leaf.serial_number
    # The good stream built one snapshot per version; the stuck one is still on its first:
    # it has not built (or queued) one per rotation.
    assert source.x509_builds <= 1 + 1 + rotations
    assert served.open_streams() == 2
    stuck.close()
    call.cancel()
    await eventually(lambda: served.open_streams() == 0, "both streams are closed")


async def test_a_request_without_a_message_is_invalid_argument(served: Served) -> None:
    served.source.register("e1", "ledger")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    conn.send_headers(
        1,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/SpiffeWorkloadAPI/FetchJWTSVID"),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("workload.spiffe.io", "true"),
        ],
        end_stream=True,
    )
    reader, writer = await asyncio.open_unix_connection(str(served.path))
    writer.write(conn.data_to_send())
    status: str | None = None
    while status is None:
        data = await reader.read(65536)
        assert data, "the server hung up without a status"
        for event in conn.receive_data(data):
            headers = dict(getattr(event, "headers", None) or [])
            status = headers.get("grpc-status", status)
        writer.write(conn.data_to_send())
    writer.close()
    assert status == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])


# --- lifecycle ---------------------------------------------------------------------------------------


async def test_socket_file_lifecycle(short_dir: Path, authorities: tuple[Authority, Authority]) -> None:
    source = FakeSource(*authorities)
    path = short_dir / "run" / "workload.sock"
    # A socket left behind by a crashed agent is replaced.
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    server = WorkloadAPIServer(path, WorkloadAPI(source, WorkloadAttestor(), Registry()))
    await server.start()
    assert stat.S_IMODE(path.stat().st_mode) == 0o777  # any uid may connect; the kernel says who it is
    # A live one is never stolen.
    second = WorkloadAPIServer(path, WorkloadAPI(source, WorkloadAttestor(), Registry()))
    with pytest.raises(WorkloadApiError, match="another process is serving"):
        await second.start()
    await server.close()
    assert not path.exists()
    # A path that is not a socket is refused, not deleted.
    path.write_text("precious")
    with pytest.raises(WorkloadApiError, match="not a socket"):
        await second.start()
    assert path.read_text() == "precious"


async def test_serve_runs_until_cancelled_and_cancels_open_streams(
    short_dir: Path, authorities: tuple[Authority, Authority]
) -> None:
    source = FakeSource(*authorities)
    source.register("e1", "ledger")
    path = short_dir / "workload.sock"
    metrics = Registry()
    server = WorkloadAPIServer(path, WorkloadAPI(source, WorkloadAttestor(), metrics))
    serving = asyncio.ensure_future(server.serve())
    await eventually(path.exists, "the socket appears")
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        call = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER
        )
        await call.read()
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # clients reconnect, not stop
    assert not path.exists()
    assert metrics.gauge("trustmesh_workload_api_streams", "", ["method"]).value(method="FetchX509SVID") == 0


async def test_close_cuts_a_reader_that_never_reads(short_dir: Path, authorities: tuple[Authority, Authority]) -> None:
    s = await _serve(short_dir, FakeSource(*authorities))
    s.source.register("e1", "ledger")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(stuck, str(s.path))
    await loop.sock_sendall(stuck, _raw_request(window=0))
    await eventually(lambda: s.open_streams() == 1, "the stuck stream is open")
    await s.channel.close()
    await s.server.close()  # does not wait forever for a status the reader cannot take
    while await loop.sock_recv(stuck, 65536):
        pass  # what was written before the cut, then end of file: the connection is closed
    stuck.close()
    assert s.open_streams() == 0


async def test_metrics_count_calls_by_method_and_code(served: Served) -> None:
    served.source.register("e1", "ledger")
    await served.stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a"]), metadata=HEADER)
    await code_of(served.stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(), metadata=HEADER))
    assert served.calls("FetchJWTSVID", "OK") == 1
    assert served.calls("FetchJWTSVID", "INVALID_ARGUMENT") == 1
    rendered = served.metrics.render()
    assert 'trustmesh_workload_api_calls_total{code="OK",method="FetchJWTSVID"} 1' in rendered  # labels sorted
    assert "PRIVATE KEY" not in rendered


# --- header blocks are bounded before the HTTP/2 library buffers them -------------------------


def _frame(kind: int, flags: int, payload_len: int) -> bytes:
    return payload_len.to_bytes(3, "big") + bytes([kind, flags]) + (1).to_bytes(4, "big") + bytes(payload_len)


def _block(sizes: list[int]) -> bytes:
    """One header block: HEADERS, then CONTINUATION frames; the last frame ends it."""
    last = len(sizes) - 1
    return b"".join(_frame(9 if i else 1, 0x4 if i == last else 0, n) for i, n in enumerate(sizes))


@given(st.lists(st.lists(st.integers(min_value=0, max_value=9000), min_size=1, max_size=6), min_size=1, max_size=4),
       st.lists(st.integers(min_value=1, max_value=5000), max_size=40))
def test_the_header_budget_follows_frames_across_any_split(blocks: list[list[int]], cuts: list[int]) -> None:
    from trustmesh.agent.workload_api import MAX_HEADER_BLOCK_BYTES, _HeaderBudget

    # Preface, SETTINGS, a large DATA frame (not headers: never counted), then the blocks.
    stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0) + _frame(0, 0, 40_000)
    stream += b"".join(_block(sizes) for sizes in blocks)
    budget = _HeaderBudget()
    ok, position = True, 0
    for cut in [*cuts, len(stream)]:
        piece = stream[position:position + cut]
        position += len(piece)
        if piece and ok:
            ok = budget.feed(piece)
    assert ok == all(sum(sizes) <= MAX_HEADER_BLOCK_BYTES for sizes in blocks)


async def test_a_connection_that_sends_no_whole_request_is_closed(
        short_dir: Path, authorities: tuple[Authority, Authority]) -> None:
    source = FakeSource(*authorities)
    source.register("e1", "ledger")
    metrics = Registry()
    path = short_dir / "workload.sock"
    server = WorkloadAPIServer(path, WorkloadAPI(source, WorkloadAttestor(), metrics, idle_seconds=0.3))
    await server.start()
    loop = asyncio.get_running_loop()

    async def closed_by_agent(first: bytes) -> bool:
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        await loop.sock_connect(sock, str(path))
        try:
            if first:
                await loop.sock_sendall(sock, first)
            async with asyncio.timeout(10):
                while await loop.sock_recv(sock, 65536):
                    pass  # the agent's SETTINGS; then the end
            return True
        finally:
            sock.close()

    try:
        assert await closed_by_agent(b"")  # connected, silent
        # A stream opened (HEADERS) whose request never comes is no request either.
        from hpack import Encoder

        block = Encoder().encode([(":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                                  (":path", "/SpiffeWorkloadAPI/FetchX509SVID"), ("content-type", "application/grpc"),
                                  ("te", "trailers"), ("workload.spiffe.io", "true")])
        headers = len(block).to_bytes(3, "big") + bytes([1, 0x4]) + (1).to_bytes(4, "big") + block
        settings = bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])  # an empty SETTINGS frame, on stream 0
        assert await closed_by_agent(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + headers)
        assert metrics.counter("trustmesh_workload_api_refused_total", "", ["reason"]).value(reason="idle") == 2
        # A real caller keeps its stream past the idle time.
        channel = grpc.aio.insecure_channel(f"unix:{path}")
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=HEADER)
        assert (await stream.read()).svids
        await asyncio.sleep(0.6)
        assert not stream.done()
        stream.cancel()
        await channel.close()
    finally:
        await server.close()
