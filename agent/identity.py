"""What the Workload API needs from the agent's SVID cache, declared by the consumer.

The Workload API server (workload_api.py) depends only on `IdentitySource`; the SVID cache
(svid_cache.py) implements it. Keeping the interface here lets each be tested alone.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol

from trustmesh.bundle import BundleSet
from trustmesh.spiffeid import TrustDomain
from trustmesh.x509svid import X509Svid


@dataclass(frozen=True)
class WorkloadX509Svid:
    """One X509-SVID a workload may receive: the entry it came from, its key and chain."""

    entry_id: str
    svid: X509Svid  # with private_key set: made on this node, never sent anywhere but the workload
    federates_with: tuple[TrustDomain, ...] = ()
    hint: str = ""


@dataclass(frozen=True)
class WorkloadJwtSvid:
    spiffe_id: str
    token: str
    hint: str = ""


class NoIdentityError(LookupError):
    """The caller's selectors match no registration entry (Workload API: PermissionDenied)."""


class IdentitySource(Protocol):
    @property
    def trust_domain(self) -> TrustDomain: ...

    @property
    def version(self) -> int:
        """Increases on every change that can alter an answer below (rotation, entry, bundle)."""
        ...

    async def wait_for_change(self, after_version: int) -> int:
        """Return the new version once it is greater than `after_version`."""
        ...

    async def wait_until_synced(self) -> None:
        """Return once the entries are known (from the server, or the state kept on disk), so
        a caller is never denied merely because the agent has just started."""
        ...

    def entries_match(self, selectors: Collection[str]) -> bool:
        """True when at least one entry matches these selectors (even if no SVID is ready yet)."""
        ...

    def x509_svids_for(self, selectors: Collection[str]) -> list[WorkloadX509Svid]:
        """The current, unexpired SVIDs of every entry whose selectors are all in `selectors`."""
        ...

    def bundles(self) -> BundleSet:
        """Our own trust domain's bundle and every federated bundle the agent holds."""
        ...

    async def jwt_svids_for(self, selectors: Collection[str], audiences: Sequence[str],
                            spiffe_id: str | None = None) -> list[WorkloadJwtSvid]:
        """JWT-SVIDs for the matching entries (only `spiffe_id`'s when given); raises
        NoIdentityError when nothing matches."""
        ...
