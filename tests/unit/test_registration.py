"""Registration rules and the Registry over the real store (the CLI tests drive the same
rules end to end through the server process)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.clip import SHOWN as MAX_SHOWN
from trustmesh.controlplane.api.status import FailedPreconditionError, InvalidArgumentError
from trustmesh.controlplane.audit import AuditLog
from trustmesh.controlplane.config import MAX_JWT_TTL, MAX_X509_TTL
from trustmesh.controlplane.registration import (
    DEFAULT_TOKEN_TTL,
    MAX_PAGE,
    MAX_TOKEN_TTL,
    MIN_TOKEN_TTL,
    EntryQuery,
    EntrySpec,
    RegistrationEntry,
    Registry,
    check_dns_name,
    check_entry_id,
    check_node_name,
    check_token_ttl,
    page_entries,
    token_hash,
    validate_entry,
)
from trustmesh.controlplane.store import Store, open_store
from trustmesh.controlplane.store.records import AttestedNode, AuditEvent
from trustmesh.errors import AlreadyExistsError, ConflictError, NotFoundError
from trustmesh.spiffeid import SpiffeId, TrustDomain

TD = TrustDomain("example.org")
AGENT = "spiffe://example.org/agent/node-1"
ADMIN = "admin:local-socket"


def spec(**kw: object) -> EntrySpec:
    base: dict[str, object] = {"spiffe_id": "spiffe://example.org/ledger", "parent_id": AGENT,
                               "selectors": ["unix:uid:1000"]}
    base.update(kw)
    return EntrySpec(**base)  # type: ignore[arg-type]


# --- the pure rules ----------------------------------------------------------------------------


def test_canonical_form() -> None:
    clean = validate_entry(spec(selectors=["unix:uid:1", "unix:gid:2", "unix:uid:1"],
                                dns_names=["A.Example.", "a.example"],
                                federates_with=["spiffe://partner.example", "partner.example"]), TD)
    assert clean.selectors == ("unix:gid:2", "unix:uid:1")
    assert clean.dns_names == ("a.example",)
    assert clean.federates_with == ("partner.example",)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"spiffe_id": "not-an-id"}, "invalid SPIFFE ID"),
        ({"spiffe_id": "spiffe://example.org"}, "has no path"),
        ({"spiffe_id": "spiffe://other.org/x"}, "not this server's"),
        ({"spiffe_id": "spiffe://example.org/trustmesh/server"}, "reserved"),
        ({"spiffe_id": "spiffe://example.org/agent/node-2"}, "reserved"),
        ({"spiffe_id": "spiffe://example.org/agent"}, "reserved"),
        ({"parent_id": ""}, "--parent-id"),
        ({"parent_id": "spiffe://other.org/agent/n"}, "not in trust domain"),
        ({"parent_id": "spiffe://example.org/ledger"}, "own parent"),
        ({"parent_id": "spiffe://example.org"}, "has no path"),
        ({"parent_id": "spiffe://example.org/trustmesh/other"}, "reserved"),
        ({"parent_id": "spiffe://example.org/agent/a/b"}, "reserved"),
        ({"selectors": []}, "at least one"),
        ({"selectors": ["k8s:ns:default"]}, "unknown selector type"),
        ({"selectors": ["uid1000"]}, "TYPE:VALUE"),
        ({"selectors": ["unix:uid:x"]}, "decimal"),
        ({"selectors": [f"unix:uid:{i}" for i in range(40)]}, "at most"),
        ({"selectors": ["unix:path:/" + "x" * 10_000]}, "longer than"),
        ({"x509_ttl": -1}, "out of range"),
        ({"x509_ttl": 40 * 86400}, "out of range"),
        ({"x509_ttl": 2**62}, "out of range"),
        ({"jwt_ttl": 2 * 86400}, "out of range"),
        ({"dns_names": ["-bad.example"]}, "invalid DNS name"),
        ({"dns_names": ["a..example"]}, "invalid DNS name"),
        ({"dns_names": ["ledger.internal\n"]}, "invalid DNS name"),
        ({"dns_names": ["x" * 300]}, "invalid DNS name"),
        ({"dns_names": ["trustmesh-server.example.org"]}, "reserved"),
        ({"dns_names": ["Trustmesh-Server.Example.Org."]}, "reserved"),
        ({"dns_names": [f"d{i}.example" for i in range(40)]}, "at most"),
        ({"federates_with": ["Bad_TD!"]}, "federates-with"),
        ({"federates_with": ["example.org"]}, "own trust domain"),
    ],
)
def test_refusals(kw: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgumentError, match=message) as info:
        validate_entry(spec(**kw), TD)
    # Hostile input is quoted clipped: the message stays small enough for a gRPC status.
    assert len(str(info.value)) < 2048 + 300


@pytest.mark.parametrize("parent", [
    "spiffe://example.org/trustmesh/server",  # the server ID: a node alias for every node
    "spiffe://example.org/agent/node-7",
    "spiffe://example.org/aliases/rack-1",  # another ID of the trust domain used as an alias
])
def test_parents_that_are_allowed(parent: str) -> None:
    assert validate_entry(spec(parent_id=parent), TD).parent_id == parent


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_ttls_are_zero_or_within_bounds(seconds: int) -> None:
    low, high = 1, int(MAX_X509_TTL.total_seconds())
    try:
        clean = validate_entry(spec(x509_ttl=seconds), TD)
    except InvalidArgumentError as err:
        assert not (seconds == 0 or low <= seconds <= high)
        assert "out of range" in str(err)
    else:
        assert seconds == 0 or low <= seconds <= high
        assert clean.x509_ttl == seconds
    try:
        validate_entry(spec(jwt_ttl=seconds), TD)
    except InvalidArgumentError:
        assert not (seconds == 0 or 1 <= seconds <= MAX_JWT_TTL.total_seconds())


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_token_ttls(seconds: int) -> None:
    try:
        ttl = check_token_ttl(seconds)
    except InvalidArgumentError as err:
        assert "1m to 7d" in str(err)
        assert not MIN_TOKEN_TTL.total_seconds() <= seconds <= MAX_TOKEN_TTL.total_seconds()
    else:
        assert ttl == DEFAULT_TOKEN_TTL if seconds == 0 else ttl.total_seconds() == seconds


NODE_ALPHABET = "abcXYZ019._-"


@given(st.text(alphabet=NODE_ALPHABET, min_size=1, max_size=128))
def test_good_node_names_are_accepted(name: str) -> None:
    assert check_node_name(name) == name


@given(st.text(max_size=300))
def test_node_names_follow_the_selector_rule(name: str) -> None:
    good = 1 <= len(name) <= 128 and all(c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
                                         for c in name)
    try:
        check_node_name(name)
    except InvalidArgumentError as err:
        assert not good
        assert len(str(err)) < 10 * MAX_SHOWN + 120
    else:
        assert good


@pytest.mark.parametrize("name", ["node-1\n", "", "a b", "a/b", "x" * 129, "nöde"])
def test_bad_node_names(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="invalid node name"):
        check_node_name(name)


@given(st.text(max_size=300))
def test_dns_names_are_accepted_or_refused_cleanly(name: str) -> None:
    try:
        canonical = check_dns_name(name, TD)
    except InvalidArgumentError as err:
        assert len(str(err)) < 10 * MAX_SHOWN + 150  # repr may escape each character
    else:
        assert canonical == canonical.lower() and not canonical.endswith(".") and len(canonical) <= 253
        assert all(part and not part.startswith("-") and not part.endswith("-") for part in canonical.split("."))


@pytest.mark.parametrize("entry_id", ["", "../x", "a/b", "x" * 129, "id\n"])
def test_bad_entry_ids(entry_id: str) -> None:
    with pytest.raises(InvalidArgumentError):
        check_entry_id(entry_id)


def test_token_hash_is_sha256_hex() -> None:
    assert token_hash("x") == hashlib.sha256(b"x").hexdigest() and token_hash("x") != token_hash("y")


# --- the Registry over the real (SQLite) store -------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1_790_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_store("sqlite", tmp_path)
    yield s
    await s.close()


@pytest.fixture
def registry(store: Store) -> Registry:
    clock = Clock()
    return Registry(TD, store, AuditLog(store, b"k" * 32, clock=clock), clock)


async def _events(store: Store) -> list[AuditEvent]:
    return await store.list_audit_events()


async def _attested(store: Store, node: str = "node-1") -> AttestedNode:
    return await store.create_attested_node(AttestedNode(
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/agent/{node}"), node_name=node, attestation_type="join_token",
        cert_serial="01", cert_not_after=1_790_003_600.0, banned=False, created_at=1.0, updated_at=1.0))


async def test_create_audits_and_duplicates_name_the_existing_entry(registry: Registry, store: Store) -> None:
    created = await registry.create_entry(spec(selectors=["unix:uid:1", "unix:gid:2"]), ADMIN)
    assert len(created.id) == 32 and created.revision > 0
    with pytest.raises(AlreadyExistsError, match=created.id):
        await registry.create_entry(spec(selectors=["unix:gid:2", "unix:uid:1", "unix:uid:1"]), ADMIN)
    assert [e.id for e in await store.list_entries()] == [created.id]
    kinds = [(e.kind, e.outcome, e.actor) for e in await _events(store)]
    assert kinds == [("entry.create", "ok", ADMIN), ("entry.create", "denied", ADMIN)]


async def test_refusals_write_nothing_but_the_audit_event(registry: Registry, store: Store) -> None:
    hostile = "spiffe://example.org/" + "x" * 5000
    with pytest.raises(InvalidArgumentError):
        await registry.create_entry(spec(spiffe_id=hostile), ADMIN)
    assert await store.list_entries() == []
    [event] = await _events(store)
    assert event.outcome == "denied" and len(event.subject) <= MAX_SHOWN + 3
    assert "longer than 2048" in event.details["reason"]


async def test_update_and_delete_guard_revisions(registry: Registry, store: Store) -> None:
    entry = await registry.create_entry(spec(), ADMIN)
    updated = await registry.update_entry(entry.id, spec(x509_ttl=600), ADMIN, entry.revision)
    assert updated.x509_ttl == 600 and updated.created_at == entry.created_at
    with pytest.raises(ConflictError):
        await registry.update_entry(entry.id, spec(x509_ttl=60), ADMIN, entry.revision)
    with pytest.raises(ConflictError):
        await registry.delete_entry(entry.id, ADMIN, entry.revision)
    with pytest.raises(InvalidArgumentError):
        await registry.delete_entry("../../audit/head", ADMIN)
    await registry.delete_entry(entry.id, ADMIN, updated.revision)
    with pytest.raises(NotFoundError):
        await registry.delete_entry(entry.id, ADMIN)
    outcomes = [(e.kind, e.outcome) for e in await _events(store)]
    assert outcomes == [("entry.create", "ok"), ("entry.update", "ok"), ("entry.update", "denied"),
                        ("entry.delete", "denied"), ("entry.delete", "denied"), ("entry.delete", "ok"),
                        ("entry.delete", "denied")]


async def test_join_tokens_are_random_and_stored_only_hashed(registry: Registry, store: Store) -> None:
    token, record = await registry.create_join_token("node-1", 0, ADMIN)
    other, _ = await registry.create_join_token("node-1", 3600, ADMIN)
    assert token != other and token.startswith("tmjt_") and len(token) >= 5 + 43
    assert record.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert record.expires_at - record.created_at == DEFAULT_TOKEN_TTL.total_seconds()
    stored = await store.list_join_tokens()
    assert {t.token_hash for t in stored} == {token_hash(token), token_hash(other)}
    for event in await _events(store):
        assert token not in repr(event) and token_hash(token) not in repr(event)


async def test_no_token_for_an_attested_or_banned_node(registry: Registry, store: Store) -> None:
    await _attested(store)
    with pytest.raises(FailedPreconditionError, match="trustmesh agent evict node-1"):
        await registry.create_join_token("node-1", 0, ADMIN)
    await registry.ban_agent("node-1", ADMIN)
    with pytest.raises(FailedPreconditionError, match="banned"):
        await registry.create_join_token("node-1", 0, ADMIN)
    with pytest.raises(InvalidArgumentError):
        await registry.create_join_token("node 1", 0, ADMIN)
    assert await store.list_join_tokens() == []
    denied = [e for e in await _events(store) if e.kind == "token.create"]
    assert [e.outcome for e in denied] == ["denied"] * 3


async def test_ban_is_sticky_and_evict_forgets(registry: Registry, store: Store) -> None:
    await _attested(store, "node-1")
    await _attested(store, "node-2")
    banned = await registry.ban_agent("spiffe://example.org/agent/node-1", ADMIN)
    assert banned.banned and (await store.get_attested_node(banned.spiffe_id)).banned
    assert (await registry.ban_agent("node-1", ADMIN)).banned  # again: no error, no change
    with pytest.raises(FailedPreconditionError, match="banned"):
        await registry.evict_agent("node-1", ADMIN)
    await registry.evict_agent("node-2", ADMIN)
    with pytest.raises(NotFoundError):
        await store.get_attested_node("spiffe://example.org/agent/node-2")
    for bad, error in (("node-9", NotFoundError), ("spiffe://other.org/agent/x", InvalidArgumentError),
                       ("spiffe://example.org/ledger", InvalidArgumentError), ("bad name", InvalidArgumentError)):
        with pytest.raises(error):
            await registry.ban_agent(bad, ADMIN)
        with pytest.raises(error):
            await registry.evict_agent(bad, ADMIN)
    audit = [(e.kind, e.outcome) for e in await _events(store)]
    assert audit[:4] == [("agent.ban", "ok"), ("agent.ban", "ok"), ("agent.evict", "denied"), ("agent.evict", "ok")]
    assert audit[4:] == [("agent.ban", "denied"), ("agent.evict", "denied")] * 4


class RenewsFirst:
    """The real store, except that the first node update loses the race to an agent's
    renewal, which rewrites the node record just before it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def update_attested_node(self, node: AttestedNode, *, expected_revision: int | None = None) -> AttestedNode:
        if not self.raced:
            self.raced = True
            current = await self._store.get_attested_node(node.spiffe_id)
            await self._store.update_attested_node(replace(current, cert_serial="02"))
        return await self._store.update_attested_node(node, expected_revision=expected_revision)


