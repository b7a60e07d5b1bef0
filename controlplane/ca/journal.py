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
from typing import Any, Literal

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


@dataclass(frozen=True)
class JwtKeySlot:
    kid: str
    status: Status
    public_key_der: bytes
    sealed_key: bytes
    created_at: float
    not_after: float


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

    def with_signing_ca(self, record: SigningCARecord, *, now: float, keep: int = 64) -> CAJournal:
        """Record a signing CA, dropping expired records (and keeping at most `keep`)."""
        alive = [r for r in self.signing_cas if r.not_after > now]
        return replace(self, signing_cas=tuple((alive + [record])[-keep:]))

    def to_bytes(self) -> bytes:
        doc = {
            "v": FORMAT_VERSION,
            "trust_domain": self.trust_domain,
            "roots": [
                {"id": r.id, "status": r.status, "cert": _b64(r.cert_der), "sealed_key": _b64(r.sealed_key),
                 "created_at": r.created_at, "not_after": r.not_after}
                for r in self.roots
            ],
            "jwt_keys": [
                {"kid": k.kid, "status": k.status, "public_key": _b64(k.public_key_der),
                 "sealed_key": _b64(k.sealed_key), "created_at": k.created_at, "not_after": k.not_after}
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
                         not_after=float(r["not_after"]))
                for r in doc["roots"]
            )
            jwt_keys = tuple(
                JwtKeySlot(kid=str(k["kid"]), status=_status(k["status"]),
                           public_key_der=_unb64(k["public_key"], "jwt public key"),
                           sealed_key=_unb64(k["sealed_key"], "jwt key"), created_at=float(k["created_at"]),
                           not_after=float(k["not_after"]))
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
    return value


def root_aad(trust_domain: str, slot_id: str) -> bytes:
    return f"trustmesh root key|{trust_domain}|{slot_id}".encode()


def jwt_aad(trust_domain: str, kid: str) -> bytes:
    return f"trustmesh jwt key|{trust_domain}|{kid}".encode()
