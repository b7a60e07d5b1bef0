"""The records the control plane keeps, as frozen values with a stable JSON form.

Every record serialises to sorted, compact JSON carrying ``"v": 1``, so a later format can
be told apart and the bytes of an unchanged record never change (the audit chain and the
value compares in the store rely on that). Store-assigned fields (``revision``) are not
serialised: the store fills them from the key's mod_revision when it reads.

Fields hold parsed values (``SpiffeId``, ``Selector``, ``TrustDomain``) so that no reader
parses them again; in JSON they are their text, byte for byte what the string-typed records
of earlier versions wrote (tests/unit/fixtures/records_v1.json keeps a sample of those).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar

from trustmesh.errors import InvalidSpiffeIdError, StoreError
from trustmesh.flows import DECISIONS, Flow
from trustmesh.labels import effective_labels
from trustmesh.selectors import Selector
from trustmesh.spiffeid import SpiffeId, TrustDomain

FORMAT_VERSION = 1


class RecordFormatError(StoreError):
    """Stored bytes are not a record this version understands."""


def _dump(kind: str, fields: Mapping[str, Any]) -> bytes:
    return json.dumps(
        {"v": FORMAT_VERSION, **fields}, sort_keys=True, separators=(",", ":")
    ).encode()


def _load(kind: str, data: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordFormatError(f"stored {kind} record is not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise RecordFormatError(f"stored {kind} record is not a JSON object")
    if obj.get("v") != FORMAT_VERSION:
        raise RecordFormatError(
            f"stored {kind} record has format version {obj.get('v')!r}; this server reads "
            f"version {FORMAT_VERSION}; run the trustmesh version that wrote it"
        )
    return obj


def _field(kind: str, obj: dict[str, Any], name: str, want: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise RecordFormatError(f"stored {kind} record has no {name!r} field")
    value = obj[name]
    # bool is an int in Python; do not let True pass as a TTL or False as a time.
    if isinstance(value, bool) and want is not bool:
        raise RecordFormatError(f"stored {kind} record field {name!r} has the wrong type")
    if not isinstance(value, want):
        raise RecordFormatError(f"stored {kind} record field {name!r} has the wrong type")
    return value


def _strings(kind: str, obj: dict[str, Any], name: str) -> tuple[str, ...]:
    value = _field(kind, obj, name, list)
    if not all(isinstance(v, str) for v in value):
        raise RecordFormatError(f"stored {kind} record field {name!r} must hold strings")
    return tuple(value)


_NUMBER = (int, float)


# Decoding parses each ID once per distinct text: a registry of 100k entries under a few
# thousand agents repeats the same parent IDs, trust domains and selectors over and over.
@functools.lru_cache(maxsize=65536)
def _parse_id(text: str) -> SpiffeId:
    return SpiffeId.parse(text)


@functools.lru_cache(maxsize=4096)
def _parse_td(text: str) -> TrustDomain:
    return TrustDomain(text)


@functools.lru_cache(maxsize=65536)
def _parse_selector(text: str) -> Selector:
    # Not Selector.parse: what is stored was validated when it was written (and node
    # selectors come from attestation itself); a stricter rule in a later version must
    # not make an existing store unreadable. Only the shape "type:value" is required.
    sel_type, sep, value = text.partition(":")
    if not sep or not sel_type or not value:
        raise ValueError(text)
    return Selector(sel_type, value)


def _spiffe_id(kind: str, obj: dict[str, Any], name: str) -> SpiffeId:
    text = _field(kind, obj, name, str)
    try:
        return _parse_id(text)
    except InvalidSpiffeIdError as err:
        raise RecordFormatError(f"stored {kind} record field {name!r} is not a SPIFFE ID ({err})") from err


def _selectors(kind: str, obj: dict[str, Any], name: str) -> tuple[Selector, ...]:
    try:
        return tuple(_parse_selector(t) for t in _strings(kind, obj, name))
    except ValueError as err:
        raise RecordFormatError(
            f"stored {kind} record field {name!r} holds {str(err)[:96]!r}, which is no TYPE:VALUE selector"
        ) from err


def _trust_domain(kind: str, obj: dict[str, Any], name: str) -> TrustDomain:
    text = _field(kind, obj, name, str)
    try:
        return _parse_td(text)
    except InvalidSpiffeIdError as err:
        raise RecordFormatError(f"stored {kind} record field {name!r} is not a trust domain ({err})") from err


def _trust_domains(kind: str, obj: dict[str, Any], name: str) -> tuple[TrustDomain, ...]:
    try:
        return tuple(_parse_td(t) for t in _strings(kind, obj, name))
    except InvalidSpiffeIdError as err:
        raise RecordFormatError(f"stored {kind} record field {name!r} holds a bad trust domain ({err})") from err


def _texts(values: tuple[object, ...]) -> list[str]:
    return [str(v) for v in values]


@dataclass(frozen=True)
class RegistrationEntry:
    id: str
    spiffe_id: SpiffeId
    # An agent ID, or a node alias: the SPIFFE ID of an alias entry (one whose parent is
    # the server's ID). Both are SPIFFE IDs, so one type holds either.
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]  # e.g. unix:uid:1000, kept in stored order
    x509_ttl: int  # seconds
    jwt_ttl: int  # seconds
    dns_names: tuple[str, ...]
    federates_with: tuple[TrustDomain, ...]
    admin: bool
    created_at: float
    updated_at: float
    revision: int = 0  # the store's mod_revision, filled on read; 0 = not read from a store
    # Node labels an agent's node must all carry for the entry to be issued there (sorted
    # key/value pairs); empty = the entry goes by its parent alone (see trustmesh/labels.py).
    node_selector: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> bytes:
        return _dump(
            "entry",
            {
                "id": self.id,
                "spiffe_id": str(self.spiffe_id),
                "parent_id": str(self.parent_id),
                "selectors": _texts(self.selectors),
                "x509_ttl": self.x509_ttl,
                "jwt_ttl": self.jwt_ttl,
                "dns_names": list(self.dns_names),
                "federates_with": _texts(self.federates_with),
                "admin": self.admin,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                # Written only when set, so entries without one keep the bytes earlier versions wrote.
                **({"node_selector": dict(self.node_selector)} if self.node_selector else {}),
            },
        )

    @classmethod
    def from_json(cls, data: bytes, *, revision: int = 0) -> RegistrationEntry:
        k = "entry"
        o = _load(k, data)
        return cls(
            id=_field(k, o, "id", str),
            spiffe_id=_spiffe_id(k, o, "spiffe_id"),
            parent_id=_spiffe_id(k, o, "parent_id"),
            selectors=_selectors(k, o, "selectors"),
            x509_ttl=_field(k, o, "x509_ttl", int),
            jwt_ttl=_field(k, o, "jwt_ttl", int),
            dns_names=_strings(k, o, "dns_names"),
            federates_with=_trust_domains(k, o, "federates_with"),
            admin=_field(k, o, "admin", bool),
            created_at=float(_field(k, o, "created_at", _NUMBER)),
            updated_at=float(_field(k, o, "updated_at", _NUMBER)),
            revision=revision,
            node_selector=_label_pairs(k, o, "node_selector"),
        )


class NodeStatus(StrEnum):
    """What the control plane concluded about an attested agent, apart from a ban."""

    ACTIVE = "active"
    # One agent identity was seen in two places at once (two connections from different
    # addresses, or a superseded SVID still in use elsewhere): its key was probably copied.
    # An operator bans the agent or clears the mark (`trustmesh agent clear`).
    SUSPECTED_CLONE = "suspected-clone"


@dataclass(frozen=True)
class SupersededSvid:
    """An agent SVID that a renewal replaced: still valid, but no longer the agent's own."""

    serial: str  # hex
    not_after: float


