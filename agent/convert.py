"""Entries on the wire -> the agent's own values (bundles and selectors: `trustmesh/wire.py`).

The agent never imports the control plane."""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh._proto.trustmesh.v1 import types_pb2
from trustmesh.wire import selector_from_pb


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
    return AgentEntry(id=e.id, spiffe_id=e.spiffe_id, selectors=tuple(str(selector_from_pb(s)) for s in e.selectors),
                      x509_ttl=e.x509_ttl_seconds, jwt_ttl=e.jwt_ttl_seconds, dns_names=tuple(e.dns_names),
                      federates_with=tuple(e.federates_with), revision=e.revision)
