"""``Store``: the one typed storage interface of the control plane, over any KV backend.

Everything that must change together changes in one backend transaction: an entry and
its uniqueness index key, a consumed join token and the node it attests, a policy
revision and the policy head, an audit event and the audit head. A failed precondition
writes nothing and surfaces as NotFoundError, AlreadyExistsError or ConflictError.

Key layout (below the backend's own namespace)::

    entries/<id>                    RegistrationEntry
    entry-index/<sha256>            entry id; sha256 of (spiffe_id, parent_id, selectors)
    nodes/<spiffe id>               AttestedNode
    tokens/<token hash>             JoinToken
    policy/revisions/<20 digits>    PolicyRevision
    policy/head                     latest policy revision number, decimal
    bundles/<trust domain>          BundleRecord
    ca/journal                      opaque CA state (encrypted by the CA module)
    audit/events/<20 digits>        AuditEvent
    audit/head                      the latest AuditEvent (a copy, for the chain CAS)
    quarantine/<sha256 of target>   Quarantine (a SPIFFE ID is no key-safe text; its hash is)
    meta/sealed                     present once every record carries a MAC (sealing.py)

Every record kind but the audit log (chained with its own HMAC) and the CA journal (sealed
with AES-GCM by the CA) is stored with a MAC once the server calls ``seal_records``.

Reading a consistent picture and following it: take ``current_revision()``, list what
you need, then ``watch(that revision)``. Changes made between the two reads are replayed
by the watch; applying a change twice is harmless because each carries the full record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import replace
from types import TracebackType
from typing import Protocol, TypeVar

from trustmesh.controlplane.store.kv import (
    Compare,
    Delete,
    DeletePrefix,
    Event,
    EventType,
    Get,
    KeyValue,
    KVBackend,
    Op,
    Put,
    StoreMember,
    TxnResult,
)
from trustmesh.controlplane.store.records import (
    AccessChanged,
    AccessGrant,
    AttestedNode,
    AuditAppended,
    AuditEvent,
    BundleChanged,
    BundleRecord,
    CaChanged,
    Change,
    EntryChanged,
    FederationChanged,
    FederationRecord,
    FlowRow,
    FlowShard,
    JoinToken,
    NodeChanged,
    OperatorRecord,
    OwnershipRecord,
    PartnerCertificate,
    PartnerChanged,
    PolicyChanged,
    PolicyRevision,
    Quarantine,
    QuarantineChanged,
    RecordFormatError,
    RegistrationEntry,
    TokenChanged,
)
from trustmesh.controlplane.store.sealing import (
    FailureHook,
    IntegrityFailure,
    RecordIntegrityError,
    RecordSealer,
    SealingKV,
    split,
)
from trustmesh.errors import AlreadyExistsError, ConflictError, NotFoundError, StoreError
from trustmesh.spiffeid import SpiffeId, TrustDomain

ENTRIES = "entries/"
ENTRY_INDEX = "entry-index/"
NODES = "nodes/"
TOKENS = "tokens/"
POLICY_REVISIONS = "policy/revisions/"
POLICY_HEAD = "policy/head"
BUNDLES = "bundles/"
CA_JOURNAL = "ca/journal"
AUDIT_EVENTS = "audit/events/"
AUDIT_HEAD = "audit/head"
LEADER = "leader/"
FEDERATION = "federation/"
PARTNER_CERTS = "partner-certs/"
OPERATORS = "operators/"
ACCESS = "access/"
QUARANTINE = "quarantine/"
POLICY_OWNERS = "policy-owners"
FLOWS = "flows/"
FLOW_DAYS = "flows-day/"
FLOW_WEEKS = "flows-week/"
# Each level of flow rollups: its key prefix and the digits of its period numbers.
FLOW_LEVELS = {"hour": (FLOWS, 10), "day": (FLOW_DAYS, 7), "week": (FLOW_WEEKS, 6)}
HOURS_PER = {"hour": 1, "day": 24, "week": 24 * 7}
SEAL_MARKER = "meta/sealed"

# Every key that carries a MAC, and its record kind (the HKDF label of its MAC key).
SEALED_KINDS: tuple[tuple[str, str], ...] = (
    (ENTRIES, "entry"),
    (ENTRY_INDEX, "entry-index"),
    (NODES, "node"),
    (TOKENS, "join-token"),
    (POLICY_REVISIONS, "policy-revision"),
    (POLICY_HEAD, "policy-head"),
    (BUNDLES, "bundle"),
    (FEDERATION, "federation"),
    (PARTNER_CERTS, "partner-certificate"),
    (OPERATORS, "operator"),
    (ACCESS, "access-grant"),
    (QUARANTINE, "quarantine"),
    (POLICY_OWNERS, "policy-owners"),
    (FLOWS, "flow-rollup"),
    (FLOW_DAYS, "flow-rollup"),
    (FLOW_WEEKS, "flow-rollup"),
    (SEAL_MARKER, "meta"),
)

# etcd refuses transactions of more than --max-txn-ops operations (128 by default).
_MAX_TXN_OPS = 100
_MAX_TXN_BYTES = 1_000_000  # and requests of more than --max-request-bytes (1.5 MiB by default)

# Writes without an expected revision retry this often when another writer slips in
# between our read and our transaction, then give up with ConflictError.
_RETRIES = 5

R = TypeVar("R")


class InvalidRecordError(StoreError):
    """A record cannot be stored as given (e.g. an empty key); fix the caller."""


def _numbered(prefix: str, n: int) -> str:
    # Zero-padded so that key order (bytes) is numeric order.
    return f"{prefix}{n:020d}"


def entry_identity_key(entry: RegistrationEntry) -> str:
    """The uniqueness index key: one entry per (spiffe_id, parent_id, selector set)."""
    # Text, sorted as text: the key must stay what earlier versions wrote.
    identity = json.dumps(
        [str(entry.spiffe_id), str(entry.parent_id), sorted({str(s) for s in entry.selectors})],
        separators=(",", ":"),
    )
    return ENTRY_INDEX + hashlib.sha256(identity.encode()).hexdigest()


def quarantine_key(target: str) -> str:
    """The key suffix of a target's quarantine: one quarantine per SPIFFE ID."""
    return hashlib.sha256(target.encode()).hexdigest()