@dataclass(frozen=True)
class AttestedNode:
    spiffe_id: SpiffeId  # the agent ID
    node_name: str
    attestation_type: str
    cert_serial: str
    cert_not_after: float
    banned: bool
    created_at: float
    updated_at: float
    selectors: tuple[Selector, ...] = ()  # from node attestation, e.g. node:name:node-1
    revision: int = 0  # the store's mod_revision, filled on read
    status: NodeStatus = NodeStatus.ACTIVE
    status_reason: str = ""  # why the status is what it is (empty when active)
    status_at: float = 0.0  # when the status last changed (0: never)
    # The peer address (host) that obtained cert_serial, by attestation or renewal, and when;
    # "" for records written before addresses were kept.
    renewed_from: str = ""
    renewed_at: float = 0.0
    # The unexpired SVIDs of this attestation that renewals replaced, newest first: one of
    # them presented from another address than `renewed_from` means a copied agent key.
    superseded: tuple[SupersededSvid, ...] = ()
    # Inbound listeners the agent says it runs with `mtls: permissive` ("service listen").
    permissive_listeners: tuple[str, ...] = ()
    # Labels an operator set (`trustmesh agent label`) or the server derived from attestation
    # evidence, as sorted key/value pairs; never from the agent's own configuration.
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def effective_labels(self) -> dict[str, str]:
        """The labels node selectors match: the stored ones and attestation=<type>."""
        return effective_labels(dict(self.labels), self.attestation_type)

    def to_json(self) -> bytes:
        fields: dict[str, Any] = {
            "spiffe_id": str(self.spiffe_id),
            "node_name": self.node_name,
            "attestation_type": self.attestation_type,
            "cert_serial": self.cert_serial,
            "cert_not_after": self.cert_not_after,
            "banned": self.banned,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "selectors": _texts(self.selectors),
        }
        # Written only when set, so a record without them keeps the bytes earlier versions wrote.
        if self.status is not NodeStatus.ACTIVE:
            fields.update(status=str(self.status), status_reason=self.status_reason, status_at=self.status_at)
        if self.renewed_from:
            fields.update(renewed_from=self.renewed_from, renewed_at=self.renewed_at)
        if self.superseded:
            fields["superseded"] = [{"serial": s.serial, "not_after": s.not_after} for s in self.superseded]
        if self.permissive_listeners:
            fields["permissive_listeners"] = list(self.permissive_listeners)
        if self.labels:
            fields["labels"] = dict(self.labels)
        return _dump("node", fields)

    @classmethod
    def from_json(cls, data: bytes, *, revision: int = 0) -> AttestedNode:
        k = "attested node"
        o = _load(k, data)
        return cls(
            spiffe_id=_spiffe_id(k, o, "spiffe_id"),
            node_name=_field(k, o, "node_name", str),
            attestation_type=_field(k, o, "attestation_type", str),
            cert_serial=_field(k, o, "cert_serial", str),
            cert_not_after=float(_field(k, o, "cert_not_after", _NUMBER)),
            banned=_field(k, o, "banned", bool),
            created_at=float(_field(k, o, "created_at", _NUMBER)),
            updated_at=float(_field(k, o, "updated_at", _NUMBER)),
            selectors=_selectors(k, o, "selectors"),
            revision=revision,
            status=_node_status(k, o),
            status_reason=_optional(k, o, "status_reason", str, ""),
            status_at=float(_optional(k, o, "status_at", _NUMBER, 0.0)),
            renewed_from=_optional(k, o, "renewed_from", str, ""),
            renewed_at=float(_optional(k, o, "renewed_at", _NUMBER, 0.0)),
            superseded=_superseded(k, o),
            permissive_listeners=_strings(k, o, "permissive_listeners") if "permissive_listeners" in o else (),
            labels=_label_pairs(k, o, "labels"),
        )


