"""The authorized-entry index and its resume log against a brute-force oracle, under random
changes; and the paging of sync messages."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh._proto.trustmesh.v1 import types_pb2
from trustmesh.controlplane.api.convert import entry_to_pb
from trustmesh.controlplane.authorized import AuthorizedIndex, ResumeLog
from trustmesh.controlplane.store.records import AttestedNode, RegistrationEntry
from trustmesh.controlplane.sync_delta import PAGE_BYTES, PAGE_ENTRIES, delta_messages, paged
from trustmesh.selectors import Selector, matches
from trustmesh.spiffeid import SpiffeId

SERVER = "spiffe://example.org/trustmesh/server"
AGENTS = [f"spiffe://example.org/agent/n{i}" for i in range(4)]
ALIASES = ["spiffe://example.org/alias/a", "spiffe://example.org/alias/b"]
NODE_SELECTORS = ["node:name:n0", "node:name:n1", "x509pop:subject:cn:rack1", "x509pop:subject:cn:rack2"]


def _selectors(texts: tuple[str, ...]) -> tuple[Selector, ...]:
    return tuple(Selector.parse(t) for t in texts)


def entry(i: int, parent: str, selectors: tuple[str, ...] = ("unix:uid:1",),
          spiffe_id: str | None = None) -> RegistrationEntry:
    return RegistrationEntry(id=f"e{i}", spiffe_id=SpiffeId.parse(spiffe_id or f"spiffe://example.org/w{i}"),
                             parent_id=SpiffeId.parse(parent), selectors=_selectors(selectors), x509_ttl=0,
                             jwt_ttl=0, dns_names=(), federates_with=(),
                             admin=False, created_at=0, updated_at=0)


def node(agent: str, selectors: tuple[str, ...]) -> AttestedNode:
    return AttestedNode(spiffe_id=SpiffeId.parse(agent), node_name=agent.rsplit("/", 1)[1],
                        attestation_type="join_token",
                        cert_serial="1", cert_not_after=0, banned=False, created_at=0, updated_at=0,
                        selectors=_selectors(selectors))


def oracle(entries: dict[str, RegistrationEntry], nodes: dict[str, AttestedNode], agent: str) -> list[str]:
    if agent not in nodes:
        return sorted(e.id for e in entries.values() if str(e.parent_id) == agent)
    aliases = {str(e.spiffe_id) for e in entries.values()
               if str(e.parent_id) == SERVER and matches(e.selectors, nodes[agent].selectors)}
    return sorted(e.id for e in entries.values() if str(e.parent_id) == agent or str(e.parent_id) in aliases)


def test_direct_and_alias_entries() -> None:
    idx = AuthorizedIndex(SpiffeId.parse(SERVER))
    idx.load([entry(1, AGENTS[0]), entry(2, AGENTS[1]),
              entry(3, SERVER, ("x509pop:subject:cn:rack1",), spiffe_id=ALIASES[0]), entry(4, ALIASES[0])],
             [node(AGENTS[0], ("x509pop:subject:cn:rack1",)), node(AGENTS[1], ("x509pop:subject:cn:rack2",))])
    assert [e.id for e in idx.authorized_for(AGENTS[0])] == ["e1", "e4"]
    assert [e.id for e in idx.authorized_for(AGENTS[1])] == ["e2"]
    assert idx.is_authorized(AGENTS[0], "e4") and not idx.is_authorized(AGENTS[1], "e4")
    assert not idx.is_authorized(AGENTS[1], "e1") and not idx.is_authorized(AGENTS[1], "missing")
    # A new entry under the alias affects only the alias's members.
    assert idx.apply_entry("e5", entry(5, ALIASES[0])) == {AGENTS[0]}
    assert idx.apply_entry("e2", None) == {AGENTS[1]}
    # Moving a node into the alias.
    idx.apply_node(AGENTS[1], node(AGENTS[1], ("x509pop:subject:cn:rack1",)))
    assert {e.id for e in idx.authorized_for(AGENTS[1])} == {"e4", "e5"}


ops = st.lists(
    st.one_of(
        st.tuples(st.just("entry"), st.integers(0, 7), st.sampled_from(AGENTS + ALIASES + [SERVER]),
                  st.sampled_from(NODE_SELECTORS), st.sampled_from(ALIASES), st.booleans()),
        st.tuples(st.just("node"), st.sampled_from(AGENTS), st.lists(st.sampled_from(NODE_SELECTORS), max_size=3),
                  st.booleans()),
    ),
    max_size=40,
)


@given(ops, st.sampled_from([3, 128]))
@settings(max_examples=300, deadline=None)
def test_index_always_equals_the_brute_force_answer(operations: list[tuple], per_agent: int) -> None:
    idx = AuthorizedIndex(SpiffeId.parse(SERVER), resume_per_agent=per_agent)
    idx.load([], [], revision=1)
    entries: dict[str, RegistrationEntry] = {}
    nodes: dict[str, AttestedNode] = {}
    # What an agent held after applying the stream up to some revision.
    views: list[tuple[str, int, dict[str, RegistrationEntry]]] = []
    for revision, op in enumerate(operations, start=2):
        before = {a: oracle(entries, nodes, a) for a in AGENTS}
        if op[0] == "entry":
            _, i, parent, sel, alias_id, delete = op
            eid = f"e{i}"
            if delete:
                entries.pop(eid, None)
                affected = idx.apply_entry(eid, None, revision)
            else:
                e = replace(entry(i, parent, (sel,), spiffe_id=alias_id if parent == SERVER else None),
                            revision=revision)
                entries[eid] = e
                affected = idx.apply_entry(eid, e, revision)
        else:
            _, agent, sels, delete = op
            if delete:
                nodes.pop(agent, None)
                affected = idx.apply_node(agent, None, revision)
            else:
                nodes[agent] = node(agent, tuple(sorted(set(sels))))
                affected = idx.apply_node(agent, nodes[agent], revision)
        for a in AGENTS:
            want = oracle(entries, nodes, a)
            assert [e.id for e in idx.authorized_for(a)] == want
            if a in nodes and want != before[a]:
                assert a in affected, f"{a} changed but was not reported"
            if a in nodes:
                views.append((a, revision, {i: entries[i] for i in want}))
                assert idx.changed_since(a, revision) == set(), "resuming from now needs nothing"
    # Every resume the log agrees to must bring the agent exactly to the current state.
    for agent, at, held in views:
        if agent not in nodes:
            continue
        changed = idx.changed_since(agent, at)
        if changed is None:
            continue
        current = {e.id: e for e in idx.authorized_for(agent)}
        resumed = {i: e for i, e in held.items() if i not in changed}
        resumed.update((i, current[i]) for i in changed if i in current)
        assert resumed == current, f"resuming {agent} from revision {at} went wrong"


def test_resume_log_bounds_and_floors() -> None:
    log = ResumeLog(per_agent=2)
    log.reset(10)
    assert log.changed_since("a", 9) is None, "before the load: unknown"
    assert log.changed_since("a", 10) == set()
    log.record(["a", "b"], 11, "e1")
    log.record(["a"], 12, "e2")
    assert log.changed_since("a", 10) == {"e1", "e2"}
    assert log.changed_since("a", 11) == {"e2"}
    log.record(["a"], 13, "e3")  # drops (11, e1): resuming from before 11 is no longer possible
    assert log.changed_since("a", 10) is None
    assert log.changed_since("a", 11) == {"e2", "e3"}
    assert log.changed_since("b", 10) == {"e1"}
    log.restart("b", 14)
    assert log.changed_since("b", 13) is None and log.changed_since("b", 14) == set()
    log.forget("b")
    assert log.changed_since("b", 10) == set(), "a forgotten agent falls back to the load floor"


def test_pages_stay_far_below_the_message_limit() -> None:
    big = [entry_to_pb(entry(i, AGENTS[0], tuple(f"unix:path:/{'x' * 4000}/{j}" for j in range(32))))
           for i in range(40)]
    pages = paged(big)
    assert sum(len(p) for p in pages) == 40 and len(pages) > 1
    assert all(sum(e.ByteSize() for e in p) <= PAGE_BYTES for p in pages)
    small = [entry_to_pb(entry(i, AGENTS[0])) for i in range(1201)]
    assert [len(p) for p in paged(small)] == [PAGE_ENTRIES, PAGE_ENTRIES, 201]
    assert paged([]) == [[]]


def test_a_paged_delta_moves_the_revision_only_on_its_last_page() -> None:
    upserts = [entry_to_pb(entry(i, AGENTS[0])) for i in range(PAGE_ENTRIES + 1)]
    messages = delta_messages(upserts, ["gone"], [], ["partner.example"], None, start=7, end=9)
    assert [m.revision for m in messages] == [7, 9]
    assert sum(len(m.delta.upserted_entries) for m in messages) == PAGE_ENTRIES + 1
    assert list(messages[-1].delta.deleted_entry_ids) == ["gone"], "small deletions share the last page"
    many = delta_messages([], [f"id-{i:030d}" for i in range(100_000)], [], [], None, start=1, end=2)
    assert len(many) > 1 and all(m.ByteSize() <= PAGE_BYTES + 1024 for m in many)
    assert sum(len(m.delta.deleted_entry_ids) for m in many) == 100_000
    assert list(messages[-1].delta.deleted_bundles) == ["partner.example"]
    assert not messages[-1].delta.HasField("policy")
    empty = delta_messages([], [], [], [], types_pb2.CompiledPolicy(), start=3, end=4)
    assert len(empty) == 1 and empty[0].revision == 4 and empty[0].delta.HasField("policy"), \
        "an empty policy is still a policy to replace the old one with"
