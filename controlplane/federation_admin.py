"""Federation relationships and trust bundles, as the admin API asks for them (transport-free).

Everything about a new relationship is checked before anything is stored
(`check_relationship`, pure): the partner's trust domain is not ours, the endpoint URL is
https, the profile's requirements hold, and an initial bundle given out of band is a valid
SPIFFE bundle of that trust domain. `FederationAdmin` drives the checks against the store
and audits every change and refusal. Fetching a partner's bundle is `federation.refresh`.
"""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.bundle import Bundle
from trustmesh.clip import SHOWN, clip, shown
from trustmesh.controlplane.federation import (
    PROFILES,
    BundleFetchError,
    parse_endpoint_url,
    stored_bundle,
    validate_bundle,
)
from trustmesh.controlplane.federation import refresh as refresh_bundle
from trustmesh.controlplane.registration import spiffe_id_arg
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.controlplane.store.records import BundleRecord, FederationRecord
from trustmesh.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    InvalidSpiffeIdError,
    NotFoundError,
    UnavailableError,
)
from trustmesh.spiffeid import SpiffeId, TrustDomain

MAX_URL = 2048
# Audit subjects quote the caller's words; a trust domain name is at most 255 characters.


@dataclass(frozen=True)
class RelationshipSpec:
    """What an admin asks for when adding a partner trust domain.

    `profile` is "" (no endpoint), "https_web" or "https_spiffe"; anything else is refused.
    `bundle` is the partner's SPIFFE bundle (JWKS JSON) obtained out of band, or empty."""

    trust_domain: str
    endpoint_url: str = ""
    profile: str = ""
    endpoint_spiffe_id: str = ""
    bundle: bytes = b""


@dataclass(frozen=True)
class Relationship:
    """A stored relationship with the partner bundle this server holds for it (None: none yet)."""

    record: FederationRecord
    bundle: Bundle | None


@dataclass(frozen=True)
class TrustBundle:
    """A trust domain's bundle, parsed, and as the SPIFFE bundle document (JWKS JSON) it travels as."""

    bundle: Bundle
    jwks: bytes


def parse_trust_domain(text: str) -> TrustDomain:
    """A trust domain named in a request, or INVALID_ARGUMENT quoting (a clipped) `text`."""
    try:
        return TrustDomain.parse(text)
    except InvalidSpiffeIdError as err:
        raise InvalidArgumentError(f"trust domain {shown(text)}: {err}") from err


def check_relationship(spec: RelationshipSpec, own: TrustDomain, now: float) -> tuple[FederationRecord, Bundle | None]:
    """The record to store and the initial bundle, or INVALID_ARGUMENT saying what to fix (pure)."""
    td = parse_trust_domain(spec.trust_domain)
    if td == own:
        raise InvalidArgumentError(f"{td} is this server's own trust domain; federate with another one")
    profile = spec.profile
    if profile and profile not in PROFILES:
        raise InvalidArgumentError(
            f"unknown bundle endpoint profile {clip(profile, 32)}; use https_web or https_spiffe"
        )
    url = spec.endpoint_url
    if len(url) > MAX_URL:
        raise InvalidArgumentError(f"the bundle endpoint URL is longer than {MAX_URL} characters")
    if url:
        try:
            parse_endpoint_url(url)
        except ValueError as err:
            raise InvalidArgumentError(str(err)) from err
        if not profile:
            raise InvalidArgumentError("a bundle endpoint needs a profile: --profile https_web or https_spiffe")
    elif profile or spec.endpoint_spiffe_id:
        raise InvalidArgumentError("--profile and --endpoint-spiffe-id go with --endpoint URL")
    elif not spec.bundle:
        raise InvalidArgumentError(
            "give the partner's bundle endpoint (--endpoint URL --profile …) or its bundle (--bundle-file FILE)"
        )
    endpoint_id: SpiffeId | None = None
    if profile == "https_spiffe":
        if not spec.endpoint_spiffe_id or not spec.bundle:
            raise InvalidArgumentError(
                "the https_spiffe profile needs --endpoint-spiffe-id (the endpoint's SPIFFE ID) "
                "and --bundle-file (the partner's current bundle, obtained out of band, which "
                "authenticates the first fetch)"
            )
        endpoint = spiffe_id_arg(spec.endpoint_spiffe_id, "--endpoint-spiffe-id")
        if endpoint.trust_domain != td:
            raise InvalidArgumentError(f"--endpoint-spiffe-id {endpoint} is not in the partner's trust domain {td}")
        endpoint_id = endpoint
    elif spec.endpoint_spiffe_id:
        raise InvalidArgumentError("--endpoint-spiffe-id goes only with --profile https_spiffe")
    bundle = None
    if spec.bundle:
        try:
            bundle = validate_bundle(spec.bundle, td, None)
        except BundleFetchError as err:
            raise InvalidArgumentError(f"--bundle-file: {err}") from err
    # A sequence in the initial bundle already binds the fetches that follow (no rollback below it).
    record = FederationRecord(
        trust_domain=td, endpoint_url=url, profile=profile, endpoint_spiffe_id=endpoint_id, created_at=now,
        spiffe_sequence=None if bundle is None else bundle.sequence_number,
    )
    return record, bundle