def label_pairs(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Labels as records hold them: sorted pairs, so equal label sets compare equal."""
    return tuple(sorted(labels.items()))


def _label_pairs(kind: str, obj: dict[str, Any], name: str) -> tuple[tuple[str, str], ...]:
    """A key=value map field added later: absent in older records (no labels)."""
    if name not in obj:
        return ()
    value = _field(kind, obj, name, dict)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RecordFormatError(f"stored {kind} record field {name!r} must map strings to strings")
    return label_pairs(value)


def _optional(kind: str, obj: dict[str, Any], name: str, want: type | tuple[type, ...], default: Any) -> Any:
    """A field later versions added: absent in older records, which read as `default`."""
    return _field(kind, obj, name, want) if name in obj else default


def _node_status(kind: str, obj: dict[str, Any]) -> NodeStatus:
    text = _optional(kind, obj, "status", str, NodeStatus.ACTIVE.value)
    try:
        return NodeStatus(text)
    except ValueError:
        raise RecordFormatError(f"stored {kind} record has status {text[:40]!r}; this server knows "
                                f"{', '.join(s.value for s in NodeStatus)}") from None


def _superseded(kind: str, obj: dict[str, Any]) -> tuple[SupersededSvid, ...]:
    out = []
    for item in _optional(kind, obj, "superseded", list, []):
        if not isinstance(item, dict) or not isinstance(item.get("serial"), str) \
                or not isinstance(item.get("not_after"), _NUMBER) or isinstance(item.get("not_after"), bool):
            raise RecordFormatError(f"stored {kind} record field 'superseded' must hold {{serial, not_after}} objects")
        out.append(SupersededSvid(item["serial"], float(item["not_after"])))
    return tuple(out)


@dataclass(frozen=True)
class JoinToken:
    """A join token as stored: only its hash, never the token itself."""

    token_hash: str
    node_name: str
    expires_at: float
    created_at: float

    def to_json(self) -> bytes:
        return _dump(
            "join token",
            {
                "token_hash": self.token_hash,
                "node_name": self.node_name,
                "expires_at": self.expires_at,
                "created_at": self.created_at,
            },
        )

    @classmethod
    def from_json(cls, data: bytes) -> JoinToken:
        k = "join token"
        o = _load(k, data)
        return cls(
            token_hash=_field(k, o, "token_hash", str),
            node_name=_field(k, o, "node_name", str),
            expires_at=float(_field(k, o, "expires_at", _NUMBER)),
            created_at=float(_field(k, o, "created_at", _NUMBER)),
        )


@dataclass(frozen=True)
class PolicyRevision:
    revision: int
    documents: str  # the YAML/JSON text of all documents of this revision
    author: str
    comment: str
    created_at: float
    sha256: str  # hex digest of documents (UTF-8)

    def to_json(self) -> bytes:
        return _dump(
            "policy revision",
            {
                "revision": self.revision,
                "documents": self.documents,
                "author": self.author,
                "comment": self.comment,
                "created_at": self.created_at,
                "sha256": self.sha256,
            },
        )

    @classmethod
    def from_json(cls, data: bytes) -> PolicyRevision:
        k = "policy revision"
        o = _load(k, data)
        return cls(
            revision=_field(k, o, "revision", int),
            documents=_field(k, o, "documents", str),
            author=_field(k, o, "author", str),
            comment=_field(k, o, "comment", str),
            created_at=float(_field(k, o, "created_at", _NUMBER)),
            sha256=_field(k, o, "sha256", str),
        )


@dataclass(frozen=True)
class BundleRecord:
    trust_domain: TrustDomain
    jwks: bytes  # the SPIFFE bundle JSON, kept byte for byte (base64 in the record)
    sequence: int
    updated_at: float

    def to_json(self) -> bytes:
        return _dump(
            "bundle",
            {
                "trust_domain": self.trust_domain.name,
                "jwks": base64.b64encode(self.jwks).decode("ascii"),
                "sequence": self.sequence,
                "updated_at": self.updated_at,
            },
        )

    @classmethod
    def from_json(cls, data: bytes) -> BundleRecord:
        k = "bundle"
        o = _load(k, data)
        try:
            jwks = base64.b64decode(_field(k, o, "jwks", str), validate=True)
        except binascii.Error as err:
            raise RecordFormatError(f"stored bundle record has bad base64 jwks ({err})") from err
        return cls(
            trust_domain=_trust_domain(k, o, "trust_domain"),
            jwks=jwks,
            sequence=_field(k, o, "sequence", int),
            updated_at=float(_field(k, o, "updated_at", _NUMBER)),
        )


@dataclass(frozen=True)
class AuditEvent:
    """One link of the audit hash chain; the store keeps ``hash``/``prev_hash`` as given."""

    seq: int
    time: float
    kind: str
    actor: str
    subject: str
    outcome: str
    # A dict (JSON-shaped) is left out of the hash of the dataclass; it is serialised
    # with sorted keys so the stored bytes are canonical.
    details: dict[str, Any] = field(hash=False)
    prev_hash: str
    hash: str

    def to_json(self) -> bytes:
        return _dump(
            "audit event",
            {
                "seq": self.seq,
                "time": self.time,
                "kind": self.kind,
                "actor": self.actor,
                "subject": self.subject,
                "outcome": self.outcome,
                "details": self.details,
                "prev_hash": self.prev_hash,
                "hash": self.hash,
            },
        )

    @classmethod
    def from_json(cls, data: bytes) -> AuditEvent:
        k = "audit event"
        o = _load(k, data)
        return cls(
            seq=_field(k, o, "seq", int),
            time=float(_field(k, o, "time", _NUMBER)),
            kind=_field(k, o, "kind", str),
            actor=_field(k, o, "actor", str),
            subject=_field(k, o, "subject", str),
            outcome=_field(k, o, "outcome", str),
            details=_field(k, o, "details", dict),
            prev_hash=_field(k, o, "prev_hash", str),
            hash=_field(k, o, "hash", str),
        )


@dataclass(frozen=True)
class FederationRecord:
    """A federation relationship: where to fetch a partner trust domain's bundle, and how.

    ``endpoint_url`` empty means the bundle is maintained by hand (``--bundle-file``).
    The bundle itself is a BundleRecord under the same trust domain.
    """

    trust_domain: TrustDomain
    endpoint_url: str
    profile: str  # "https_web", "https_spiffe", or "" (no endpoint)
    endpoint_spiffe_id: SpiffeId | None  # only for https_spiffe; stored as "" when None
    created_at: float
    last_refreshed_at: float = 0.0
    last_error: str = ""
    next_refresh_at: float = 0.0
    # The highest spiffe_sequence an accepted bundle of the partner has carried; None while
    # none has. Once set, a bundle without a sequence, or with a lower one, is refused.
    spiffe_sequence: int | None = None
    revision: int = 0  # the store's mod_revision, filled on read

    def to_json(self) -> bytes:
        fields: dict[str, Any] = {
            "trust_domain": self.trust_domain.name,
            "endpoint_url": self.endpoint_url,
            "profile": self.profile,
            "endpoint_spiffe_id": "" if self.endpoint_spiffe_id is None else str(self.endpoint_spiffe_id),
            "created_at": self.created_at,
            "last_refreshed_at": self.last_refreshed_at,
            "last_error": self.last_error,
            "next_refresh_at": self.next_refresh_at,
        }
        # Written only when set, so a record without it keeps the bytes earlier versions wrote.
        if self.spiffe_sequence is not None:
            fields["spiffe_sequence"] = self.spiffe_sequence
        return _dump("federation", fields)

    @classmethod
    def from_json(cls, data: bytes, revision: int = 0) -> FederationRecord:
        k = "federation"
        o = _load(k, data)
        return cls(
            trust_domain=_trust_domain(k, o, "trust_domain"),
            endpoint_url=_field(k, o, "endpoint_url", str),
            profile=_field(k, o, "profile", str),
            endpoint_spiffe_id=_spiffe_id(k, o, "endpoint_spiffe_id") if o.get("endpoint_spiffe_id") != "" else None,
            created_at=float(_field(k, o, "created_at", _NUMBER)),
            last_refreshed_at=float(_field(k, o, "last_refreshed_at", _NUMBER)),
            last_error=_field(k, o, "last_error", str),
            next_refresh_at=float(_field(k, o, "next_refresh_at", _NUMBER)),
            spiffe_sequence=_optional(k, o, "spiffe_sequence", int, None),
            revision=revision,
        )


@dataclass(frozen=True)
class PartnerCertificate:
    """A certificate issued to a partner from its CSR; ``revoked_at`` > 0 once revoked."""

    serial: str  # lower-case hex
    spiffe_id: SpiffeId
    not_after: float
    issued_at: float
    issued_by: str
    revoked_at: float = 0.0
    reason: str = ""

    def to_json(self) -> bytes:
        return _dump(
            "partner certificate",
            {
                "serial": self.serial,
                "spiffe_id": str(self.spiffe_id),
                "not_after": self.not_after,
                "issued_at": self.issued_at,
                "issued_by": self.issued_by,
                "revoked_at": self.revoked_at,
                "reason": self.reason,
            },
        )

    @classmethod
    def from_json(cls, data: bytes) -> PartnerCertificate:
        k = "partner certificate"
        o = _load(k, data)
        return cls(
            serial=_field(k, o, "serial", str),
            spiffe_id=_spiffe_id(k, o, "spiffe_id"),
            not_after=float(_field(k, o, "not_after", _NUMBER)),
            issued_at=float(_field(k, o, "issued_at", _NUMBER)),
            issued_by=_field(k, o, "issued_by", str),
            revoked_at=float(_field(k, o, "revoked_at", _NUMBER)),
            reason=_field(k, o, "reason", str),
        )


class OperatorState(StrEnum):
    PENDING = "pending"  # added, not enrolled yet (or reset)
    ACTIVE = "active"
    DISABLED = "disabled"


@dataclass(frozen=True)
class OperatorRecord:
    """A person who administers trustmesh. Secrets are stored as an Argon2id hash (the
    password), a SHA-256 hash (the enrollment token) and sealed under the KEK (the TOTP
    secret); `epoch` is named in every operator certificate, so changing it (reset,
    disable) ends every certificate issued before."""

    name: str
    roles: tuple[str, ...]
    team: str
    state: OperatorState
    created_at: float
    created_by: str
    epoch: str
    enroll_hash: str = ""
    enroll_expires_at: float = 0.0
    password_hash: str = ""
    totp_sealed: str = ""  # base64 of the KEK-sealed secret
    enrolled_at: float = 0.0
    last_otp_step: int = 0  # the newest TOTP time step used: older and equal ones are refused
    failures: tuple[float, ...] = ()  # times of recent failed logins
    locked_until: float = 0.0
    revision: int = field(default=0, compare=False)

    def to_json(self) -> bytes:
        return _dump("operator", {
            "name": self.name, "roles": list(self.roles), "team": self.team, "state": str(self.state),
            "created_at": self.created_at, "created_by": self.created_by, "epoch": self.epoch,
            "enroll_hash": self.enroll_hash, "enroll_expires_at": self.enroll_expires_at,
            "password_hash": self.password_hash, "totp_sealed": self.totp_sealed, "enrolled_at": self.enrolled_at,
            "last_otp_step": self.last_otp_step, "failures": list(self.failures), "locked_until": self.locked_until,
        })

    @classmethod
    def from_json(cls, data: bytes, *, revision: int = 0) -> OperatorRecord:
        k = "operator"
        o = _load(k, data)
        state = _field(k, o, "state", str)
        try:
            parsed = OperatorState(state)
        except ValueError:
            raise RecordFormatError(f"stored {k} record has state {state[:40]!r}") from None
        failures = _field(k, o, "failures", list)
        if not all(isinstance(f, _NUMBER) and not isinstance(f, bool) for f in failures):
            raise RecordFormatError(f"stored {k} record field 'failures' must hold numbers")
        return cls(
            name=_field(k, o, "name", str), roles=_strings(k, o, "roles"), team=_field(k, o, "team", str),
            state=parsed, created_at=float(_field(k, o, "created_at", _NUMBER)),
            created_by=_field(k, o, "created_by", str), epoch=_field(k, o, "epoch", str),
            enroll_hash=_field(k, o, "enroll_hash", str),
            enroll_expires_at=float(_field(k, o, "enroll_expires_at", _NUMBER)),
            password_hash=_field(k, o, "password_hash", str), totp_sealed=_field(k, o, "totp_sealed", str),
            enrolled_at=float(_field(k, o, "enrolled_at", _NUMBER)),
            last_otp_step=int(_field(k, o, "last_otp_step", int)),
            failures=tuple(float(f) for f in failures), locked_until=float(_field(k, o, "locked_until", _NUMBER)),
            revision=revision,
        )


class AccessState(StrEnum):
    """As stored; `pending` and `active` become `expired` by time alone (AccessGrant.state_at)."""

    PENDING = "pending"
    ACTIVE = "active"
    DENIED = "denied"
    REVOKED = "revoked"
    EXPIRED = "expired"  # never stored: what a pending or active grant becomes by time


@dataclass(frozen=True)
class AccessGrant:
    """A request for just-in-time access: one source, one destination, one port, for a
    bounded time. Approved (by enough people other than the requester), it is an allow rule in
    force until `expires_at`; break-glass grants are active at once and await a review."""

    id: str
    source: SpiffeId
    destination: SpiffeId
    port: int
    duration: float  # seconds the grant lasts once active
    reason: str
    requester: str  # the actor, as the audit log names it
    created_at: float
    approve_by: float  # a request not approved by then expires
    state: AccessState = AccessState.PENDING
    approvals: tuple[str, ...] = ()
    required_approvals: int = 1
    starts_at: float = 0.0
    expires_at: float = 0.0
    decided_by: str = ""  # who denied or revoked it
    decision_reason: str = ""
    break_glass: bool = False
    reviewed_by: str = ""
    reviewed_at: float = 0.0
    revision: int = field(default=0, compare=False)

    def state_at(self, now: float) -> AccessState:
        if self.state is AccessState.PENDING and now >= self.approve_by:
            return AccessState.EXPIRED
        if self.state is AccessState.ACTIVE and now >= self.expires_at:
            return AccessState.EXPIRED
        return self.state

    def to_json(self) -> bytes:
        return _dump("access grant", {
            "id": self.id, "source": str(self.source), "destination": str(self.destination), "port": self.port,
            "duration": self.duration, "reason": self.reason, "requester": self.requester,
            "created_at": self.created_at, "approve_by": self.approve_by, "state": str(self.state),
            "approvals": list(self.approvals), "required_approvals": self.required_approvals,
            "starts_at": self.starts_at, "expires_at": self.expires_at, "decided_by": self.decided_by,
            "decision_reason": self.decision_reason, "break_glass": self.break_glass,
            "reviewed_by": self.reviewed_by, "reviewed_at": self.reviewed_at,
        })

    @classmethod
    def from_json(cls, data: bytes, *, revision: int = 0) -> AccessGrant:
        k = "access grant"
        o = _load(k, data)
        state = _field(k, o, "state", str)
        try:
            parsed = AccessState(state)
        except ValueError:
            raise RecordFormatError(f"stored {k} record has state {state[:40]!r}") from None
        port = _field(k, o, "port", int)
        if not 0 < port < 65536:
            raise RecordFormatError(f"stored {k} record has port {port}")
        return cls(
            id=_field(k, o, "id", str), source=_spiffe_id(k, o, "source"), destination=_spiffe_id(k, o, "destination"),
            port=port, duration=float(_field(k, o, "duration", _NUMBER)), reason=_field(k, o, "reason", str),
            requester=_field(k, o, "requester", str), created_at=float(_field(k, o, "created_at", _NUMBER)),
            approve_by=float(_field(k, o, "approve_by", _NUMBER)), state=parsed,
            approvals=_strings(k, o, "approvals"), required_approvals=_field(k, o, "required_approvals", int),
            starts_at=float(_field(k, o, "starts_at", _NUMBER)), expires_at=float(_field(k, o, "expires_at", _NUMBER)),
            decided_by=_field(k, o, "decided_by", str), decision_reason=_field(k, o, "decision_reason", str),
            break_glass=_field(k, o, "break_glass", bool), reviewed_by=_field(k, o, "reviewed_by", str),
            reviewed_at=float(_field(k, o, "reviewed_at", _NUMBER)), revision=revision,
        )


QUARANTINE_KINDS = ("identity", "node")


@dataclass(frozen=True)
class Quarantine:
    """A SPIFFE ID in quarantine (continuous verification): every agent refuses connections
    from and to it and the CA issues it nothing until a person releases it. For a node, the
    target is its agent's ID, and every workload on that node is refused."""

    target: str  # the SPIFFE ID in quarantine (an agent's ID for a node)
    kind: str  # identity or node
    reason: str
    created_by: str  # the actor, as the audit log names it ("detector" for a response rule)
    created_at: float
    node: str = ""  # the node name of a node quarantine; else the node the anomaly was seen on, if known
    evidence: tuple[str, ...] = ()  # the detector's explanations (empty for a manual quarantine)
    detector: str = ""
    score: float = 0.0
    revision: int = field(default=0, compare=False)

    def to_json(self) -> bytes:
        return _dump("quarantine", {
            "target": self.target, "kind": self.kind, "reason": self.reason, "created_by": self.created_by,
            "created_at": self.created_at, "node": self.node, "evidence": list(self.evidence),
            "detector": self.detector, "score": self.score,
        })

    @classmethod
    def from_json(cls, data: bytes, *, revision: int = 0) -> Quarantine:
        k = "quarantine"
        o = _load(k, data)
        kind = _field(k, o, "kind", str)
        if kind not in QUARANTINE_KINDS:
            raise RecordFormatError(f"stored {k} record has kind {kind[:40]!r}")
        # Parsed to refuse a malformed target; kept as text, which is what agents compare.
        target = str(_spiffe_id(k, o, "target"))
        return cls(
            target=target, kind=kind, reason=_field(k, o, "reason", str),
            created_by=_field(k, o, "created_by", str), created_at=float(_field(k, o, "created_at", _NUMBER)),
            node=_field(k, o, "node", str), evidence=_strings(k, o, "evidence"),
            detector=_field(k, o, "detector", str), score=float(_field(k, o, "score", _NUMBER)), revision=revision,
        )


@dataclass(frozen=True)
class OwnershipRecord:
    """The ownership file in force: which team owns which destinations (policy/ownership.py)."""

    documents: str  # the file's text, as the admin gave it
    updated_by: str
    updated_at: float
    revision: int = field(default=0, compare=False)

    def to_json(self) -> bytes:
        return _dump("policy ownership", {"documents": self.documents, "updated_by": self.updated_by,
                                          "updated_at": self.updated_at})

    @classmethod
    def from_json(cls, data: bytes, *, revision: int = 0) -> OwnershipRecord:
        k = "policy ownership"
        o = _load(k, data)
        return cls(documents=_field(k, o, "documents", str), updated_by=_field(k, o, "updated_by", str),
                   updated_at=float(_field(k, o, "updated_at", _NUMBER)), revision=revision)


# One edge of a stored rollup as its JSON row: source, destination, port, decision, rule,
# connections, bytes in, bytes out, first seen, last seen, source address, route. Rows stay
# lists when read: a 30-day window is hundreds of thousands of them (benchmarks/flows.py).
# The route is written only when there is one: a connection's row stays the 11 fields rows had
# before flows had routes, so records written before still load here, and an older replica in
# a cluster being upgraded still reads the newer ones' records that hold no HTTP requests.
FlowRow = list[Any]
_DECISIONS = frozenset(DECISIONS)
_ROW_FIELDS = 12


def flow_rows(kind: str, raw: object) -> list[FlowRow]:
    """The stored rows, each checked field by field (in one pass: no per-row objects), each
    with all _ROW_FIELDS fields (a row stored without a route gets "" in place)."""
    if not isinstance(raw, list):
        raise RecordFormatError(f"stored {kind} record field 'edges' must be a list")
    for row in raw:
        if type(row) is not list or len(row) not in (_ROW_FIELDS - 1, _ROW_FIELDS):
            raise RecordFormatError(f"stored {kind} record has a malformed edge")
        if len(row) < _ROW_FIELDS:
            row.append("")
        src, dst, port, decision, rule, conns, bytes_in, bytes_out, first, last, address, route = row
        # `type(x) is int` on purpose: a JSON true is a bool, which isinstance would take for 1.
        if not (type(src) is str and type(dst) is str and type(port) is int and 0 <= port <= 65535
                and decision in _DECISIONS and type(rule) is str and type(conns) is int and conns >= 0
                and type(bytes_in) is int and bytes_in >= 0 and type(bytes_out) is int and bytes_out >= 0
                and type(first) in _NUMBER and type(last) in _NUMBER and type(address) is str
                and type(route) is str):
            raise RecordFormatError(f"stored {kind} record has a malformed edge")
    return raw


def _flow_row(e: Flow) -> list[object]:
    row: list[object] = [e.source, e.destination, e.port, e.decision, e.rule, e.connections, e.bytes_in,
                         e.bytes_out, e.first_seen, e.last_seen, e.source_address]
    if e.route:
        row.append(e.route)
    return row


@dataclass(frozen=True)
class FlowShard:
    """One replica's sums of one hour's flows, or the part of them that hashes to one shard."""

    hour: int  # hours since the epoch
    replica: str
    shard: int
    edges: tuple[Flow, ...]

    def to_json(self) -> bytes:
        return _dump("flow rollup", {"hour": self.hour, "replica": self.replica, "shard": self.shard,
                                     "edges": [_flow_row(e) for e in self.edges]})

    @staticmethod
    def rows_from_json(data: bytes) -> tuple[int, str, list[FlowRow]]:
        """(hour, replica, rows) of a stored record, checked, without a Flow per row."""
        k = "flow rollup"
        o = _load(k, data)
        return _field(k, o, "hour", int), _field(k, o, "replica", str), flow_rows(k, o.get("edges"))

    @classmethod
    def from_json(cls, data: bytes) -> FlowShard:
        k = "flow rollup"
        o = _load(k, data)
        edges = tuple(Flow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], float(r[8]), float(r[9]), r[10],
                           r[11]) for r in flow_rows(k, o.get("edges")))
        return cls(hour=_field(k, o, "hour", int), replica=_field(k, o, "replica", str),
                   shard=_field(k, o, "shard", int), edges=edges)


