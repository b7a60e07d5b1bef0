"""Validation of a new federation relationship (pure: the admin API calls it).

Everything about the request is checked before anything is stored: the partner's trust
domain is not ours, the endpoint URL is https, the profile's requirements hold, and an
initial bundle given out of band is a valid SPIFFE bundle of that trust domain.
"""

from __future__ import annotations

from datetime import timedelta

from trustmesh._proto.trustmesh.v1 import admin_pb2
from trustmesh.bundle import Bundle
from trustmesh.clip import shown
from trustmesh.controlplane.federation import BundleFetchError, parse_endpoint_url, validate_bundle
from trustmesh.controlplane.store.records import FederationRecord
from trustmesh.errors import InvalidArgumentError, InvalidSpiffeIdError
from trustmesh.spiffeid import SpiffeId, TrustDomain

_PROFILES = {
    admin_pb2.BUNDLE_ENDPOINT_PROFILE_UNSPECIFIED: "",
    admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_WEB: "https_web",
    admin_pb2.BUNDLE_ENDPOINT_PROFILE_HTTPS_SPIFFE: "https_spiffe",
}
MAX_URL = 2048


def check_relationship(request: admin_pb2.CreateFederationRelationshipRequest, own: TrustDomain,
                       now: float) -> tuple[FederationRecord, Bundle | None]:
    try:
        td = TrustDomain.parse(request.trust_domain)
    except InvalidSpiffeIdError as err:
        raise InvalidArgumentError(f"trust domain {shown(request.trust_domain)}: {err}") from err
    if td == own:
        raise InvalidArgumentError(f"{td} is this server's own trust domain; federate with another one")
    profile = _PROFILES.get(request.profile)
    if profile is None:
        raise InvalidArgumentError(f"unknown bundle endpoint profile {request.profile}; use https_web or https_spiffe")
    url = request.bundle_endpoint_url
    if len(url) > MAX_URL:
        raise InvalidArgumentError(f"the bundle endpoint URL is longer than {MAX_URL} characters")
    if url:
        try:
            parse_endpoint_url(url)
        except ValueError as err:
            raise InvalidArgumentError(str(err)) from err
        if not profile:
            raise InvalidArgumentError("a bundle endpoint needs a profile: --profile https_web or https_spiffe")
    elif profile or request.endpoint_spiffe_id:
        raise InvalidArgumentError("--profile and --endpoint-spiffe-id go with --endpoint URL")
    elif not request.bundle:
        raise InvalidArgumentError("give the partner's bundle endpoint (--endpoint URL --profile …) or its bundle "
                                   "(--bundle-file FILE)")
    endpoint_id = ""
    if profile == "https_spiffe":
        if not request.endpoint_spiffe_id or not request.bundle:
            raise InvalidArgumentError("the https_spiffe profile needs --endpoint-spiffe-id (the endpoint's SPIFFE ID) "
                                       "and --bundle-file (the partner's current bundle, obtained out of band, which "
                                       "authenticates the first fetch)")
        try:
            endpoint = SpiffeId.parse(request.endpoint_spiffe_id)
        except InvalidSpiffeIdError as err:
            raise InvalidArgumentError(f"--endpoint-spiffe-id: {err}") from err
        if endpoint.trust_domain != td:
            raise InvalidArgumentError(f"--endpoint-spiffe-id {endpoint} is not in the partner's trust domain {td}")
        endpoint_id = str(endpoint)
    elif request.endpoint_spiffe_id:
        raise InvalidArgumentError("--endpoint-spiffe-id goes only with --profile https_spiffe")
    bundle = None
    if request.bundle:
        try:
            bundle = validate_bundle(request.bundle, td, None)
        except BundleFetchError as err:
            raise InvalidArgumentError(f"--bundle-file: {err}") from err
    record = FederationRecord(trust_domain=td.name, endpoint_url=url, profile=profile, endpoint_spiffe_id=endpoint_id,
                              created_at=now)
    return record, bundle


PARTNERS_PATH = "/partners/"
DEFAULT_PARTNER_TTL = timedelta(hours=24)
MAX_PARTNER_TTL = timedelta(days=30)
MIN_PARTNER_TTL = timedelta(minutes=1)
MAX_CSR_BYTES = 16 * 1024


def check_partner_request(request: admin_pb2.IssuePartnerCertificateRequest,
                          own: TrustDomain) -> tuple[SpiffeId, timedelta]:
    """The partner's SPIFFE ID and certificate lifetime, or INVALID_ARGUMENT saying why."""
    try:
        spiffe_id = SpiffeId.parse(request.spiffe_id)
    except InvalidSpiffeIdError as err:
        raise InvalidArgumentError(f"--spiffe-id: {err}") from err
    if spiffe_id.trust_domain != own:
        raise InvalidArgumentError(f"{spiffe_id} is not in this trust domain; partner certificates name "
                                   f"spiffe://{own.name}{PARTNERS_PATH}NAME")
    if not spiffe_id.path.startswith(PARTNERS_PATH) or len(spiffe_id.path) <= len(PARTNERS_PATH):
        raise InvalidArgumentError(f"{spiffe_id}: partner certificates name spiffe://{own.name}{PARTNERS_PATH}NAME, "
                                   "so that allowlists and audits tell partners from workloads")
    ttl = timedelta(seconds=request.ttl_seconds) if request.ttl_seconds else DEFAULT_PARTNER_TTL
    if not MIN_PARTNER_TTL <= ttl <= MAX_PARTNER_TTL:
        raise InvalidArgumentError(f"--ttl must be between {MIN_PARTNER_TTL} and {MAX_PARTNER_TTL.days} days")
    if not request.csr or len(request.csr) > MAX_CSR_BYTES:
        raise InvalidArgumentError("--csr: give the partner's PKCS#10 certificate signing request (PEM or DER)")
    return spiffe_id, ttl


__all__ = ["check_partner_request", "check_relationship"]