def _check_revision(what: str, current: int, expected: int | None) -> None:
    """Compare-and-swap from the caller's side: it read `expected`; a newer write wins."""
    if expected is not None and current != expected:
        raise ConflictError(f"{what} is at revision {current}, not {expected}; re-read it and retry")


def _need(value: str, what: str) -> str:
    if not value:
        raise InvalidRecordError(f"{what} must not be empty")
    return value


class ReplayCheck(Protocol):
    """Checks records whose older versions must not come back (controlplane/replay.py)."""

    def observe(self, event: AuditEvent) -> None: ...
    def node(self, key: str, node: AttestedNode) -> AttestedNode: ...
    def partner(self, key: str, cert: PartnerCertificate) -> PartnerCertificate: ...
    def policy_head(self, key: str, revision: int) -> int: ...


class _CountingKV:
    """A KVBackend that reports each request it passes on (for the store-load metric: an
    idle fleet of agents must cost the store nothing)."""

    def __init__(self, kv: KVBackend) -> None:
        self.inner = kv
        self.observe: Callable[[str], None] = lambda _op: None

    async def get(self, key: str) -> KeyValue | None:
        self.observe("get")
        return await self.inner.get(key)

    async def range(self, prefix: str, *, limit: int | None = None,
                    start_after: str | None = None) -> list[KeyValue]:
        self.observe("range")
        return await self.inner.range(prefix, limit=limit, start_after=start_after)

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()) -> TxnResult:
        self.observe("txn")
        return await self.inner.txn(compares, success, failure)

    async def current_revision(self) -> int:
        self.observe("revision")
        return await self.inner.current_revision()

    def watch(self, prefix: str, start_revision: int) -> AsyncGenerator[list[Event], None]:
        self.observe("watch")
        return self.inner.watch(prefix, start_revision)

    async def compact(self, revision: int) -> None:
        self.observe("compact")
        await self.inner.compact(revision)

    async def lease_grant(self, ttl: int) -> int:
        self.observe("lease")
        return await self.inner.lease_grant(ttl)

    async def lease_keepalive(self, lease: int) -> int:
        self.observe("lease")
        return await self.inner.lease_keepalive(lease)

    async def lease_revoke(self, lease: int) -> None:
        self.observe("lease")
        await self.inner.lease_revoke(lease)

    async def members(self) -> list[StoreMember]:
        self.observe("members")
        return await self.inner.members()

    async def close(self) -> None:
        await self.inner.close()


