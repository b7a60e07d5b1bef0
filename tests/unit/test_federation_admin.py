"""Federation relationships as the admin API asks for them: typed input, every refusal audited,
nothing stored on a refusal; trust bundles by trust domain. A real SQLite store and CA."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.server_runtime import ADMIN, TD, audit_events, server_runtime
from tests.unit.test_federation import ENDPOINT_ID, PARTNER, PartnerCA
from trustmesh.clip import SHOWN, clip
from trustmesh.controlplane.federation_admin import (
    MAX_URL,
    FederationAdmin,
    RelationshipSpec,
    check_relationship,
    parse_trust_domain,
)
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError
from trustmesh.spiffeid import TrustDomain

URL = "https://bundle.partner.example:8443/"


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[ServerRuntime]:
    async with server_runtime(tmp_path) as rt:
        yield rt


@pytest.fixture(scope="module")
def partner_ca() -> PartnerCA:
    return PartnerCA(PARTNER)


def web(**kw: object) -> RelationshipSpec:
    fields: dict[str, object] = {"trust_domain": PARTNER.name, "endpoint_url": URL, "profile": "https_web"}
    fields.update(kw)
    return RelationshipSpec(**fields)  # type: ignore[arg-type]


# --- the pure rules ----------------------------------------------------------------------------


def test_a_web_relationship(partner_ca: PartnerCA) -> None:
    record, bundle = check_relationship(web(), TD, 12.0)
    assert (record.trust_domain, record.endpoint_url, record.profile, record.endpoint_spiffe_id, record.created_at) \
        == (PARTNER, URL, "https_web", None, 12.0)
    assert bundle is None


def test_a_spiffe_relationship_keeps_its_initial_bundle(partner_ca: PartnerCA) -> None:
    jwks = partner_ca.bundle().to_jwks()
    record, bundle = check_relationship(web(profile="https_spiffe", endpoint_spiffe_id=ENDPOINT_ID, bundle=jwks),
                                        TD, 0.0)
    assert record.profile == "https_spiffe" and str(record.endpoint_spiffe_id) == ENDPOINT_ID
    assert bundle is not None and bundle.x509_authorities == (partner_ca.root,)


def test_a_bundle_alone_is_a_relationship_without_endpoint(partner_ca: PartnerCA) -> None:
    record, bundle = check_relationship(RelationshipSpec(PARTNER.name, bundle=partner_ca.bundle().to_jwks()), TD, 0.0)
    assert record.endpoint_url == "" and record.profile == "" and bundle is not None


@pytest.mark.parametrize(("spec", "message"), [
    (web(trust_domain="Not A Domain"), "trust domain 'Not A Domain'"),
    (web(trust_domain="x" * 10_000), "trust domain 'xxxx"),
    (web(trust_domain=TD.name), "this server's own trust domain"),
    (web(profile="ftp"), "unknown bundle endpoint profile ftp; use https_web or https_spiffe"),
    (web(profile="7"), "unknown bundle endpoint profile 7"),
    (web(endpoint_url="http://bundle.partner.example/"), "must be an https:// URL"),
    (web(endpoint_url="https://user:pw@bundle.partner.example/"), "must not carry credentials"),
    (web(endpoint_url="https://" + "a" * MAX_URL), f"longer than {MAX_URL} characters"),
    (web(profile=""), "a bundle endpoint needs a profile"),
    (web(endpoint_url="", profile="https_web"), "--profile and --endpoint-spiffe-id go with --endpoint URL"),
    (web(endpoint_url="", profile="", endpoint_spiffe_id=ENDPOINT_ID), "go with --endpoint URL"),
    (web(endpoint_url="", profile=""), "give the partner's bundle endpoint"),
    (web(profile="https_spiffe"), "the https_spiffe profile needs --endpoint-spiffe-id"),
    (web(endpoint_spiffe_id=ENDPOINT_ID), "--endpoint-spiffe-id goes only with --profile https_spiffe"),
])
def test_refusals_say_what_to_fix(spec: RelationshipSpec, message: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        check_relationship(spec, TD, 0.0)
    assert message in str(info.value)
    assert len(str(info.value)) < 1000, "hostile input must not bloat the message"


def test_the_spiffe_endpoint_must_be_in_the_partner_domain(partner_ca: PartnerCA) -> None:
    jwks = partner_ca.bundle().to_jwks()
    for endpoint_id, message in (("spiffe://other.example/server", "is not in the partner's trust domain"),
                                 ("not an id", "--endpoint-spiffe-id:")):
        with pytest.raises(InvalidArgumentError, match=message):
            check_relationship(web(profile="https_spiffe", endpoint_spiffe_id=endpoint_id, bundle=jwks), TD, 0.0)


def test_an_initial_bundle_must_be_the_partners(partner_ca: PartnerCA) -> None:
    for bundle, message in ((b"{not json", "--bundle-file: not a SPIFFE bundle"),
                            (PartnerCA(TrustDomain("other.example")).bundle().to_jwks(), "--bundle-file: ")):
        with pytest.raises(InvalidArgumentError, match=message):
            check_relationship(web(profile="https_spiffe", endpoint_spiffe_id=ENDPOINT_ID, bundle=bundle), TD, 0.0)


def test_trust_domain_arguments() -> None:
    assert parse_trust_domain("partner.example") == PARTNER
    with pytest.raises(InvalidArgumentError, match="^trust domain 'spiffe://"):
        parse_trust_domain("spiffe://" + "a/" * 100)


# --- against the store ---------------------------------------------------------------------------


async def test_create_list_delete(runtime: ServerRuntime, partner_ca: PartnerCA) -> None:
    admin = FederationAdmin(runtime)
    jwks = partner_ca.bundle(sequence=3).to_jwks()
    created = await admin.create(web(profile="https_spiffe", endpoint_spiffe_id=ENDPOINT_ID, bundle=jwks), ADMIN)
    assert created.bundle is not None and created.bundle.sequence_number == 3
    assert (await runtime.store.get_bundle(PARTNER.name)).jwks == jwks
    [listed] = await admin.relationships()
    assert listed.record.trust_domain == PARTNER and listed.bundle == created.bundle
    [event] = await audit_events(runtime, "federation.create")
    assert (event.actor, event.subject, event.outcome) == (ADMIN, PARTNER.name, "ok")
    assert event.details == {"endpoint": URL, "profile": "https_spiffe", "endpoint_spiffe_id": ENDPOINT_ID}
    await admin.delete(PARTNER.name, ADMIN)
    assert await admin.relationships() == []
    [deleted] = await audit_events(runtime, "federation.delete")
    assert deleted.subject == PARTNER.name
    with pytest.raises(NotFoundError):
        await admin.delete(PARTNER.name, ADMIN)


async def test_a_refused_relationship_is_audited_and_nothing_is_stored(runtime: ServerRuntime) -> None:
    admin = FederationAdmin(runtime)
    with pytest.raises(InvalidArgumentError):
        await admin.create(web(trust_domain="x" * 1000, profile=""), ADMIN)
    assert await admin.relationships() == []
    [event] = await audit_events(runtime, "federation.create")
    assert event.outcome == "denied" and event.subject == clip("x" * 1000, SHOWN)
    assert "trust domain" in event.details["reason"]


async def test_a_relationship_without_endpoint_is_not_refreshed(runtime: ServerRuntime, partner_ca: PartnerCA) -> None:
    admin = FederationAdmin(runtime)
    await admin.create(RelationshipSpec(PARTNER.name, bundle=partner_ca.bundle().to_jwks()), ADMIN)
    with pytest.raises(FailedPreconditionError, match="has no bundle endpoint"):
        await admin.refresh(PARTNER.name, ADMIN)
    with pytest.raises(NotFoundError):
        await admin.refresh("unknown.example", ADMIN)
    with pytest.raises(InvalidArgumentError, match="trust domain"):
        await admin.refresh("bad domain", ADMIN)


async def test_bundles_by_trust_domain(runtime: ServerRuntime, partner_ca: PartnerCA) -> None:
    admin = FederationAdmin(runtime)
    own = await admin.bundle()
    assert own.bundle.trust_domain == TD and own.bundle.refresh_hint == runtime.config.bundle_refresh_hint
    assert own.jwks == own.bundle.to_jwks() and (await admin.bundle(TD.name)).jwks == own.jwks
    with pytest.raises(NotFoundError, match="holds no bundle for partner.example"):
        await admin.bundle(PARTNER.name)
    jwks = partner_ca.bundle().to_jwks()
    await admin.create(RelationshipSpec(PARTNER.name, bundle=jwks), ADMIN)
    theirs = await admin.bundle(PARTNER.name)
    assert theirs.jwks == jwks and theirs.bundle.x509_authorities == (partner_ca.root,)
    with pytest.raises(InvalidArgumentError):
        await admin.bundle("Bad Domain")
