"""Wire messages -> the agent's own values. The agent never imports the control plane."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_der_public_key

from trustmesh._proto.trustmesh.v1 import types_pb2
from trustmesh.bundle import Bundle, JwtAuthority
from trustmesh.spiffeid import TrustDomain


@dataclass(frozen=True)
class AgentEntry:
    id: str
    spiffe_id: str
    selectors: tuple[str, ...]
    x509_ttl: int
    jwt_ttl: int
    dns_names: tuple[str, ...]
    federates_with: tuple[str, ...]
    revision: int

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "spiffe_id": self.spiffe_id, "selectors": list(self.selectors),
                "x509_ttl": self.x509_ttl, "jwt_ttl": self.jwt_ttl, "dns_names": list(self.dns_names),
                "federates_with": list(self.federates_with), "revision": self.revision}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> AgentEntry:
        return cls(id=str(d["id"]), spiffe_id=str(d["spiffe_id"]), selectors=tuple(d["selectors"]),  # type: ignore[arg-type]
                   x509_ttl=int(d["x509_ttl"]), jwt_ttl=int(d["jwt_ttl"]),  # type: ignore[call-overload]
                   dns_names=tuple(d["dns_names"]), federates_with=tuple(d["federates_with"]),  # type: ignore[arg-type]
                   revision=int(d["revision"]))  # type: ignore[call-overload]


def entry_from_pb(e: types_pb2.Entry) -> AgentEntry:
    return AgentEntry(id=e.id, spiffe_id=e.spiffe_id, selectors=tuple(f"{s.type}:{s.value}" for s in e.selectors),
                      x509_ttl=e.x509_ttl_seconds, jwt_ttl=e.jwt_ttl_seconds, dns_names=tuple(e.dns_names),
                      federates_with=tuple(e.federates_with), revision=e.revision)


def bundle_from_pb(b: types_pb2.Bundle) -> Bundle:
    return Bundle(
        TrustDomain(b.trust_domain),
        tuple(x509.load_der_x509_certificate(d) for d in b.x509_authorities),
        tuple(JwtAuthority(a.key_id, load_der_public_key(a.public_key),  # type: ignore[arg-type]
                           datetime.fromtimestamp(a.expires_at, timezone.utc) if a.expires_at else None)
              for a in b.jwt_authorities),
        sequence_number=b.sequence_number or None,
        refresh_hint=timedelta(seconds=b.refresh_hint_seconds) if b.refresh_hint_seconds else None,
    )
