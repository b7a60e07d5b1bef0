"""Partner certificates: typed requests, issue/list/revoke against a real SQLite store and CA,
every refusal audited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509

from tests.unit.server_runtime import ADMIN, TD, Clock, audit_events, server_runtime
from trustmesh.clip import MARKER, SHOWN
from trustmesh.controlplane.partners import (
    DEFAULT_PARTNER_TTL,
    MAX_CSR_BYTES,
    PartnerCertificates,
    PartnerRequest,
    check_partner_request,
    check_serial,
)
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import SpiffeId
from trustmesh.x509svid import build_csr, spiffe_id_from_certificate

ACME = "spiffe://example.org/partners/acme"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ServerRuntime]:
    async with server_runtime(tmp_path, Clock(1_000.0)) as rt:
        yield rt


def request(**kw: object) -> PartnerRequest:
    fields: dict[str, object] = {"spiffe_id": ACME, "csr": b"\x30" * 10, "ttl_seconds": 0}
    fields.update(kw)
    return PartnerRequest(**fields)  # type: ignore[arg-type]


def test_a_partner_request() -> None:
    assert check_partner_request(request(), TD) == (SpiffeId.parse(ACME), DEFAULT_PARTNER_TTL)
    assert check_partner_request(request(ttl_seconds=3600), TD)[1].total_seconds() == 3600


@pytest.mark.parametrize(("req", "message"), [
    (request(spiffe_id="acme"), "--spiffe-id: "),
    (request(spiffe_id="spiffe://other.example/partners/acme"), "is not in this trust domain"),
    (request(spiffe_id="spiffe://example.org/ledger"), "partner certificates name spiffe://example.org/partners/NAME"),
    (request(spiffe_id="spiffe://example.org/partners"), "partner certificates name"),
    (request(ttl_seconds=59), "--ttl must be between 0:01:00 and 30 days"),
    (request(ttl_seconds=31 * 86400), "--ttl must be between"),
    (request(csr=b""), "--csr: give the partner's PKCS#10"),
    (request(csr=b"\x30" * (MAX_CSR_BYTES + 1)), "--csr: "),
])
def test_refusals(req: PartnerRequest, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        check_partner_request(req, TD)
    assert message in str(info.value)


def test_serials() -> None:
    assert check_serial(" 0xAB12 ") == "ab12"
    for bad in ("", "0x", "xyz", "a" * 65, "12 34"):
        with pytest.raises(InvalidArgumentError, match="is not a hexadecimal serial number"):
            check_serial(bad)


async def test_issue_list_revoke(runtime: ServerRuntime) -> None:
    partners = PartnerCertificates(runtime)
    csr = build_csr(generate_private_key())
    issued = await partners.issue(request(csr=csr, ttl_seconds=3600), ADMIN)
    leaf = issued.cert_chain[0]
    assert spiffe_id_from_certificate(leaf) == SpiffeId.parse(ACME)
    assert issued.serial == f"{leaf.serial_number:x}" and issued.expires_at == leaf.not_valid_after_utc.timestamp()
    assert isinstance(issued.cert_chain[-1], x509.Certificate) and len(issued.cert_chain) >= 2
    [stored] = await partners.certificates()
    assert (stored.serial, str(stored.spiffe_id), stored.issued_by, stored.issued_at, stored.revoked_at) \
        == (issued.serial, ACME, ADMIN, 1_000.0, 0.0)
    [event] = await audit_events(runtime, "partner.issue")
    assert (event.subject, event.outcome, event.details) == (ACME, "ok", {"serial": issued.serial,
                                                                          "not_after": int(issued.expires_at)})

    with pytest.raises(InvalidArgumentError, match="--reason is longer than 1024"):
        await partners.revoke(issued.serial, "x" * 1025, ADMIN)
    revoked = await partners.revoke("0x" + issued.serial.upper(), "key exposed", ADMIN)
    assert revoked.revoked_at == 1_000.0 and revoked.reason == "key exposed"
    assert [c.revoked_at for c in await partners.certificates()] == [1_000.0]
    with pytest.raises(FailedPreconditionError, match=f"partner certificate {issued.serial} .* is already revoked"):
        await partners.revoke(issued.serial, "", ADMIN)
    with pytest.raises(NotFoundError):
        await partners.revoke("abcdef", "", ADMIN)
    [event] = await audit_events(runtime, "partner.revoke")
    assert (event.subject, event.details) == (ACME, {"serial": issued.serial, "reason": "key exposed"})


async def test_a_refused_issue_is_audited_and_nothing_is_stored(runtime: ServerRuntime) -> None:
    partners = PartnerCertificates(runtime)
    for req in (request(spiffe_id="spiffe://example.org/" + "p" * 1000), request(csr=b"not a csr")):
        with pytest.raises(InvalidArgumentError):
            await partners.issue(req, ADMIN)
    assert await partners.certificates() == []
    events = await audit_events(runtime, "partner.issue")
    assert [e.outcome for e in events] == ["denied", "denied"]
    assert len(events[0].subject) == SHOWN and events[0].subject.endswith(MARKER) and events[1].subject == ACME
    assert all(e.details["reason"] for e in events)


async def test_certificates_are_listed_by_serial(runtime: ServerRuntime) -> None:
    partners = PartnerCertificates(runtime)
    for _ in range(3):
        await partners.issue(request(csr=build_csr(generate_private_key())), ADMIN)
    serials = [c.serial for c in await partners.certificates()]
    assert serials == sorted(serials) and len(serials) == 3