async def test_a_ban_wins_over_a_concurrent_renewal(store: Store) -> None:
    node = await _attested(store)
    racing = RenewsFirst(store)
    clock = Clock()
    registry = Registry(TD, racing, AuditLog(store, b"k" * 32, clock=clock), clock)
    banned = await registry.ban_agent("node-1", ADMIN)
    stored = await store.get_attested_node(node.spiffe_id)
    assert racing.raced and banned.banned and stored.banned and stored.cert_serial == "02"


# --- reading: entries by id, pages of entries, agents --------------------------------------------


async def test_get_entry_checks_the_id_first(registry: Registry) -> None:
    created = await registry.create_entry(spec(), ADMIN)
    assert await registry.get_entry(created.id) == created
    with pytest.raises(InvalidArgumentError, match="an entry id is required"):
        await registry.get_entry("")
    with pytest.raises(InvalidArgumentError, match="invalid entry id '../x'"):
        await registry.get_entry("../x")
    with pytest.raises(NotFoundError):
        await registry.get_entry("f" * 32)


async def test_entries_are_listed_in_pages_by_id_with_filters(registry: Registry) -> None:
    other_parent = "spiffe://example.org/agent/node-2"
    made = [await registry.create_entry(spec(spiffe_id=f"spiffe://example.org/w{i % 3}", selectors=[f"unix:uid:{i}"],
                                             parent_id=AGENT if i < 5 else other_parent), ADMIN) for i in range(7)]
    ids = sorted(e.id for e in made)

    async def page(**kw: object) -> tuple[list[str], str]:
        found = await registry.list_entries(EntryQuery(**kw))  # type: ignore[arg-type]
        return [e.id for e in found.entries], found.next_page_token

    assert await page() == (ids, "")
    assert await page(page_size=3) == (ids[:3], ids[2])
    assert await page(page_size=3, page_token=ids[2]) == (ids[3:6], ids[5])
    assert await page(page_size=3, page_token=ids[5]) == (ids[6:], "")
    assert await page(page_size=7) == (ids, "")
    by_parent = sorted(e.id for e in made if str(e.parent_id) == other_parent)
    assert await page(parent_id=other_parent) == (by_parent, "")
    w1 = sorted(e.id for e in made if str(e.spiffe_id) == "spiffe://example.org/w1")
    assert await page(spiffe_id="spiffe://example.org/w1") == (w1, "")
    assert await page(spiffe_id="spiffe://example.org/w1", parent_id=AGENT) == (
        sorted(e.id for e in made if str(e.spiffe_id) == "spiffe://example.org/w1" and str(e.parent_id) == AGENT), "")
    assert await page(spiffe_id="spiffe://example.org/none") == ([], "")
    with pytest.raises(InvalidArgumentError, match="^page_size must not be negative$"):
        await page(page_size=-1)


def test_pages_are_capped() -> None:
    entries = [RegistrationEntry(id=f"{i:04d}", spiffe_id="spiffe://example.org/w", parent_id=AGENT,
                                 selectors=("unix:uid:1",), x509_ttl=0, jwt_ttl=0, dns_names=(), federates_with=(),
                                 admin=False, created_at=0.0, updated_at=0.0) for i in range(MAX_PAGE + 5)]
    for size in (0, MAX_PAGE + 1, 10**9):
        found = page_entries(entries, EntryQuery(page_size=size))
        assert len(found.entries) == MAX_PAGE and found.next_page_token == f"{MAX_PAGE - 1:04d}"


async def test_agents_are_listed_by_spiffe_id(registry: Registry, store: Store) -> None:
    assert await registry.list_agents() == []
    for node in ("node-2", "node-10", "node-1"):
        await _attested(store, node)
    assert [n.node_name for n in await registry.list_agents()] == ["node-1", "node-10", "node-2"]
