"""Registration: entries, join tokens and attested agents (transport-free).

Every input is validated here before anything is written, every change and refusal is
audited, and each write is one store transaction, so nothing is half-written. The checks
are pure functions (`validate_entry`, `check_*`); `Registry` drives them against the store.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol

from trustmesh.clip import SHOWN, clip, shown
from trustmesh.controlplane.config import MAX_JWT_TTL, MAX_X509_TTL, MIN_JWT_TTL, MIN_X509_TTL
from trustmesh.controlplane.store.records import AttestedNode as AttestedNode  # re-exported: the API's values
from trustmesh.controlplane.store.records import JoinToken, label_pairs
from trustmesh.controlplane.store.records import NodeStatus as NodeStatus  # likewise
from trustmesh.controlplane.store.records import RegistrationEntry as RegistrationEntry  # likewise
from trustmesh.dnsname import InvalidDnsNameError, dns_name_covers, normalize_dns_name
from trustmesh.errors import (
    AlreadyExistsError,
    ConflictError,
    FailedPreconditionError,
    InvalidArgumentError,
    InvalidSpiffeIdError,
    NotFoundError,
    TrustmeshError,
)
from trustmesh.labels import LabelError, check_key, check_labels, parse_assignments
from trustmesh.naming import agent_id, is_reserved, node_name_of, server_dns_name, server_id
from trustmesh.selectors import InvalidSelectorError, Selector, parse_selectors
from trustmesh.spiffeid import SpiffeId, TrustDomain

# \Z, not $: "$" also matches before a final newline, and "node-1\n" is no node name.
NODE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
# Entry ids are ours (uuid4 hex), but the store keys records by them, so an id from a
# request is held to a plain shape: no '/' to wander into other key ranges, no megabytes.
ENTRY_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}\Z")
MIN_TOKEN_TTL = timedelta(minutes=1)
MAX_TOKEN_TTL = timedelta(days=7)
DEFAULT_TOKEN_TTL = timedelta(minutes=10)
MAX_SELECTORS = 32
TOKEN_PREFIX = "tmjt_"
MAX_LIST_ITEMS = 32
# The longest selector the kernel accepts is unix:path with a 4096-byte path.
MAX_SELECTOR_LEN = 4200
# The most entries one ListEntries page holds (also the default page size).
MAX_PAGE = 1000


def token_hash(token: str) -> str:
    """Join tokens are stored only as this hash; the token itself is shown once."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_node_name(name: str) -> str:
    """The rule of the join_token:node selector, so every node name can be selected on."""
    if not NODE_NAME.match(name or ""):
        raise InvalidArgumentError(
            f"invalid node name {shown(name)}: use 1 to 128 letters, digits, '.', '_' or '-' (e.g. node-1)"
        )
    return name


def check_entry_id(entry_id: str) -> str:
    if not entry_id:
        raise InvalidArgumentError("an entry id is required; see `trustmesh entry list`")
    if not ENTRY_ID.match(entry_id):
        raise InvalidArgumentError(
            f"invalid entry id {shown(entry_id)}: entry ids are letters, digits, '.', '_' or '-'; "
            "see `trustmesh entry list`"
        )
    return entry_id


def check_dns_name(name: str, td: TrustDomain) -> str:
    """A DNS SAN by the kernel's one rule (`trustmesh.dnsname`), in its canonical form."""
    try:
        canonical = normalize_dns_name(name)
    except InvalidDnsNameError as err:
        raise InvalidArgumentError(str(err)) from err
    # A wildcard covering the server's name would let a workload pose as the server.
    if dns_name_covers(canonical, server_dns_name(td)):
        raise InvalidArgumentError(
            f"DNS name {shown(name)} is reserved for the trustmesh server and cannot be registered")
    return canonical


def check_token_ttl(seconds: int) -> timedelta:
    """A join token's lifetime; 0 means the default (10m). Checked on the integer, before a
    timedelta is built, so absurd values are refused rather than overflowing."""
    if seconds == 0:
        return DEFAULT_TOKEN_TTL
    if not MIN_TOKEN_TTL.total_seconds() <= seconds <= MAX_TOKEN_TTL.total_seconds():
        raise InvalidArgumentError(f"--ttl {seconds}s is out of range for a join token: use 1m to 7d (default 10m)")
    return timedelta(seconds=seconds)


