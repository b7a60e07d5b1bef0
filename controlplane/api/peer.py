"""The agent calling the Node API, as its TLS client certificate shows it (read by
`callers.agents`, then checked by the registry view against the attested-node record)."""

from __future__ import annotations

from dataclasses import dataclass

from trustmesh.spiffeid import SpiffeId


@dataclass(frozen=True)
class PeerAgent:
    spiffe_id: SpiffeId
    serial: str
    not_after: float  # the client certificate's expiry (unix time): a stream must not outlive it

    @property
    def id(self) -> str:
        return str(self.spiffe_id)