# --- the change feed ---------------------------------------------------------------------
#
# One change type per record kind, each carrying its record after the change (None when
# it was deleted) and the store revision of the change. Consumers handle them with
# ``match``; ``kind`` is a label for logs and metrics, not something to dispatch on.


@dataclass(frozen=True, slots=True)
class EntryChanged:
    kind: ClassVar[str] = "entry"
    key: str  # the entry id
    entry: RegistrationEntry | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.entry is None


@dataclass(frozen=True, slots=True)
class NodeChanged:
    kind: ClassVar[str] = "node"
    key: str  # the agent ID, as the node is keyed
    node: AttestedNode | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.node is None


@dataclass(frozen=True, slots=True)
class TokenChanged:
    kind: ClassVar[str] = "token"
    key: str  # the token hash
    token: JoinToken | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.token is None


@dataclass(frozen=True, slots=True)
class PolicyChanged:
    kind: ClassVar[str] = "policy"
    key: str  # the policy revision number, decimal
    policy: PolicyRevision | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.policy is None


@dataclass(frozen=True, slots=True)
class BundleChanged:
    kind: ClassVar[str] = "bundle"
    key: str  # the trust domain name
    bundle: BundleRecord | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.bundle is None


@dataclass(frozen=True, slots=True)
class CaChanged:
    kind: ClassVar[str] = "ca"
    key: str  # always "journal"
    journal: bytes | None  # opaque (encrypted by the CA module)
    revision: int

    @property
    def deleted(self) -> bool:
        return self.journal is None