def _ttl(seconds: int, low: timedelta, high: timedelta, what: str) -> int:
    if seconds == 0:
        return 0  # 0 means "the server's default"
    if seconds < 0 or not low.total_seconds() <= seconds <= high.total_seconds():
        raise InvalidArgumentError(
            f"{what} {seconds}s is out of range: use 0 for the server default, or "
            f"{int(low.total_seconds())}s to {int(high.total_seconds())}s"
        )
    return seconds


@dataclass(frozen=True)
class EntrySpec:
    """What an admin asks for; validated into a RegistrationEntry by `validate_entry`."""

    spiffe_id: str
    parent_id: str
    selectors: Sequence[str]
    x509_ttl: int = 0
    jwt_ttl: int = 0
    dns_names: Sequence[str] = ()
    federates_with: Sequence[str] = ()
    admin: bool = False
    # key=value labels a node must all carry (`--node-selector`), instead of one parent node.
    node_selector: Sequence[str] = ()


@dataclass(frozen=True)
class CheckedEntry:
    """An EntrySpec after `check_entry`: canonical and typed, ready to become a record."""

    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]  # de-duplicated and sorted
    x509_ttl: int
    jwt_ttl: int
    dns_names: tuple[str, ...]
    federates_with: tuple[TrustDomain, ...]  # de-duplicated and sorted by name
    admin: bool
    node_selector: tuple[tuple[str, str], ...] = ()  # sorted pairs; empty = by parent

    def as_spec(self) -> EntrySpec:
        return EntrySpec(
            spiffe_id=str(self.spiffe_id), parent_id=str(self.parent_id),
            selectors=tuple(str(s) for s in self.selectors), x509_ttl=self.x509_ttl, jwt_ttl=self.jwt_ttl,
            dns_names=self.dns_names, federates_with=tuple(td.name for td in self.federates_with),
            admin=self.admin, node_selector=tuple(f"{k}={v}" for k, v in self.node_selector),
        )


def node_selector_parent(td: TrustDomain) -> SpiffeId:
    """The parent every node-selector entry has: no agent's, and not an alias (reserved)."""
    return SpiffeId.from_parts(td, "trustmesh", "node-selector")


def validate_entry(spec: EntrySpec, td: TrustDomain) -> EntrySpec:
    """Return the canonical form of `spec`, or raise InvalidArgumentError saying what to fix."""
    return check_entry(spec, td).as_spec()


def spiffe_id_arg(text: str, flag: str) -> SpiffeId:
    """The SPIFFE ID a person gave with `flag`, or INVALID_ARGUMENT naming the flag and the fault."""
    try:
        return SpiffeId.parse(text)
    except InvalidSpiffeIdError as err:
        raise InvalidArgumentError(f"{flag}: {err}") from err


