"""The CA journal: the CA's persistent state as data (pure; no I/O).

Roots and JWT keys live in slots that move prepared -> active -> old; every transition is
saved (compare-and-swap) so a restarted or second replica sees the same history. Private
keys appear here only sealed under the KEK. Signing (intermediate) CA keys never appear at
all: each server process makes its own at start, so none is ever on disk or shared; the
journal keeps only their certificates, for the record.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from trustmesh.errors import CAError

Status = Literal["prepared", "active", "old"]
_STATUSES = ("prepared", "active", "old")
FORMAT_VERSION = 1


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any, what: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as err:
        raise CAError(f"CA journal is corrupt: {what} is not base64") from err


@dataclass(frozen=True)
class RootSlot:
    id: str
    status: Status
    cert_der: bytes
    sealed_key: bytes
    created_at: float
    not_after: float
    activated_at: float = 0.0  # 0: never signed (a root prepared from the start is active at once)
    demoted_at: float = 0.0  # when it became old; 0 while prepared or active
    # Signed by an upstream CA: that CA's chain (DER, issuing CA first, its root last); empty
    # for a self-signed root. `sealed_key` may also be an HSM key reference (ca/pkcs11.py).
    upstream_chain: bytes = b""


@dataclass(frozen=True)
class JwtKeySlot:
    kid: str
    status: Status
    public_key_der: bytes
    sealed_key: bytes
    created_at: float
    not_after: float
    activated_at: float = 0.0
    demoted_at: float = 0.0


@dataclass(frozen=True)
class SigningCARecord:
    replica_id: str
    cert_der: bytes
    root_id: str
    created_at: float
    not_after: float


@dataclass(frozen=True)
class CAJournal:
    trust_domain: str
    roots: tuple[RootSlot, ...] = ()
    jwt_keys: tuple[JwtKeySlot, ...] = ()
    signing_cas: tuple[SigningCARecord, ...] = field(default=())

    def active_root(self) -> RootSlot:
        active = [r for r in self.roots if r.status == "active"]
        if len(active) != 1:
            raise CAError(f"CA journal has {len(active)} active roots; exactly one is required")
        return active[0]

    def active_jwt_key(self) -> JwtKeySlot:
        active = [k for k in self.jwt_keys if k.status == "active"]
        if len(active) != 1:
            raise CAError(f"CA journal has {len(active)} active JWT keys; exactly one is required")
        return active[0]

    def prepared_root(self) -> RootSlot | None:
        prepared = [r for r in self.roots if r.status == "prepared"]
        return prepared[0] if prepared else None

    # --- root rotation: prepare -> activate -> retire -------------------------------------

    def check_can_prepare(self) -> None:
        if self.prepared_root() is not None:
            raise CAError("a root rotation is already under way (a root is prepared); activate it "
                          "with `trustmesh ca rotate --step activate` before preparing another")

    def with_prepared(self, root: RootSlot, jwt_key: JwtKeySlot) -> CAJournal:
        """Publish a new root and JWT key (in the bundle, not yet signing)."""
        self.check_can_prepare()
        if root.status != "prepared" or jwt_key.status != "prepared":
            raise CAError("a new root and JWT key must enter the journal as prepared")
        return replace(self, roots=self.roots + (root,), jwt_keys=self.jwt_keys + (jwt_key,))

    def activated(self, now: float) -> CAJournal:
        """The prepared root and JWT key sign from now on; the active ones become old."""
        if self.prepared_root() is None:
            raise CAError("no root is prepared; start a rotation with `trustmesh ca rotate --step prepare`")

        def step_root(r: RootSlot) -> RootSlot:
            if r.status == "prepared":
                return replace(r, status="active", activated_at=now)
            if r.status == "active":
                return replace(r, status="old", demoted_at=now)
            return r

        def step_jwt(k: JwtKeySlot) -> JwtKeySlot:
            if k.status == "prepared":
                return replace(k, status="active", activated_at=now)
            if k.status == "active":
                return replace(k, status="old", demoted_at=now)
            return k

        return replace(self, roots=tuple(map(step_root, self.roots)), jwt_keys=tuple(map(step_jwt, self.jwt_keys)))

    def retirable_roots(self, now: float) -> list[RootSlot]:
        """Old roots nothing valid chains to any more: no unexpired signing CA under them.

        Every leaf is cut off at its signing CA's expiry, so once the last signing CA made
        under a root has expired, so has every SVID that chains to it.
        """
        alive = {s.root_id for s in self.signing_cas if s.not_after > now}
        return [r for r in self.roots if r.status == "old" and (r.id not in alive or r.not_after <= now)]

    def retirable_jwt_keys(self, now: float, max_token_ttl: float) -> list[JwtKeySlot]:
        """Old JWT keys whose last possible token has expired (demoted + the longest lifetime)."""
        return [k for k in self.jwt_keys
                if k.status == "old" and (now >= k.demoted_at + max_token_ttl or k.not_after <= now)]

    def retired(self, now: float, max_token_ttl: float) -> CAJournal:
        roots = {r.id for r in self.retirable_roots(now)}
        kids = {k.kid for k in self.retirable_jwt_keys(now, max_token_ttl)}
        return replace(self, roots=tuple(r for r in self.roots if r.id not in roots),
                       jwt_keys=tuple(k for k in self.jwt_keys if k.kid not in kids))

    def next_root_step(self, now: float, max_token_ttl: float) -> str | None:
        """The rotation step due now, if any: the automatic schedule the leader follows.

        Prepare when the active root has lived half its life, activate at two thirds (so the
        new root has been in every bundle for a sixth of the old one's life before anything
        chains to it), retire old authorities once nothing they signed can still be valid.
        """
        if self.retirable_roots(now) or self.retirable_jwt_keys(now, max_token_ttl):
            return "retire"
        active = self.active_root()
        life = active.not_after - active.created_at
        if self.prepared_root() is None:
            if now >= active.created_at + life / 2 and not any(r.status == "old" for r in self.roots):
                return "prepare"
            return None
        if now >= active.created_at + life * 2 / 3:
            return "activate"
        return None

    def with_signing_ca(self, record: SigningCARecord, *, now: float) -> CAJournal:
        """Record a signing CA, dropping expired records.

        An unexpired record is never dropped, however many there are: retiring a root
        relies on seeing every signing CA that still chains to it.
        """
        alive = [r for r in self.signing_cas if r.not_after > now]
        return replace(self, signing_cas=tuple(alive + [record]))

    def to_bytes(self) -> bytes:
        doc = {
            "v": FORMAT_VERSION,
            "trust_domain": self.trust_domain,
            "roots": [
                {"id": r.id, "status": r.status, "cert": _b64(r.cert_der), "sealed_key": _b64(r.sealed_key),
                 "created_at": r.created_at, "not_after": r.not_after, "activated_at": r.activated_at,
                 "demoted_at": r.demoted_at, **({"upstream": _b64(r.upstream_chain)} if r.upstream_chain else {})}
                for r in self.roots
            ],
            "jwt_keys": [
                {"kid": k.kid, "status": k.status, "public_key": _b64(k.public_key_der),
                 "sealed_key": _b64(k.sealed_key), "created_at": k.created_at, "not_after": k.not_after,
                 "activated_at": k.activated_at, "demoted_at": k.demoted_at}
                for k in self.jwt_keys
            ],
            "signing_cas": [
                {"replica_id": s.replica_id, "cert": _b64(s.cert_der), "root_id": s.root_id,
                 "created_at": s.created_at, "not_after": s.not_after}
                for s in self.signing_cas
            ],
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> CAJournal:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise TypeError("not an object")
            if doc.get("v") != FORMAT_VERSION:
                raise CAError(f"CA journal format {doc.get('v')!r} is not supported by this version "
                              f"(expects {FORMAT_VERSION}); upgrade trustmesh")
            roots = tuple(
                RootSlot(id=str(r["id"]), status=_status(r["status"]), cert_der=_unb64(r["cert"], "root cert"),
                         sealed_key=_unb64(r["sealed_key"], "root key"), created_at=float(r["created_at"]),
                         not_after=float(r["not_after"]), activated_at=float(r.get("activated_at", 0.0)),
                         demoted_at=float(r.get("demoted_at", 0.0)),
                         upstream_chain=_unb64(r["upstream"], "upstream chain") if "upstream" in r else b"")
                for r in doc["roots"]
            )
            jwt_keys = tuple(
                JwtKeySlot(kid=str(k["kid"]), status=_status(k["status"]),
                           public_key_der=_unb64(k["public_key"], "jwt public key"),
                           sealed_key=_unb64(k["sealed_key"], "jwt key"), created_at=float(k["created_at"]),
                           not_after=float(k["not_after"]), activated_at=float(k.get("activated_at", 0.0)),
                           demoted_at=float(k.get("demoted_at", 0.0)))
                for k in doc["jwt_keys"]
            )
            signing = tuple(
                SigningCARecord(replica_id=str(s["replica_id"]), cert_der=_unb64(s["cert"], "signing cert"),
                                root_id=str(s["root_id"]), created_at=float(s["created_at"]),
                                not_after=float(s["not_after"]))
                for s in doc.get("signing_cas", [])
            )
            return cls(trust_domain=str(doc["trust_domain"]), roots=roots, jwt_keys=jwt_keys, signing_cas=signing)
        except CAError:
            raise
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            # RecursionError: json.loads on absurdly nested input; corrupt, like the rest.
            raise CAError(f"CA journal is corrupt: {err}") from err


def _status(value: Any) -> Status:  # Any in, checked, Literal out
    if value not in _STATUSES:
        raise CAError(f"CA journal is corrupt: unknown slot status {value!r}")
    return cast(Status, value)


def root_aad(trust_domain: str, slot_id: str) -> bytes:
    return f"trustmesh root key|{trust_domain}|{slot_id}".encode()


def jwt_aad(trust_domain: str, kid: str) -> bytes:
    return f"trustmesh jwt key|{trust_domain}|{kid}".encode()