class FederationAdmin:
    """Relationships with partner trust domains, and the bundles this server holds.

    `actor` names who asked (e.g. "admin:local-socket"); it goes into every audit event."""

    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt

    async def relationships(self) -> list[Relationship]:
        out = []
        for record in await self._rt.store.list_federations():
            bundle, _ = await stored_bundle(self._rt, record.trust_domain.name)
            out.append(Relationship(record, bundle))
        return out

    async def create(self, spec: RelationshipSpec, actor: str) -> Relationship:
        try:
            record, bundle = check_relationship(spec, self._rt.config.trust_domain, self._rt.clock())
        except InvalidArgumentError as err:
            await self._rt.audit.record(
                "federation.create",
                actor=actor,
                subject=clip(spec.trust_domain, SHOWN),
                outcome="denied",
                reason=str(err),
            )
            raise
        bundle_record = None if bundle is None else BundleRecord(record.trust_domain, spec.bundle, 1, self._rt.clock())
        await self._rt.store.create_federation(record, bundle_record)
        await self._rt.audit.record(
            "federation.create",
            actor=actor,
            subject=record.trust_domain.name,
            endpoint=record.endpoint_url,
            profile=record.profile,
            endpoint_spiffe_id=str(record.endpoint_spiffe_id or ""),
        )
        return Relationship(record, bundle)

    async def delete(self, trust_domain: str, actor: str) -> None:
        td = parse_trust_domain(trust_domain).name
        await self._rt.store.delete_federation(td)
        await self._rt.audit.record("federation.delete", actor=actor, subject=td)

    async def refresh(self, trust_domain: str, actor: str) -> Bundle:
        """Fetch the partner's bundle endpoint now; the last good bundle stays on failure."""
        record = await self._rt.store.get_federation(parse_trust_domain(trust_domain).name)
        if not record.endpoint_url:
            raise FailedPreconditionError(
                f"the relationship with {record.trust_domain} has no bundle endpoint; "
                "its bundle is set by hand (`trustmesh federation add --bundle-file`)"
            )
        try:
            return await refresh_bundle(self._rt, record, actor=actor)
        except BundleFetchError as err:
            raise UnavailableError(
                f"could not refresh the bundle of {record.trust_domain} ({err}); the last good bundle stays in force"
            ) from err

    async def bundle(self, trust_domain: str = "") -> TrustBundle:
        """The bundle of `trust_domain`: ours (the default) or a partner's as last stored."""
        own = self._rt.config.trust_domain
        td = parse_trust_domain(trust_domain).name if trust_domain else own.name
        if td == own.name:
            bundle = self._rt.ca.bundle().with_refresh_hint(self._rt.config.bundle_refresh_hint)
            return TrustBundle(bundle, bundle.to_jwks())
        federated, record = await stored_bundle(self._rt, td)
        if federated is None or record is None:
            raise NotFoundError(
                f"this server holds no bundle for {td}; `trustmesh federation list` shows the "
                "partners it federates with"
            )
        return TrustBundle(federated, record.jwks)


__all__ = [
    "FederationAdmin",
    "FederationRecord",
    "Relationship",
    "RelationshipSpec",
    "TrustBundle",
    "check_relationship",
    "parse_trust_domain",
]