def check_entry(spec: EntrySpec, td: TrustDomain) -> CheckedEntry:
    """The canonical, typed form of `spec`, or InvalidArgumentError saying what to fix."""
    sid = spiffe_id_arg(spec.spiffe_id, "--spiffe-id")
    if sid.trust_domain != td:
        raise InvalidArgumentError(
            f"--spiffe-id {sid} is in trust domain {sid.trust_domain}, not this server's {td}; "
            "entries can only name IDs of the server's own trust domain"
        )
    if sid.is_trust_domain_id:
        raise InvalidArgumentError(f"--spiffe-id {sid} has no path; name a workload, e.g. spiffe://{td}/ledger")
    if is_reserved(sid):
        raise InvalidArgumentError(f"--spiffe-id {sid} is reserved for trustmesh agents, servers and operators")
    node_selector: tuple[tuple[str, str], ...] = ()
    if spec.node_selector:
        if len(spec.node_selector) > MAX_SELECTORS:
            raise InvalidArgumentError(f"at most {MAX_SELECTORS} --node-selector labels per entry")
        try:
            node_selector = label_pairs(parse_assignments(spec.node_selector, allow_reserved=True))
        except LabelError as err:
            raise InvalidArgumentError(f"--node-selector: {err}") from err
        if spec.parent_id and spec.parent_id != str(node_selector_parent(td)):
            raise InvalidArgumentError("give either --node (or --parent-id) or --node-selector, not both")
        spec = replace(spec, parent_id=str(node_selector_parent(td)))
    elif spec.parent_id == str(node_selector_parent(td)):
        raise InvalidArgumentError(f"--parent-id {spec.parent_id} is only for entries with a --node-selector")
    parent = spiffe_id_arg(spec.parent_id, "--parent-id")
    if parent.trust_domain != td:
        raise InvalidArgumentError(f"--parent-id {parent} is not in trust domain {td}")
    if parent == sid:
        raise InvalidArgumentError("an entry cannot be its own parent")
    if parent.is_trust_domain_id:
        raise InvalidArgumentError(
            f"--parent-id {parent} has no path; use an agent ID (--node NAME) or a node alias")
    if parent not in (server_id(td), node_selector_parent(td)) and node_name_of(parent) is None and is_reserved(parent):
        raise InvalidArgumentError(f"--parent-id {parent} is reserved; use an agent ID (--node NAME) or a node alias")
    if not spec.selectors:
        raise InvalidArgumentError("at least one --selector is required, e.g. --selector unix:uid:1000")
    if len(spec.selectors) > MAX_SELECTORS:
        raise InvalidArgumentError(f"at most {MAX_SELECTORS} selectors per entry")
    for text in spec.selectors:
        if len(text) > MAX_SELECTOR_LEN:
            raise InvalidArgumentError(
                f"selector {shown(text)} is longer than {MAX_SELECTOR_LEN} characters")
    try:
        selectors = parse_selectors(spec.selectors)
    except InvalidSelectorError as err:
        raise InvalidArgumentError(str(err)) from err
    if len(spec.dns_names) > MAX_LIST_ITEMS or len(spec.federates_with) > MAX_LIST_ITEMS:
        raise InvalidArgumentError(f"at most {MAX_LIST_ITEMS} DNS names and {MAX_LIST_ITEMS} federated trust domains")
    dns = tuple(dict.fromkeys(check_dns_name(d, td) for d in spec.dns_names))
    federated: set[TrustDomain] = set()
    for text in spec.federates_with:
        try:
            other = TrustDomain.parse(text)
        except InvalidSpiffeIdError as err:
            raise InvalidArgumentError(f"--federates-with: {err}") from err
        if other == td:
            raise InvalidArgumentError(f"--federates-with {other} is this server's own trust domain")
        federated.add(other)
    return CheckedEntry(
        spiffe_id=sid, parent_id=parent, selectors=selectors,
        x509_ttl=_ttl(spec.x509_ttl, MIN_X509_TTL, MAX_X509_TTL, "--x509-ttl"),
        jwt_ttl=_ttl(spec.jwt_ttl, MIN_JWT_TTL, MAX_JWT_TTL, "--jwt-ttl"),
        dns_names=dns, federates_with=tuple(sorted(federated)), admin=spec.admin, node_selector=node_selector,
    )


@dataclass(frozen=True)
class EntryQuery:
    """Entries of `parent_id` and `spiffe_id` ("" = any), ordered by id, `page_size` at a time
    (0 = the largest page), starting after the entry id `page_token` ("" = from the start)."""

    parent_id: str = ""
    spiffe_id: str = ""
    page_size: int = 0
    page_token: str = ""


@dataclass(frozen=True)
class EntryPage:
    entries: tuple[RegistrationEntry, ...]
    next_page_token: str  # "" on the last page


def page_entries(entries: Sequence[RegistrationEntry], query: EntryQuery) -> EntryPage:
    """One page of `entries` (already filtered by parent) as `query` asks (pure)."""
    if query.page_size < 0:
        raise InvalidArgumentError("page_size must not be negative")
    size = min(query.page_size or MAX_PAGE, MAX_PAGE)
    found = [e for e in entries if not query.spiffe_id or str(e.spiffe_id) == query.spiffe_id]
    found.sort(key=lambda e: e.id)
    if query.page_token:
        found = [e for e in found if e.id > query.page_token]
    page = found[:size]
    return EntryPage(tuple(page), page[-1].id if len(found) > size else "")