class Store:
    """Typed records over a KVBackend; the same code runs on SQLite and on etcd."""

    def __init__(self, kv: KVBackend) -> None:
        self._raw = kv
        self._counting = _CountingKV(kv)
        self._kv: KVBackend = self._counting
        self._sealer: RecordSealer | None = None
        self.replay: ReplayCheck | None = None

    # -- record integrity ------------------------------------------------------------

    async def seal_records(self, derive: Callable[[str], bytes], on_failure: FailureHook, *,
                           may_upgrade: Callable[[], Awaitable[bool]],
                           on_sealed: Callable[[int], Awaitable[None]] | None = None) -> int | None:
        """From now on, seal every record written and check every record read.

        A store without the seal marker was written by a version without MACs: its records
        are sealed here, once, if ``may_upgrade()`` agrees (the server asks the audit chain
        whether this store was sealed before, so deleting the marker cannot launder rows
        written without the KEK; a deleted marker is reported and written again).
        ``on_sealed(count)`` runs after the records are sealed and before the marker is
        written (the server audits there), so a crash in between never leaves a marker
        without its audit event. Returns how many records were sealed, None when none were.
        """
        sealer = RecordSealer(derive, SEALED_KINDS)
        sealed: int | None = None
        if await self._raw.get(SEAL_MARKER) is None:
            if await may_upgrade():
                sealed = 0
                for kv in await self._sealed_records():
                    if split(kv.value)[1] is not None:
                        continue
                    # Guarded by the revision read: a record that changed meanwhile was written by
                    # a sealing writer already.
                    result = await self._raw.txn([Compare.mod_revision(kv.key, kv.mod_revision)],
                                                 [Put(kv.key, sealer.seal(kv.key, kv.value))])
                    sealed += int(result.succeeded)
                if on_sealed is not None:
                    await on_sealed(sealed)
            else:
                await on_failure(IntegrityFailure("meta", SEAL_MARKER, "the seal marker was deleted"))
            await self._raw.txn([Compare.absent(SEAL_MARKER)], [Put(SEAL_MARKER, sealer.seal(SEAL_MARKER, b"1"))])
        self._sealer = sealer
        self._counting.inner = SealingKV(self._raw, sealer, on_failure)
        return sealed

    async def _sealed_records(self) -> list[KeyValue]:
        """Every stored record of a sealed kind, as stored (MAC trailer and all)."""
        out: list[KeyValue] = []
        for prefix, _kind in SEALED_KINDS:
            if prefix.endswith("/"):
                out += await self._raw.range(prefix)
            elif (kv := await self._raw.get(prefix)) is not None:
                out.append(kv)
        return out

    async def check_records(self) -> tuple[int, list[IntegrityFailure]]:
        """(records checked, the ones that fail their MAC), for `audit verify`."""
        if self._sealer is None:
            return 0, []
        records = await self._sealed_records()
        failures = []
        for kv in records:
            try:
                self._sealer.open(kv.key, kv.value)
            except RecordIntegrityError as err:
                failures.append(err.failure)
        return len(records), failures

    def observe(self, callback: Callable[[str], None]) -> None:
        """Call `callback(operation)` for every request sent to the backend."""
        self._counting.observe = callback

    async def close(self) -> None:
        await self._kv.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- small helpers ---------------------------------------------------------------

    async def _create(self, key: str, value: bytes, what: str) -> int:
        result = await self._kv.txn([Compare.absent(key)], [Put(key, value)])
        if not result.succeeded:
            raise AlreadyExistsError(f"{what} already exists")
        return result.revision

    async def _get(self, key: str, what: str) -> KeyValue:
        kv = await self._kv.get(key)
        if kv is None:
            raise NotFoundError(f"{what} does not exist")
        return kv

    async def _replace(
        self, key: str, value: bytes, expected_revision: int | None, what: str
    ) -> int:
        """Overwrite an existing key, optionally only at ``expected_revision``."""
        guard = (
            Compare.exists(key)
            if expected_revision is None
            else Compare.mod_revision(key, expected_revision)
        )
        result = await self._kv.txn([guard], [Put(key, value)], [Get(key)])
        if result.succeeded:
            return result.revision
        current = result.responses[0].kv
        if current is None:
            raise NotFoundError(f"{what} does not exist")
        raise ConflictError(
            f"{what} changed (now at revision {current.mod_revision}, expected "
            f"{expected_revision}); re-read it and retry"
        )

    async def _delete(self, key: str, what: str) -> None:
        result = await self._kv.txn([Compare.exists(key)], [Delete(key)])
        if not result.succeeded:
            raise NotFoundError(f"{what} does not exist")

    async def _list(self, prefix: str, decode: Callable[[KeyValue], R]) -> list[R]:
        return [decode(kv) for kv in await self._kv.range(prefix)]

    # -- registration entries --------------------------------------------------------

    @staticmethod
    def _entry(kv: KeyValue) -> RegistrationEntry:
        return RegistrationEntry.from_json(kv.value, revision=kv.mod_revision)

    async def create_entry(self, entry: RegistrationEntry) -> RegistrationEntry:
        key = ENTRIES + _need(entry.id, "entry id")
        index = entry_identity_key(entry)
        result = await self._kv.txn(
            [Compare.absent(key), Compare.absent(index)],
            [Put(key, entry.to_json()), Put(index, entry.id.encode())],
            [Get(key), Get(index)],
        )
        if result.succeeded:
            return replace(entry, revision=result.revision)
        if result.responses[0].kv is not None:
            raise AlreadyExistsError(f"registration entry {entry.id!r} already exists")
        holder = result.responses[1].kv
        other = holder.value.decode() if holder is not None else "?"
        raise AlreadyExistsError(
            f"entry {other!r} already registers {entry.spiffe_id} under {entry.parent_id} "
            "with the same selectors; update that entry instead"
        )

    async def get_entry(self, entry_id: str) -> RegistrationEntry:
        return self._entry(await self._get(ENTRIES + entry_id, f"registration entry {entry_id!r}"))

    async def list_entries(self, parent_id: SpiffeId | str | None = None) -> list[RegistrationEntry]:
        """Every entry, or those under ``parent_id`` (as text, any text: no match, no error)."""
        entries = await self._list(ENTRIES, self._entry)
        if parent_id is None:
            return entries
        parent = str(parent_id)
        return [e for e in entries if str(e.parent_id) == parent]

    async def update_entry(
        self, entry: RegistrationEntry, *, expected_revision: int | None = None
    ) -> RegistrationEntry:
        key = ENTRIES + _need(entry.id, "entry id")
        what = f"registration entry {entry.id!r}"
        new_index = entry_identity_key(entry)
        for _ in range(_RETRIES):
            current = await self._get(key, what)
            _check_revision(what, current.mod_revision, expected_revision)
            old_index = entry_identity_key(self._entry(current))
            compares = [Compare.mod_revision(key, current.mod_revision)]
            ops: list[Op] = [Put(key, entry.to_json())]
            if new_index != old_index:
                # Move the uniqueness claim in the same transaction as the entry.
                compares.append(Compare.absent(new_index))
                ops += [Delete(old_index), Put(new_index, entry.id.encode())]
            result = await self._kv.txn(compares, ops, [Get(key), Get(new_index)])
            if result.succeeded:
                return replace(entry, revision=result.revision)
            now, holder = result.responses[0].kv, result.responses[1].kv
            if now is None:
                raise NotFoundError(f"{what} does not exist")
            if holder is not None and holder.value != entry.id.encode():
                raise AlreadyExistsError(
                    f"entry {holder.value.decode()!r} already registers {entry.spiffe_id} "
                    f"under {entry.parent_id} with the same selectors"
                )
            if expected_revision is not None:
                raise ConflictError(
                    f"{what} changed (now at revision {now.mod_revision}); re-read it and retry"
                )
        raise ConflictError(f"{what} kept changing under concurrent writers; retry later")

    async def delete_entry(self, entry_id: str, *, expected_revision: int | None = None) -> None:
        key = ENTRIES + entry_id
        what = f"registration entry {entry_id!r}"
        for _ in range(_RETRIES):
            current = await self._get(key, what)
            _check_revision(what, current.mod_revision, expected_revision)
            index = entry_identity_key(self._entry(current))
            result = await self._kv.txn(
                [Compare.mod_revision(key, current.mod_revision)], [Delete(key), Delete(index)]
            )
            if result.succeeded:
                return
        raise ConflictError(f"{what} kept changing under concurrent writers; retry later")

    # -- attested nodes --------------------------------------------------------------

    def _node(self, kv: KeyValue) -> AttestedNode:
        node = AttestedNode.from_json(kv.value, revision=kv.mod_revision)
        return node if self.replay is None else self.replay.node(kv.key, node)

    def _partner(self, kv: KeyValue) -> PartnerCertificate:
        cert = PartnerCertificate.from_json(kv.value)
        return cert if self.replay is None else self.replay.partner(kv.key, cert)

    async def create_attested_node(self, node: AttestedNode) -> AttestedNode:
        key = NODES + str(node.spiffe_id)
        revision = await self._create(key, node.to_json(), f"attested node {node.spiffe_id}")
        return replace(node, revision=revision)

    async def get_attested_node(self, spiffe_id: SpiffeId | str) -> AttestedNode:
        return self._node(await self._get(NODES + str(spiffe_id), f"attested node {spiffe_id}"))

    async def list_attested_nodes(self) -> list[AttestedNode]:
        return await self._list(NODES, self._node)

    async def update_attested_node(
        self, node: AttestedNode, *, expected_revision: int | None = None
    ) -> AttestedNode:
        revision = await self._replace(
            NODES + str(node.spiffe_id),
            node.to_json(),
            expected_revision,
            f"attested node {node.spiffe_id}",
        )
        return replace(node, revision=revision)

    async def delete_attested_node(self, spiffe_id: SpiffeId | str) -> None:
        await self._delete(NODES + str(spiffe_id), f"attested node {spiffe_id}")

    # -- join tokens -----------------------------------------------------------------

    async def create_join_token(self, token: JoinToken) -> None:
        key = TOKENS + _need(token.token_hash, "join token hash")
        await self._create(key, token.to_json(), "a join token with that hash")

    async def get_join_token(self, token_hash: str) -> JoinToken:
        kv = await self._get(TOKENS + token_hash, "join token (unknown or already used)")
        return JoinToken.from_json(kv.value)

    async def list_join_tokens(self) -> list[JoinToken]:
        return await self._list(TOKENS, lambda kv: JoinToken.from_json(kv.value))

    async def delete_join_token(self, token_hash: str) -> None:
        await self._delete(TOKENS + token_hash, "join token")

    async def consume_join_token_and_attest(self, token_hash: str, node: AttestedNode) -> None:
        """Spend a join token and record the node it attests, both or neither.

        The token is single-use: of two agents racing with one token, exactly one wins.
        Expiry is the caller's rule (it owns the clock); read the token first to check it.
        """
        token_key = TOKENS + token_hash
        node_key = NODES + str(node.spiffe_id)
        result = await self._kv.txn(
            [Compare.exists(token_key), Compare.absent(node_key)],
            [Delete(token_key), Put(node_key, node.to_json())],
            [Get(token_key)],
        )
        if result.succeeded:
            return
        if result.responses[0].kv is None:
            raise NotFoundError(
                "join token is unknown or already used; create a new one with "
                "`trustmesh token create --node <name>`"
            )
        raise AlreadyExistsError(
            f"node {node.spiffe_id} is already attested; the join token was not used"
        )

    async def delete_expired_join_tokens(self, now: float) -> int:
        deleted = 0
        for kv in await self._kv.range(TOKENS):
            if JoinToken.from_json(kv.value).expires_at > now:
                continue
            # Delete exactly the token we judged expired; a token consumed meanwhile is
            # simply gone already.
            result = await self._kv.txn(
                [Compare.mod_revision(kv.key, kv.mod_revision)], [Delete(kv.key)]
            )
            deleted += int(result.succeeded)
        return deleted

    async def delete_expired_nodes(self, expired_before: float) -> list[str]:
        """Forget agents whose SVID expired before ``expired_before`` (they cannot renew
        and must attest again anyway). Banned nodes stay: the ban must outlive the SVID."""
        deleted: list[str] = []
        for kv in await self._kv.range(NODES):
            node = self._node(kv)
            if node.banned or node.cert_not_after >= expired_before:
                continue
            # Guarded by the revision we judged: a node that renewed meanwhile stays.
            result = await self._kv.txn([Compare.mod_revision(kv.key, kv.mod_revision)], [Delete(kv.key)])
            if result.succeeded:
                deleted.append(str(node.spiffe_id))
        return deleted

    # -- policy revisions ------------------------------------------------------------

    async def append_policy_revision(
        self,
        documents: str,
        author: str,
        comment: str,
        created_at: float,
        *,
        expected_head: int,
    ) -> PolicyRevision:
        if expected_head < 0:
            raise InvalidRecordError(f"expected policy head {expected_head} is negative")
        record = PolicyRevision(
            revision=expected_head + 1,
            documents=documents,
            author=author,
            comment=comment,
            created_at=created_at,
            sha256=hashlib.sha256(documents.encode()).hexdigest(),
        )
        head_is_expected = (
            Compare.absent(POLICY_HEAD)
            if expected_head == 0
            else Compare.value(POLICY_HEAD, str(expected_head).encode())
        )
        key = _numbered(POLICY_REVISIONS, record.revision)
        result = await self._kv.txn(
            [head_is_expected, Compare.absent(key)],
            [Put(key, record.to_json()), Put(POLICY_HEAD, str(record.revision).encode())],
            [Get(POLICY_HEAD)],
        )
        if not result.succeeded:
            head = result.responses[0].kv
            actual = int(head.value) if head is not None else 0
            raise ConflictError(
                f"policy head is at revision {actual}, not {expected_head}: someone else "
                "applied first; re-read the head, check the diff and apply again"
            )
        return record

    async def get_policy_revision(self, revision: int) -> PolicyRevision:
        kv = await self._get(
            _numbered(POLICY_REVISIONS, revision), f"policy revision {revision}"
        )
        return PolicyRevision.from_json(kv.value)

    async def get_policy_head(self) -> PolicyRevision | None:
        head = await self._kv.get(POLICY_HEAD)
        if head is None:
            return None
        # Revisions are immutable and the head only moves forward, so reading the
        # revision after the head (not in one snapshot) is still consistent.
        revision = int(head.value)
        if self.replay is not None:
            revision = self.replay.policy_head(POLICY_HEAD, revision)
        return await self.get_policy_revision(revision)

    async def list_policy_revisions(self) -> list[PolicyRevision]:
        return await self._list(POLICY_REVISIONS, lambda kv: PolicyRevision.from_json(kv.value))

    # -- trust bundles ---------------------------------------------------------------

    async def put_bundle(
        self, record: BundleRecord, *, expected_sequence: int | None = None
    ) -> BundleRecord:
        """Store a bundle; with ``expected_sequence`` only over that sequence (0 = absent)."""
        key = BUNDLES + record.trust_domain.name
        if expected_sequence is None:
            await self._kv.txn([], [Put(key, record.to_json())])
            return record
        current = await self._kv.get(key)
        actual = BundleRecord.from_json(current.value).sequence if current is not None else 0
        guard = (
            Compare.absent(key)
            if current is None
            else Compare.mod_revision(key, current.mod_revision)
        )
        if actual == expected_sequence:
            result = await self._kv.txn([guard], [Put(key, record.to_json())])
            if result.succeeded:
                return record
        raise ConflictError(
            f"bundle of {record.trust_domain} is not at sequence {expected_sequence} "
            f"(it was at {actual} and may have moved since); re-read it and retry"
        )

    async def get_bundle(self, trust_domain: TrustDomain | str) -> BundleRecord:
        kv = await self._get(BUNDLES + str(trust_domain), f"bundle of {trust_domain}")
        return BundleRecord.from_json(kv.value)

    async def list_bundles(self) -> list[BundleRecord]:
        return await self._list(BUNDLES, lambda kv: BundleRecord.from_json(kv.value))

    async def delete_bundle(self, trust_domain: TrustDomain | str) -> None:
        await self._delete(BUNDLES + str(trust_domain), f"bundle of {trust_domain}")

    # -- federation relationships ----------------------------------------------------

    async def create_federation(self, record: FederationRecord, bundle: BundleRecord | None) -> None:
        """A new relationship, with its initial bundle if given, in one transaction."""
        key = FEDERATION + record.trust_domain.name
        ops: list[Op] = [Put(key, record.to_json())]
        guards = [Compare.absent(key)]
        if bundle is not None:
            ops.append(Put(BUNDLES + record.trust_domain.name, bundle.to_json()))
        result = await self._kv.txn(guards, ops)
        if not result.succeeded:
            raise AlreadyExistsError(
                f"a federation relationship with {record.trust_domain} already exists; "
                f"remove it first (`trustmesh federation remove {record.trust_domain}`)")

    async def get_federation(self, trust_domain: str) -> FederationRecord:
        kv = await self._get(FEDERATION + _need(trust_domain, "trust domain"),
                             f"federation relationship with {trust_domain}")
        return FederationRecord.from_json(kv.value, kv.mod_revision)

    async def list_federations(self) -> list[FederationRecord]:
        return await self._list(FEDERATION, lambda kv: FederationRecord.from_json(kv.value, kv.mod_revision))

    async def update_federation(self, record: FederationRecord, bundle: BundleRecord | None = None) -> bool:
        """Save the refresh outcome (and a new bundle) over exactly the record read;
        False when the relationship changed or was removed meanwhile (nothing written)."""
        key = FEDERATION + record.trust_domain.name
        ops: list[Op] = [Put(key, record.to_json())]
        if bundle is not None:
            ops.append(Put(BUNDLES + record.trust_domain.name, bundle.to_json()))
        result = await self._kv.txn([Compare.mod_revision(key, record.revision)], ops)
        return result.succeeded

    async def delete_federation(self, trust_domain: str) -> None:
        """Remove the relationship and the partner's bundle together."""
        key = FEDERATION + _need(trust_domain, "trust domain")
        result = await self._kv.txn([Compare.exists(key)], [Delete(key), Delete(BUNDLES + trust_domain)])
        if not result.succeeded:
            raise NotFoundError(f"no federation relationship with {trust_domain}; "
                                "`trustmesh federation list` shows them")

    # -- operators -------------------------------------------------------------------

    @staticmethod
    def _operator(kv: KeyValue) -> OperatorRecord:
        return OperatorRecord.from_json(kv.value, revision=kv.mod_revision)

    async def create_operator(self, record: OperatorRecord) -> OperatorRecord:
        rev = await self._create(OPERATORS + _need(record.name, "operator name"), record.to_json(),
                                 f"operator {record.name}")
        return replace(record, revision=rev)

    async def get_operator(self, name: str) -> OperatorRecord:
        return self._operator(await self._get(OPERATORS + _need(name, "operator name"), f"operator {name}"))

    async def list_operators(self) -> list[OperatorRecord]:
        return await self._list(OPERATORS, self._operator)

    async def replace_operator(self, record: OperatorRecord) -> OperatorRecord:
        """Write `record` over the stored one, only if that is still at `record.revision`."""
        rev = await self._replace(OPERATORS + record.name, record.to_json(), record.revision,
                                  f"operator {record.name}")
        return replace(record, revision=rev)

    async def delete_operator(self, name: str) -> None:
        await self._delete(OPERATORS + _need(name, "operator name"), f"operator {name}")

    # -- flow rollups ---------------------------------------------------------------
    #
    # Three levels, each a key range in time order (zero-padded period numbers): hours, per
    # replica, as each replica writes them; days and weeks, merged over every replica, as the
    # leader compacts older hours and days into them (controlplane/flow_store.py).

    @staticmethod
    def _flow_key(level: str, period: int, replica: str, shard: int) -> str:
        prefix, digits = FLOW_LEVELS[level]
        return f"{prefix}{period:0{digits}d}/{_need(replica, 'replica id')}/{shard:03d}"

    async def put_flow_shards(self, shards: Sequence[FlowShard], level: str = "hour") -> None:
        """Write these rollups (each replaces what was stored for its period, replica and
        shard), in as few transactions as etcd allows."""
        batch: list[Op] = []
        size = 0
        for shard in shards:
            put = Put(self._flow_key(level, shard.hour, shard.replica, shard.shard), shard.to_json())
            # etcd caps a transaction's operations (--max-txn-ops) and bytes (--max-request-bytes).
            if batch and (len(batch) >= _MAX_TXN_OPS or size + len(put.value) > _MAX_TXN_BYTES):
                await self._kv.txn([], batch)
                batch, size = [], 0
            batch.append(put)
            size += len(put.value)
        if batch:
            await self._kv.txn([], batch)

    async def list_flow_shards(self, since_hour: int = 0) -> list[FlowShard]:
        """Every replica's hourly rollups from `since_hour` on (unreadable ones left out)."""
        shards = []
        for kv in await self._flow_range("hour", since_hour):
            try:
                shards.append(FlowShard.from_json(kv.value))
            except RecordFormatError:
                continue  # telemetry: one bad record must not hide the rest
        return [s for s in shards if s.hour >= since_hour]

    async def list_flow_rows(self, since_hour: int = 0) -> list[tuple[str, int, str, list[FlowRow]]]:
        """(level, period, replica, rows) of every stored rollup that may hold flows from
        `since_hour` on: the weeks and days that contain or follow it, and its hours."""
        out = []
        for level, first in (("week", since_hour // HOURS_PER["week"]), ("day", since_hour // HOURS_PER["day"]),
                             ("hour", since_hour)):
            for kv in await self._flow_range(level, first):
                try:
                    period, replica, rows = FlowShard.rows_from_json(kv.value)
                except RecordFormatError:
                    continue
                if period >= first:
                    out.append((level, period, replica, rows))
        return out

    async def flow_rows_of(self, level: str, period: int) -> list[tuple[str, list[FlowRow]]]:
        """(replica, rows) of one period's rollups at one level."""
        prefix, digits = FLOW_LEVELS[level]
        out = []
        for kv in await self._kv.range(f"{prefix}{period:0{digits}d}/"):
            try:
                _, replica, rows = FlowShard.rows_from_json(kv.value)
            except RecordFormatError:
                continue
            out.append((replica, rows))
        return out

    async def _flow_range(self, level: str, first: int) -> list[KeyValue]:
        prefix, digits = FLOW_LEVELS[level]
        start = f"{prefix}{first - 1:0{digits}d}/~" if first > 0 else None
        return await self._kv.range(prefix, start_after=start)

    async def oldest_flow_period(self, level: str = "hour") -> int | None:
        """The oldest period stored at this level (one key read)."""
        prefix, digits = FLOW_LEVELS[level]
        first = await self._kv.range(prefix, limit=1)
        text = first[0].key[len(prefix):len(prefix) + digits] if first else ""
        return int(text) if text.isdigit() else None

    async def delete_flow_periods(self, level: str, start: int, end: int) -> None:
        """Delete the rollups of the periods in [start, end) at this level, without reading them."""
        prefix, digits = FLOW_LEVELS[level]
        periods = list(range(start, end))
        for i in range(0, len(periods), _MAX_TXN_OPS):  # etcd caps the operations of one transaction
            await self._kv.txn([], [DeletePrefix(f"{prefix}{p:0{digits}d}/") for p in periods[i:i + _MAX_TXN_OPS]])

    # -- policy ownership -----------------------------------------------------------

    async def get_policy_owners(self) -> OwnershipRecord | None:
        kv = await self._kv.get(POLICY_OWNERS)
        return None if kv is None else OwnershipRecord.from_json(kv.value, revision=kv.mod_revision)

    async def put_policy_owners(self, record: OwnershipRecord, expected_revision: int) -> OwnershipRecord:
        """Store the ownership file, only if the stored one is still at `expected_revision`
        (0: only if there is none yet)."""
        if expected_revision:
            rev = await self._replace(POLICY_OWNERS, record.to_json(), expected_revision, "policy ownership")
        else:
            rev = await self._create(POLICY_OWNERS, record.to_json(), "policy ownership")
        return replace(record, revision=rev)

    # -- just-in-time access --------------------------------------------------------

    @staticmethod
    def _access(kv: KeyValue) -> AccessGrant:
        return AccessGrant.from_json(kv.value, revision=kv.mod_revision)

    async def create_access_grant(self, grant: AccessGrant) -> AccessGrant:
        rev = await self._create(ACCESS + _need(grant.id, "access request id"), grant.to_json(),
                                 f"access request {grant.id}")
        return replace(grant, revision=rev)

    async def get_access_grant(self, grant_id: str) -> AccessGrant:
        return self._access(await self._get(ACCESS + _need(grant_id, "access request id"),
                                            f"access request {grant_id}"))

    async def list_access_grants(self) -> list[AccessGrant]:
        return await self._list(ACCESS, self._access)

    async def replace_access_grant(self, grant: AccessGrant) -> AccessGrant:
        """Write `grant` over the stored one, only if that is still at `grant.revision`."""
        rev = await self._replace(ACCESS + grant.id, grant.to_json(), grant.revision, f"access request {grant.id}")
        return replace(grant, revision=rev)

    async def delete_access_grant(self, grant_id: str) -> None:
        await self._delete(ACCESS + _need(grant_id, "access request id"), f"access request {grant_id}")

    # -- quarantine ------------------------------------------------------------------

    @staticmethod
    def _quarantine(kv: KeyValue) -> Quarantine:
        return Quarantine.from_json(kv.value, revision=kv.mod_revision)

    async def create_quarantine(self, quarantine: Quarantine) -> Quarantine:
        """Store a quarantine; AlreadyExistsError when its target is in quarantine already."""
        key = QUARANTINE + quarantine_key(_need(quarantine.target, "quarantine target"))
        rev = await self._create(key, quarantine.to_json(), f"a quarantine of {quarantine.target}")
        return replace(quarantine, revision=rev)

    async def get_quarantine(self, target: str) -> Quarantine:
        return self._quarantine(await self._get(QUARANTINE + quarantine_key(_need(target, "quarantine target")),
                                                f"a quarantine of {target}"))

    async def list_quarantines(self) -> list[Quarantine]:
        return await self._list(QUARANTINE, self._quarantine)

    async def delete_quarantine(self, target: str) -> None:
        await self._delete(QUARANTINE + quarantine_key(_need(target, "quarantine target")),
                           f"a quarantine of {target}")

    # -- partner certificates --------------------------------------------------------

    async def create_partner_certificate(self, cert: PartnerCertificate) -> None:
        await self._create(PARTNER_CERTS + _need(cert.serial, "serial"), cert.to_json(),
                           f"partner certificate {cert.serial}")

    async def get_partner_certificate(self, serial: str) -> tuple[PartnerCertificate, int]:
        kv = await self._get(PARTNER_CERTS + _need(serial, "serial"), f"partner certificate {serial}")
        return self._partner(kv), kv.mod_revision

    async def list_partner_certificates(self) -> list[PartnerCertificate]:
        return await self._list(PARTNER_CERTS, self._partner)

    async def replace_partner_certificate(self, cert: PartnerCertificate, revision: int) -> None:
        key = PARTNER_CERTS + cert.serial
        result = await self._kv.txn([Compare.mod_revision(key, revision)], [Put(key, cert.to_json())])
        if not result.succeeded:
            raise ConflictError(f"partner certificate {cert.serial} changed meanwhile; retry")

    async def delete_expired_partner_certificates(self, now: float) -> int:
        """Forget partner certificates (revoked or not) that have expired: a revocation
        need not be remembered once the certificate could not be accepted anyway."""
        deleted = 0
        for kv in await self._kv.range(PARTNER_CERTS):
            if PartnerCertificate.from_json(kv.value).not_after > now:
                continue
            result = await self._kv.txn([Compare.mod_revision(kv.key, kv.mod_revision)], [Delete(kv.key)])
            deleted += int(result.succeeded)
        return deleted

    # -- CA journal ------------------------------------------------------------------

    async def load_ca_state(self) -> tuple[bytes | None, int]:
        """(data, version); version 0 means nothing was ever saved."""
        kv = await self._kv.get(CA_JOURNAL)
        return (None, 0) if kv is None else (kv.value, kv.version)

    async def save_ca_state(self, data: bytes, expected_version: int) -> int:
        """Save over exactly ``expected_version``; returns the new version."""
        result = await self._kv.txn(
            [Compare.version(CA_JOURNAL, expected_version)],
            [Put(CA_JOURNAL, data)],
            [Get(CA_JOURNAL)],
        )
        if not result.succeeded:
            current = result.responses[0].kv
            actual = current.version if current is not None else 0
            raise ConflictError(
                f"CA state is at version {actual}, not {expected_version}: another server "
                "saved first; reload the CA state and redo the transition"
            )
        return expected_version + 1

    # -- audit log -------------------------------------------------------------------

    @staticmethod
    def audit_event_key(seq: int) -> str:
        return _numbered(AUDIT_EVENTS, seq)

    async def append_audit_event(self, event: AuditEvent) -> AuditEvent:
        """Append the next link of the chain, or ConflictError if it is not the next.

        The head moves in the same transaction as the event, so several servers append
        to one chain: a loser recomputes its event on the new head and retries. With an
        empty log the first event must have seq 1 (its prev_hash is the caller's genesis).
        """
        head_kv = await self._kv.get(AUDIT_HEAD)
        if head_kv is None:
            if event.seq != 1:
                raise ConflictError(
                    f"audit log is empty: the first event must have seq 1, not {event.seq}"
                )
            guard = Compare.absent(AUDIT_HEAD)
        else:
            head = AuditEvent.from_json(head_kv.value)
            if event.seq != head.seq + 1 or event.prev_hash != head.hash:
                raise ConflictError(
                    f"audit head is seq {head.seq}; event seq {event.seq} must be "
                    f"{head.seq + 1} and chain to its hash; recompute on the head and retry"
                )
            guard = Compare.mod_revision(AUDIT_HEAD, head_kv.mod_revision)
        key = self.audit_event_key(event.seq)
        data = event.to_json()
        result = await self._kv.txn(
            [guard, Compare.absent(key)], [Put(key, data), Put(AUDIT_HEAD, data)]
        )
        if not result.succeeded:
            raise ConflictError(
                f"another writer appended audit event {event.seq} first; "
                "recompute on the new head and retry"
            )
        if self.replay is not None:
            self.replay.observe(event)
        return event

    async def get_audit_head(self) -> AuditEvent | None:
        kv = await self._kv.get(AUDIT_HEAD)
        return None if kv is None else AuditEvent.from_json(kv.value)

    async def get_audit_event(self, seq: int) -> AuditEvent:
        kv = await self._get(self.audit_event_key(seq), f"audit event {seq}")
        return AuditEvent.from_json(kv.value)

    async def list_audit_events(
        self, since_seq: int = 0, limit: int | None = None
    ) -> list[AuditEvent]:
        """Events with seq > ``since_seq``, in order, at most ``limit`` of them."""
        kvs = await self._kv.range(
            AUDIT_EVENTS,
            limit=limit,
            start_after=self.audit_event_key(since_seq) if since_seq > 0 else None,
        )
        return [AuditEvent.from_json(kv.value) for kv in kvs]

    # -- leases and leader election ----------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        """A lease of ``ttl`` seconds; keys put under it vanish when it ends."""
        return await self._kv.lease_grant(ttl)

    async def lease_keepalive(self, lease: int) -> int:
        """Seconds the lease has left after this renewal; 0 if it already ended."""
        return await self._kv.lease_keepalive(lease)

    async def lease_revoke(self, lease: int) -> None:
        await self._kv.lease_revoke(lease)

    async def get_leader(self, name: str) -> str | None:
        kv = await self._kv.get(LEADER + _need(name, "leader name"))
        return None if kv is None else kv.value.decode(errors="replace")

    async def try_become_leader(self, name: str, holder: str, lease: int) -> bool:
        """Create the leader key under ``lease`` if nobody holds it; True if we now do."""
        key = LEADER + _need(name, "leader name")
        result = await self._kv.txn([Compare.absent(key)], [Put(key, holder.encode(), lease=lease)])
        return result.succeeded

    async def members(self) -> list[StoreMember]:
        """The store's members and whether each answers (`trustmesh check`, /readyz)."""
        return await self._kv.members()

    # -- raw access (tests and repair tools only) ------------------------------------

    async def raw_get(self, key: str) -> bytes | None:
        """The stored bytes under ``key`` (e.g. ``Store.audit_event_key(3)``), MAC and all."""
        kv = await self._raw.get(key)
        return None if kv is None else kv.value

    async def raw_put(self, key: str, value: bytes) -> int:
        """Overwrite ``key`` with exactly ``value``, bypassing every invariant and the MAC:
        for tamper tests and repairs only."""
        return (await self._raw.txn([], [Put(key, value)])).revision

    # -- change feed -----------------------------------------------------------------

    async def current_revision(self) -> int:
        return await self._kv.current_revision()

    async def compact(self, revision: int) -> None:
        """Forget change history before ``revision`` (watches from older ones fail)."""
        await self._kv.compact(revision)

    async def watch(self, start_revision: int) -> AsyncGenerator[list[Change], None]:
        """Typed changes strictly after ``start_revision``, one batch per revision.

        Raises CompactedError when that history is gone: re-read, then watch again.
        """
        async for events in self._kv.watch("", start_revision):
            changes = [c for c in (self._decode_change(e) for e in events) if c is not None]
            if changes:
                yield changes

    def _decode_change(self, event: Event) -> Change | None:
        key, rev = event.key, event.mod_revision
        value = None if event.type is EventType.DELETE else event.value
        if key.startswith(ENTRIES):
            entry = None if value is None else RegistrationEntry.from_json(value, revision=rev)
            return EntryChanged(key[len(ENTRIES):], entry, rev)
        if key.startswith(NODES):
            node = None if value is None else self._node(KeyValue(key, value, 0, rev, 0))
            return NodeChanged(key[len(NODES):], node, rev)
        if key.startswith(TOKENS):
            return TokenChanged(key[len(TOKENS):], None if value is None else JoinToken.from_json(value), rev)
        if key.startswith(POLICY_REVISIONS):
            policy = None if value is None else PolicyRevision.from_json(value)
            return PolicyChanged(str(int(key[len(POLICY_REVISIONS):])), policy, rev)
        if key.startswith(BUNDLES):
            return BundleChanged(key[len(BUNDLES):], None if value is None else BundleRecord.from_json(value), rev)
        if key == CA_JOURNAL:
            return CaChanged("journal", None if value is None else bytes(value), rev)
        if key.startswith(FEDERATION):
            federation = None if value is None else FederationRecord.from_json(value, revision=rev)
            return FederationChanged(key[len(FEDERATION):], federation, rev)
        if key.startswith(PARTNER_CERTS):
            cert = None if value is None else self._partner(KeyValue(key, value, 0, rev, 0))
            return PartnerChanged(key[len(PARTNER_CERTS):], cert, rev)
        if key.startswith(ACCESS):
            grant = None if value is None else AccessGrant.from_json(value, revision=rev)
            return AccessChanged(key[len(ACCESS):], grant, rev)
        if key.startswith(QUARANTINE):
            quarantine = None if value is None else Quarantine.from_json(value, revision=rev)
            return QuarantineChanged(key[len(QUARANTINE):], quarantine, rev)
        if key.startswith(AUDIT_EVENTS):
            event_ = None if value is None else AuditEvent.from_json(value)
            if event_ is not None and self.replay is not None:
                self.replay.observe(event_)  # another replica's event: its facts count here too
            return AuditAppended(str(int(key[len(AUDIT_EVENTS):])), event_, rev)
        # Index keys and heads move with the records above; they are not changes of their own.
        return None