@dataclass(frozen=True, slots=True)
class FederationChanged:
    kind: ClassVar[str] = "federation"
    key: str  # the partner trust domain name
    federation: FederationRecord | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.federation is None


@dataclass(frozen=True, slots=True)
class PartnerChanged:
    kind: ClassVar[str] = "partner"
    key: str  # the certificate serial, lower-case hex
    certificate: PartnerCertificate | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.certificate is None


@dataclass(frozen=True, slots=True)
class AuditAppended:
    kind: ClassVar[str] = "audit"
    key: str  # the event's sequence number, decimal
    event: AuditEvent | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.event is None


@dataclass(frozen=True, slots=True)
class AccessChanged:
    kind: ClassVar[str] = "access"
    key: str  # the grant id
    grant: AccessGrant | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.grant is None


@dataclass(frozen=True, slots=True)
class QuarantineChanged:
    kind: ClassVar[str] = "quarantine"
    key: str  # sha256 (hex) of the target: what the store key holds
    quarantine: Quarantine | None
    revision: int

    @property
    def deleted(self) -> bool:
        return self.quarantine is None


Change = (EntryChanged | NodeChanged | TokenChanged | PolicyChanged | BundleChanged | CaChanged
          | FederationChanged | PartnerChanged | AuditAppended | AccessChanged | QuarantineChanged)