class RegistryStore(Protocol):
    """The part of the Store that registration needs."""

    async def create_entry(self, entry: RegistrationEntry) -> RegistrationEntry: ...
    async def get_entry(self, entry_id: str) -> RegistrationEntry: ...
    async def list_entries(self, parent_id: str | None = None) -> list[RegistrationEntry]: ...
    async def list_attested_nodes(self) -> list[AttestedNode]: ...
    async def update_entry(self, entry: RegistrationEntry, *,
                           expected_revision: int | None = None) -> RegistrationEntry: ...
    async def delete_entry(self, entry_id: str, *, expected_revision: int | None = None) -> None: ...
    async def create_join_token(self, token: JoinToken) -> None: ...
    async def get_attested_node(self, spiffe_id: str) -> AttestedNode: ...
    async def update_attested_node(self, node: AttestedNode, *,
                                   expected_revision: int | None = None) -> AttestedNode: ...
    async def delete_attested_node(self, spiffe_id: str) -> None: ...


class Auditor(Protocol):
    async def record(self, kind: str, *, actor: str, subject: str = "", outcome: str = "ok",
                     **details: Any) -> object: ...


# How often a ban is retried when the node record changes under it (an agent renewing its
# SVID rewrites the record); a ban must not fail because the agent happened to be busy.
_BAN_RETRIES = 5


