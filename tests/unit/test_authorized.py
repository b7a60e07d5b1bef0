"""The authorized-entry index against a brute-force oracle, under random changes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.authorized import AuthorizedIndex
from controlplane.store.records import AttestedNode, RegistrationEntry
from trustmesh.selectors import matches

SERVER = "spiffe://example.org/trustmesh/server"
AGENTS = [f"spiffe://example.org/agent/n{i}" for i in range(4)]
ALIASES = ["spiffe://example.org/alias/a", "spiffe://example.org/alias/b"]
NODE_SELECTORS = ["node:name:n0", "node:name:n1", "x509pop:subject:cn:rack1", "x509pop:subject:cn:rack2"]


def entry(i: int, parent: str, selectors: tuple[str, ...] = ("unix:uid:1",), spiffe_id: str | None = None) -> RegistrationEntry:
    return RegistrationEntry(id=f"e{i}", spiffe_id=spiffe_id or f"spiffe://example.org/w{i}", parent_id=parent,
                             selectors=selectors, x509_ttl=0, jwt_ttl=0, dns_names=(), federates_with=(),
                             admin=False, created_at=0, updated_at=0)


def node(agent: str, selectors: tuple[str, ...]) -> AttestedNode:
    return AttestedNode(spiffe_id=agent, node_name=agent.rsplit("/", 1)[1], attestation_type="join_token",
                        cert_serial="1", cert_not_after=0, banned=False, created_at=0, updated_at=0, selectors=selectors)


def oracle(entries: dict[str, RegistrationEntry], nodes: dict[str, AttestedNode], agent: str) -> list[str]:
    if agent not in nodes:
        return sorted(e.id for e in entries.values() if e.parent_id == agent)
    aliases = {e.spiffe_id for e in entries.values()
               if e.parent_id == SERVER and matches(e.selectors, nodes[agent].selectors)}
    return sorted(e.id for e in entries.values() if e.parent_id == agent or e.parent_id in aliases)


def test_direct_and_alias_entries() -> None:
    idx = AuthorizedIndex(SERVER)
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


@given(ops)
@settings(max_examples=300, deadline=None)
def test_index_always_equals_the_brute_force_answer(operations: list[tuple]) -> None:  # type: ignore[type-arg]
    idx = AuthorizedIndex(SERVER)
    idx.load([], [])
    entries: dict[str, RegistrationEntry] = {}
    nodes: dict[str, AttestedNode] = {}
    for op in operations:
        before = {a: oracle(entries, nodes, a) for a in AGENTS}
        if op[0] == "entry":
            _, i, parent, sel, alias_id, delete = op
            eid = f"e{i}"
            if delete:
                entries.pop(eid, None)
                affected = idx.apply_entry(eid, None)
            else:
                e = entry(i, parent, (sel,), spiffe_id=alias_id if parent == SERVER else None)
                entries[eid] = e
                affected = idx.apply_entry(eid, e)
        else:
            _, agent, sels, delete = op
            if delete:
                nodes.pop(agent, None)
                affected = idx.apply_node(agent, None)
            else:
                nodes[agent] = node(agent, tuple(sorted(set(sels))))
                affected = idx.apply_node(agent, nodes[agent])
        for a in AGENTS:
            want = oracle(entries, nodes, a)
            assert [e.id for e in idx.authorized_for(a)] == want
            if a in nodes and want != before[a]:
                assert a in affected, f"{a} changed but was not reported"
