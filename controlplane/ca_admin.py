"""The certificate authority as admins see and steer it (transport-free).

`authorities` is the journal as a flat list an operator reads (roots, then the replicas'
signing CAs, then JWT keys); `CAAdmin` shows it and takes root-rotation steps by hand,
through the same `take_root_step` the leader's schedule uses, so both are audited alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from cryptography import x509

from trustmesh.clock import format_utc
from trustmesh.controlplane.ca.journal import CAJournal, RootSlot
from trustmesh.controlplane.ca.pkcs11 import is_reference
from trustmesh.controlplane.config import MAX_JWT_TTL
from trustmesh.controlplane.duties import take_root_step
from trustmesh.controlplane.runtime import ServerRuntime
from trustmesh.duration import format_duration
from trustmesh.errors import FailedPreconditionError, InvalidArgumentError

AuthorityKind = Literal["x509_root", "x509_signing", "jwt_key"]
AuthorityState = Literal["prepared", "active", "old"]
# "next": prepare a new root if none is prepared, else activate the prepared one.
ROOT_STEPS = ("next", "prepare", "activate", "retire")


@dataclass(frozen=True)
class Authority:
    """One root, signing CA or JWT key. Times are Unix seconds; 0 means "not reached"."""

    kind: AuthorityKind
    state: AuthorityState
    key_id: str  # roots: the journal's root id; signing CAs: the root they chain to; JWT keys: the kid
    not_before: float
    not_after: float
    certificate: bytes = b""  # X.509 kinds: DER
    serial: str = ""  # X.509 kinds: lower-case hex
    prepared_at: float = 0.0
    activated_at: float = 0.0
    retired_at: float = 0.0
    replica: str = ""  # signing CAs: the server replica that holds it
    key_store: str = ""  # roots and JWT keys: "software" (sealed under the KEK) or "hsm" (in the token)
    issuer: str = ""  # roots signed by an upstream CA: its subject


@dataclass(frozen=True)
class CAStatus:
    authorities: tuple[Authority, ...]
    leader: str  # the replica running the rotation schedule; "" when none holds the lease now
    next_step: str  # the root-rotation step the schedule would take now; "" when none is due


@dataclass(frozen=True)
class RotationResult:
    authorities: tuple[Authority, ...]  # the journal after the step
    detail: str  # what the step did, in words
    forced: bool = False  # an activation taken early on --force


def authorities(journal: CAJournal) -> tuple[Authority, ...]:
    """Roots, then the replicas' signing CAs, then JWT keys; each in journal order (pure)."""
    out: list[Authority] = []
    for root in journal.roots:
        cert = x509.load_der_x509_certificate(root.cert_der)
        out.append(Authority(
            kind="x509_root", state=root.status, certificate=root.cert_der, serial=f"{cert.serial_number:x}",
            not_before=cert.not_valid_before_utc.timestamp(), not_after=root.not_after,
            prepared_at=root.created_at, activated_at=root.activated_at, retired_at=root.demoted_at, key_id=root.id,
            key_store=_key_store(root.sealed_key),
            issuer=cert.issuer.rfc4514_string() if root.upstream_chain else "",
        ))
    # A replica's newest signing CA is the one it signs with; earlier ones only linger
    # in the record until they expire.
    newest = {s.replica_id: s for s in journal.signing_cas}
    for signing in journal.signing_cas:
        cert = x509.load_der_x509_certificate(signing.cert_der)
        out.append(Authority(
            kind="x509_signing", state="active" if newest[signing.replica_id] is signing else "old",
            certificate=signing.cert_der, serial=f"{cert.serial_number:x}",
            not_before=cert.not_valid_before_utc.timestamp(), not_after=signing.not_after,
            activated_at=signing.created_at, replica=signing.replica_id, key_id=signing.root_id,
        ))
    for key in journal.jwt_keys:
        out.append(Authority(
            kind="jwt_key", state=key.status, key_id=key.kid, not_before=key.created_at, not_after=key.not_after,
            prepared_at=key.created_at, activated_at=key.activated_at, retired_at=key.demoted_at,
            key_store=_key_store(key.sealed_key),
        ))
    return tuple(out)


def _key_store(stored: bytes) -> str:
    return "hsm" if is_reference(stored) else "software"


def activation_allowed_at(prepared: RootSlot, refresh_hint: timedelta) -> float:
    """When the prepared root may become active (pure): a partner fetches our bundle at least
    once per refresh hint, so by then every partner holds the root the new SVIDs chain to.
    The root entered the bundle when it was prepared."""
    return prepared.created_at + refresh_hint.total_seconds()


class CAAdmin:
    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt

    async def status(self) -> CAStatus:
        # Another replica may have moved the journal a moment ago; show the stored one.
        await self._rt.ca.reload()
        journal = self._rt.ca.journal
        step = journal.next_root_step(self._rt.clock(), MAX_JWT_TTL.total_seconds()) or ""
        leader = await self._rt.store.get_leader("duties") or ""
        return CAStatus(authorities(journal), leader, step)

    async def rotate_root(self, step: str, actor: str, *, force: bool = False) -> RotationResult:
        """Take one root-rotation step now: one of ROOT_STEPS. A step out of order is refused
        (FAILED_PRECONDITION) and the refusal audited; so is an activation sooner than the
        bundle refresh hint after the root was prepared, unless `force` (audited as forced)."""
        await self._rt.ca.reload()
        if step not in ROOT_STEPS:
            raise InvalidArgumentError(f"unknown root rotation step {step[:32]}; use prepare, activate or retire")
        if step == "next":
            step = "activate" if self._rt.ca.journal.prepared_root() is not None else "prepare"
        try:
            forced = step == "activate" and self._too_early(force)
            detail = await take_root_step(self._rt, step, actor=actor, forced=forced)
        except FailedPreconditionError as err:
            await self._rt.audit.record("ca.rotation_refused", actor=actor, subject=step, outcome="denied",
                                        reason=str(err))
            raise
        return RotationResult(authorities(self._rt.ca.journal), detail, forced)

    def _too_early(self, force: bool) -> bool:
        """Whether activating now comes before partners can have fetched the prepared root;
        FAILED_PRECONDITION then, unless `force`."""
        prepared = self._rt.ca.journal.prepared_root()
        if prepared is None:
            return False  # take_root_step says why nothing can be activated
        hint = self._rt.config.bundle_refresh_hint
        allowed = math.ceil(activation_allowed_at(prepared, hint))  # whole seconds, as shown
        if self._rt.clock() >= allowed:
            return False
        if not force:
            raise FailedPreconditionError(
                f"root {prepared.id} is in the bundle since {format_utc(prepared.created_at)}; federated partners "
                f"fetch it within the bundle refresh hint ({format_duration(hint)}), so it can be activated from "
                f"{format_utc(allowed)} (or now with --force)")
        return True


__all__ = ["ROOT_STEPS", "Authority", "CAAdmin", "CAStatus", "RotationResult", "activation_allowed_at",
           "authorities"]