class Registry:
    """Admin operations over the store, each validated, atomic and audited.

    `actor` names who asked (e.g. "admin:local-socket"); it goes into every audit event.
    """

    def __init__(self, td: TrustDomain, store: RegistryStore, audit: Auditor,
                 clock: Callable[[], float]) -> None:
        self._td = td
        self._store = store
        self._audit_log = audit
        self._clock = clock

    async def _audit(self, kind: str, actor: str, subject: str, outcome: str = "ok", **details: object) -> None:
        await self._audit_log.record(kind, actor=actor, subject=subject, outcome=outcome, **details)

    async def _refused(self, kind: str, actor: str, subject: str, err: TrustmeshError) -> None:
        # The subject is the caller's own words, which may be hostile: clip it.
        await self._audit(kind, actor, clip(subject, SHOWN), outcome="denied", reason=str(err))

    # --- entries ------------------------------------------------------------------------

    async def get_entry(self, entry_id: str) -> RegistrationEntry:
        return await self._store.get_entry(check_entry_id(entry_id))

    async def list_entries(self, query: EntryQuery) -> EntryPage:
        if query.page_size < 0:
            raise InvalidArgumentError("page_size must not be negative")
        return page_entries(await self._store.list_entries(parent_id=query.parent_id or None), query)

    async def create_entry(self, spec: EntrySpec, actor: str) -> RegistrationEntry:
        try:
            clean = check_entry(spec, self._td)
            now = self._clock()
            entry = RegistrationEntry(
                id=uuid.uuid4().hex, spiffe_id=clean.spiffe_id, parent_id=clean.parent_id,
                selectors=clean.selectors, x509_ttl=clean.x509_ttl, jwt_ttl=clean.jwt_ttl,
                dns_names=clean.dns_names, federates_with=clean.federates_with,
                admin=clean.admin, created_at=now, updated_at=now, node_selector=clean.node_selector,
            )
            # One transaction writes the entry and its uniqueness claim, or neither.
            created = await self._store.create_entry(entry)
        except (InvalidArgumentError, AlreadyExistsError) as err:
            await self._refused("entry.create", actor, spec.spiffe_id, err)
            raise
        await self._audit("entry.create", actor, str(created.spiffe_id), entry_id=created.id,
                          parent_id=str(created.parent_id), selectors=[str(s) for s in created.selectors],
                          admin=created.admin, **_selector_detail(created))
        return created

    async def update_entry(self, entry_id: str, spec: EntrySpec, actor: str,
                           expected_revision: int | None) -> RegistrationEntry:
        """Replace every field of the entry with `spec` (its id and creation time stay)."""
        try:
            check_entry_id(entry_id)
            current = await self._store.get_entry(entry_id)
            clean = check_entry(spec, self._td)
            updated = replace(
                current, spiffe_id=clean.spiffe_id, parent_id=clean.parent_id, selectors=clean.selectors,
                x509_ttl=clean.x509_ttl, jwt_ttl=clean.jwt_ttl, dns_names=clean.dns_names,
                federates_with=clean.federates_with, admin=clean.admin, updated_at=self._clock(),
                node_selector=clean.node_selector,
            )
            result = await self._store.update_entry(updated, expected_revision=expected_revision or None)
        except TrustmeshError as err:
            await self._refused("entry.update", actor, entry_id, err)
            raise
        await self._audit("entry.update", actor, str(result.spiffe_id), entry_id=entry_id,
                          parent_id=str(result.parent_id), selectors=[str(s) for s in result.selectors],
                          admin=result.admin, **_selector_detail(result))
        return result

    async def delete_entry(self, entry_id: str, actor: str, expected_revision: int | None = None) -> RegistrationEntry:
        try:
            check_entry_id(entry_id)
            entry = await self._store.get_entry(entry_id)
            await self._store.delete_entry(entry_id, expected_revision=expected_revision or None)
        except TrustmeshError as err:
            await self._refused("entry.delete", actor, entry_id, err)
            raise
        await self._audit("entry.delete", actor, str(entry.spiffe_id), entry_id=entry_id)
        return entry

    # --- join tokens --------------------------------------------------------------------

    async def create_join_token(self, node_name: str, ttl_seconds: int, actor: str) -> tuple[str, JoinToken]:
        """A new single-use token for `node_name`; 0 seconds means the default lifetime.

        Returns the token (shown once, never stored) and the stored record (its hash)."""
        try:
            check_node_name(node_name)
            ttl = check_token_ttl(ttl_seconds)
            agent = agent_id(self._td, node_name)
            node = await self._find_node(str(agent))
            if node is not None and node.banned:
                raise FailedPreconditionError(
                    f"node {node_name} is banned; a banned node name cannot join again (use another name)")
            if node is not None:
                raise FailedPreconditionError(
                    f"node {node_name} is already attested as {agent}; evict it first with "
                    f"`trustmesh agent evict {node_name}` if you are replacing that host")
        except TrustmeshError as err:
            await self._refused("token.create", actor, node_name, err)
            raise
        # 256 random bits behind a fixed prefix: a token never starts with "-" (which a
        # command line would take for an option), and secret scanners can recognise it.
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self._clock()
        record = JoinToken(token_hash=token_hash(token), node_name=node_name,
                           expires_at=now + ttl.total_seconds(), created_at=now)
        await self._store.create_join_token(record)
        # The audit event names the node and the expiry, never the token (nor its hash).
        await self._audit("token.create", actor, str(agent), node_name=node_name, expires_at=record.expires_at)
        return token, record

    # --- agents ---------------------------------------------------------------------------

    async def list_agents(self) -> list[AttestedNode]:
        return sorted(await self._store.list_attested_nodes(), key=lambda n: str(n.spiffe_id))

    def agent_id_of(self, node_name: str) -> str:
        return str(agent_id(self._td, check_node_name(node_name)))

    def resolve_agent(self, text: str) -> str:
        """Accept an agent SPIFFE ID or a bare node name."""
        if "://" in text:
            try:
                sid = SpiffeId.parse(text)
            except InvalidSpiffeIdError as err:
                raise InvalidArgumentError(str(err)) from err
            if sid.trust_domain != self._td or node_name_of(sid) is None:
                raise InvalidArgumentError(f"{sid} is not an agent ID of {self._td} (spiffe://{self._td}/agent/NODE)")
            return str(sid)
        return self.agent_id_of(text)

    async def _find_node(self, spiffe_id: str) -> AttestedNode | None:
        try:
            return await self._store.get_attested_node(spiffe_id)
        except NotFoundError:
            return None

    async def _require_node(self, agent: str) -> AttestedNode:
        node = await self._find_node(agent)
        if node is None:
            raise NotFoundError(f"no attested agent {agent}; see `trustmesh agent list`")
        return node

    async def ban_agent(self, text: str, actor: str) -> AttestedNode:
        """Mark the agent banned. The Node API sees the change on the store's feed, closes
        the agent's streams and refuses its calls; the record stays, so the node name can
        never attest again (a token for it is refused too)."""
        try:
            agent = self.resolve_agent(text)
            for _ in range(_BAN_RETRIES):
                node = await self._require_node(agent)
                if node.banned:
                    await self._audit("agent.ban", actor, agent, already_banned=True)
                    return node
                try:
                    banned = await self._store.update_attested_node(
                        replace(node, banned=True, updated_at=self._clock()), expected_revision=node.revision or None)
                except ConflictError:
                    continue  # the agent renewed meanwhile: ban the record as it is now
                break
            else:
                raise ConflictError(f"agent {agent} kept changing while being banned; run the ban again")
        except TrustmeshError as err:
            await self._refused("agent.ban", actor, text, err)
            raise
        await self._audit("agent.ban", actor, agent, node_name=banned.node_name)
        return banned

    async def evict_agent(self, text: str, actor: str) -> AttestedNode:
        """Forget the agent: its SVID stops working and the node may attest again with a new
        token. A banned agent is not evicted: its record is what keeps it out."""
        try:
            agent = self.resolve_agent(text)
            node = await self._require_node(agent)
            if node.banned:
                raise FailedPreconditionError(
                    f"agent {agent} is banned; a banned agent stays on record so that it cannot rejoin")
            await self._store.delete_attested_node(agent)
        except TrustmeshError as err:
            await self._refused("agent.evict", actor, text, err)
            raise
        # The serial lets the replay guard refuse this attestation if its record is put back.
        await self._audit("agent.evict", actor, agent, node_name=node.node_name, cert_serial=node.cert_serial)
        return node

    async def label_agent(self, text: str, set_labels: Mapping[str, str], remove: Sequence[str],
                          actor: str) -> tuple[AttestedNode, bool]:
        """Set and remove labels on an attested node; True when they changed. Node selectors
        see the change on the store's feed: an agent whose node lost a label is sent the
        withdrawal of the entries it no longer matches and cannot renew their SVIDs."""
        try:
            agent = self.resolve_agent(text)
            if not set_labels and not remove:
                raise InvalidArgumentError("give at least one key=value to set or one key to remove")
            try:
                wanted = check_labels(set_labels)
                gone = {check_key(k) for k in remove}
            except LabelError as err:
                raise InvalidArgumentError(str(err)) from err
            if both := sorted(gone & set(wanted)):
                raise InvalidArgumentError(f"label key {both[0]!r} is both set and removed; give it once")
            for _ in range(_BAN_RETRIES):
                node = await self._require_node(agent)
                old = dict(node.labels)
                new = {k: v for k, v in {**old, **wanted}.items() if k not in gone}
                if new == old:
                    await self._audit("agent.label", actor, agent, unchanged=True, labels=new)
                    return node, False
                try:
                    labelled = await self._store.update_attested_node(
                        replace(node, labels=label_pairs(new), updated_at=self._clock()),
                        expected_revision=node.revision or None)
                except ConflictError:
                    continue  # the agent renewed meanwhile: label the record as it is now
                break
            else:
                raise ConflictError(f"agent {agent} kept changing while being labelled; run the command again")
        except TrustmeshError as err:
            await self._refused("agent.label", actor, text, err)
            raise
        await self._audit("agent.label", actor, agent, node_name=labelled.node_name, old_labels=old, labels=new)
        return labelled, True

    async def clear_agent(self, text: str, actor: str) -> tuple[AttestedNode, bool]:
        """Clear a suspected-clone mark once the operator has checked the node (clones.py sets
        it); True when there was one. The agent was never cut off by the mark itself, so
        nothing else changes; a ban stays, whatever the mark."""
        try:
            agent = self.resolve_agent(text)
            for _ in range(_BAN_RETRIES):
                node = await self._require_node(agent)
                if node.status is NodeStatus.ACTIVE:
                    await self._audit("agent.clear", actor, agent, already_clear=True)
                    return node, False
                try:
                    cleared = await self._store.update_attested_node(
                        replace(node, status=NodeStatus.ACTIVE, status_reason="", status_at=self._clock(),
                                updated_at=self._clock()),
                        expected_revision=node.revision or None)
                except ConflictError:
                    continue  # renewed (or marked again) meanwhile: clear the record as it is now
                break
            else:
                raise ConflictError(f"agent {agent} kept changing while being cleared; run the clear again")
        except TrustmeshError as err:
            await self._refused("agent.clear", actor, text, err)
            raise
        await self._audit("agent.clear", actor, agent, node_name=cleared.node_name, previous_status=str(node.status),
                          previous_reason=node.status_reason)
        return cleared, True


def _selector_detail(entry: RegistrationEntry) -> dict[str, Any]:
    """The node selector for an entry's audit event, when it has one."""
    return {"node_selector": dict(entry.node_selector)} if entry.node_selector else {}
