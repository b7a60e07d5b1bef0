"""Registration: entries, join tokens and attested agents (transport-free).

Every input is validated here before anything is written, every change and refusal is
audited, and each write is one store transaction, so nothing is half-written.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import timedelta

from trustmesh.errors import AlreadyExistsError, InvalidSpiffeIdError, NotFoundError, TrustmeshError
from trustmesh.naming import agent_id, is_reserved, node_name_of, server_dns_name, server_id
from trustmesh.selectors import InvalidSelectorError, parse_selectors
from trustmesh.spiffeid import SpiffeId, TrustDomain

from controlplane.api.status import FailedPreconditionError, InvalidArgumentError
from controlplane.config import MAX_JWT_TTL, MAX_X509_TTL, MIN_JWT_TTL, MIN_X509_TTL
from controlplane.runtime import ServerRuntime
from controlplane.store.records import AttestedNode, JoinToken, RegistrationEntry

NODE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
MIN_TOKEN_TTL = timedelta(minutes=1)
MAX_TOKEN_TTL = timedelta(days=7)
DEFAULT_TOKEN_TTL = timedelta(minutes=10)
MAX_SELECTORS = 32
TOKEN_PREFIX = "tmjt_"
MAX_LIST_ITEMS = 32


def token_hash(token: str) -> str:
    """Join tokens are stored only as this hash; the token itself is shown once."""
    return hashlib.sha256(token.encode()).hexdigest()


def check_node_name(name: str) -> str:
    if not NODE_NAME.match(name or ""):
        raise InvalidArgumentError(
            f"invalid node name {name!r}: use 1 to 128 letters, digits, '.', '_' or '-' (e.g. node-1)"
        )
    return name


def check_dns_name(name: str, td: TrustDomain) -> str:
    if not name or len(name) > 253 or not all(DNS_LABEL.match(label) for label in name.rstrip(".").split(".")):
        raise InvalidArgumentError(f"invalid DNS name {name!r}: use labels of letters, digits and '-', e.g. ledger.internal")
    if name.lower().rstrip(".") == server_dns_name(td):
        raise InvalidArgumentError(f"DNS name {name!r} is reserved for the trustmesh server and cannot be registered")
    return name.lower().rstrip(".")


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


def validate_entry(spec: EntrySpec, td: TrustDomain) -> EntrySpec:
    """Return the canonical form of `spec`, or raise InvalidArgumentError saying what to fix."""
    try:
        sid = SpiffeId.parse(spec.spiffe_id)
    except InvalidSpiffeIdError as err:
        raise InvalidArgumentError(f"--spiffe-id: {err}") from err
    if sid.trust_domain != td:
        raise InvalidArgumentError(
            f"--spiffe-id {sid} is in trust domain {sid.trust_domain}, not this server's {td}; "
            "entries can only name IDs of the server's own trust domain"
        )
    if sid.is_trust_domain_id:
        raise InvalidArgumentError(f"--spiffe-id {sid} has no path; name a workload, e.g. spiffe://{td}/ledger")
    if is_reserved(sid):
        raise InvalidArgumentError(f"--spiffe-id {sid} is reserved for trustmesh agents and servers")
    try:
        parent = SpiffeId.parse(spec.parent_id)
    except InvalidSpiffeIdError as err:
        raise InvalidArgumentError(f"--parent-id: {err}") from err
    if parent.trust_domain != td:
        raise InvalidArgumentError(f"--parent-id {parent} is not in trust domain {td}")
    if parent == sid:
        raise InvalidArgumentError("an entry cannot be its own parent")
    if parent != server_id(td) and node_name_of(parent) is None and is_reserved(parent):
        raise InvalidArgumentError(f"--parent-id {parent} is reserved; use an agent ID (--node NAME) or a node alias")
    if not spec.selectors:
        raise InvalidArgumentError("at least one --selector is required, e.g. --selector unix:uid:1000")
    if len(spec.selectors) > MAX_SELECTORS:
        raise InvalidArgumentError(f"at most {MAX_SELECTORS} selectors per entry")
    try:
        selectors = tuple(str(s) for s in parse_selectors(spec.selectors))
    except InvalidSelectorError as err:
        raise InvalidArgumentError(str(err)) from err
    if len(spec.dns_names) > MAX_LIST_ITEMS or len(spec.federates_with) > MAX_LIST_ITEMS:
        raise InvalidArgumentError(f"at most {MAX_LIST_ITEMS} DNS names and {MAX_LIST_ITEMS} federated trust domains")
    dns = tuple(dict.fromkeys(check_dns_name(d, td) for d in spec.dns_names))
    federated = []
    for text in spec.federates_with:
        try:
            other = TrustDomain.parse(text)
        except InvalidSpiffeIdError as err:
            raise InvalidArgumentError(f"--federates-with: {err}") from err
        if other == td:
            raise InvalidArgumentError(f"--federates-with {other} is this server's own trust domain")
        federated.append(other.name)
    return EntrySpec(
        spiffe_id=str(sid), parent_id=str(parent), selectors=selectors,
        x509_ttl=_ttl(spec.x509_ttl, MIN_X509_TTL, MAX_X509_TTL, "--x509-ttl"),
        jwt_ttl=_ttl(spec.jwt_ttl, MIN_JWT_TTL, MAX_JWT_TTL, "--jwt-ttl"),
        dns_names=dns, federates_with=tuple(sorted(set(federated))), admin=spec.admin,
    )


class Registry:
    """Admin operations over the store, each validated, atomic and audited."""

    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt
        self._td = rt.config.trust_domain

    async def _audit(self, kind: str, actor: str, subject: str, outcome: str = "ok", **details: object) -> None:
        await self._rt.audit.record(kind, actor=actor, subject=subject, outcome=outcome, **details)

    async def _refused(self, kind: str, actor: str, subject: str, err: TrustmeshError) -> None:
        await self._audit(kind, actor, subject, outcome="denied", reason=str(err))

    # --- entries ------------------------------------------------------------------------

    async def create_entry(self, spec: EntrySpec, actor: str) -> RegistrationEntry:
        try:
            clean = validate_entry(spec, self._td)
            now = self._rt.clock()
            entry = RegistrationEntry(
                id=uuid.uuid4().hex, spiffe_id=clean.spiffe_id, parent_id=clean.parent_id,
                selectors=tuple(clean.selectors), x509_ttl=clean.x509_ttl, jwt_ttl=clean.jwt_ttl,
                dns_names=tuple(clean.dns_names), federates_with=tuple(clean.federates_with),
                admin=clean.admin, created_at=now, updated_at=now,
            )
            created = await self._rt.store.create_entry(entry)
        except (InvalidArgumentError, AlreadyExistsError) as err:
            await self._refused("entry.create", actor, spec.spiffe_id, err)
            raise
        await self._audit("entry.create", actor, created.spiffe_id, entry_id=created.id, parent_id=created.parent_id,
                          selectors=list(created.selectors))
        return created

    async def update_entry(self, entry_id: str, spec: EntrySpec, actor: str,
                           expected_revision: int | None) -> RegistrationEntry:
        try:
            current = await self._rt.store.get_entry(entry_id)
            clean = validate_entry(spec, self._td)
            updated = replace(
                current, spiffe_id=clean.spiffe_id, parent_id=clean.parent_id, selectors=tuple(clean.selectors),
                x509_ttl=clean.x509_ttl, jwt_ttl=clean.jwt_ttl, dns_names=tuple(clean.dns_names),
                federates_with=tuple(clean.federates_with), admin=clean.admin, updated_at=self._rt.clock(),
            )
            result = await self._rt.store.update_entry(updated, expected_revision=expected_revision or None)
        except TrustmeshError as err:
            await self._refused("entry.update", actor, entry_id, err)
            raise
        await self._audit("entry.update", actor, result.spiffe_id, entry_id=entry_id)
        return result

    async def delete_entry(self, entry_id: str, actor: str) -> RegistrationEntry:
        try:
            entry = await self._rt.store.get_entry(entry_id)
            await self._rt.store.delete_entry(entry_id)
        except NotFoundError as err:
            await self._refused("entry.delete", actor, entry_id, err)
            raise
        await self._audit("entry.delete", actor, entry.spiffe_id, entry_id=entry_id)
        return entry

    # --- join tokens --------------------------------------------------------------------

    async def create_join_token(self, node_name: str, ttl: timedelta, actor: str) -> tuple[str, JoinToken]:
        try:
            check_node_name(node_name)
            if not MIN_TOKEN_TTL <= ttl <= MAX_TOKEN_TTL:
                raise InvalidArgumentError(
                    f"--ttl {int(ttl.total_seconds())}s is out of range: use 1m to 7d (default 10m)")
            agent = agent_id(self._td, node_name)
            node = await self._find_node(str(agent))
            if node is not None and node.banned:
                raise FailedPreconditionError(f"node {node_name} is banned; a banned node cannot join again")
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
        now = self._rt.clock()
        record = JoinToken(token_hash=token_hash(token), node_name=node_name,
                           expires_at=now + ttl.total_seconds(), created_at=now)
        await self._rt.store.create_join_token(record)
        await self._audit("token.create", actor, str(agent), node_name=node_name, expires_at=record.expires_at)
        return token, record

    # --- agents ---------------------------------------------------------------------------

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
        return str(agent_id(self._td, check_node_name(text)))

    async def _find_node(self, spiffe_id: str) -> AttestedNode | None:
        try:
            return await self._rt.store.get_attested_node(spiffe_id)
        except NotFoundError:
            return None

    async def _require_node(self, agent: str, kind: str, actor: str) -> AttestedNode:
        node = await self._find_node(agent)
        if node is None:
            err = NotFoundError(f"no attested agent {agent}; see `trustmesh agent list`")
            await self._refused(kind, actor, agent, err)
            raise err
        return node

    async def ban_agent(self, text: str, actor: str) -> AttestedNode:
        agent = self.resolve_agent(text)
        node = await self._require_node(agent, "agent.ban", actor)
        banned = await self._rt.store.update_attested_node(
            replace(node, banned=True, updated_at=self._rt.clock()), expected_revision=node.revision or None)
        await self._audit("agent.ban", actor, agent)
        return banned

    async def evict_agent(self, text: str, actor: str) -> AttestedNode:
        agent = self.resolve_agent(text)
        node = await self._require_node(agent, "agent.evict", actor)
        if node.banned:
            err = FailedPreconditionError(f"agent {agent} is banned; a banned agent stays on record so it cannot rejoin")
            await self._refused("agent.evict", actor, agent, err)
            raise err
        await self._rt.store.delete_attested_node(agent)
        await self._audit("agent.evict", actor, agent)
        return node
