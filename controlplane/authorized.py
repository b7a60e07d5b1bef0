"""The authorized-entry index: which entries each agent may use (pure; imports no store).

An agent may use the entries whose parent is its own ID, or a node alias it belongs to.
A node alias is an entry whose parent is the server's ID; a node belongs to it when all the
alias's selectors are among the node's (attestation) selectors.

The index is loaded once and then kept current by the store's change feed, so answering
"what may agent X use" costs a walk over X's own entries, never over the registry, and an
idle fleet causes no store reads at all. Every change reports which agents it affects, so
only their sync streams wake up.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from trustmesh.selectors import matches

from controlplane.store.records import AttestedNode, RegistrationEntry


class AuthorizedIndex:
    def __init__(self, server_id: str) -> None:
        self._server_id = server_id
        self.entries: dict[str, RegistrationEntry] = {}
        self.nodes: dict[str, AttestedNode] = {}
        self._by_parent: dict[str, set[str]] = defaultdict(set)
        # alias SPIFFE ID -> ids of the alias entries that define it
        self._alias_entries: dict[str, set[str]] = defaultdict(set)
        # agent ID -> alias SPIFFE IDs it belongs to, and the reverse
        self._node_aliases: dict[str, set[str]] = defaultdict(set)
        self._alias_members: dict[str, set[str]] = defaultdict(set)

    # --- loading and changes ------------------------------------------------------------

    def load(self, entries: Iterable[RegistrationEntry], nodes: Iterable[AttestedNode]) -> None:
        self.__init__(self._server_id)  # type: ignore[misc]
        for node in nodes:
            self.nodes[node.spiffe_id] = node
        for entry in entries:
            self._add_entry(entry)
        self._recompute_all_memberships()

    def _add_entry(self, entry: RegistrationEntry) -> None:
        self.entries[entry.id] = entry
        self._by_parent[entry.parent_id].add(entry.id)
        if entry.parent_id == self._server_id:
            self._alias_entries[entry.spiffe_id].add(entry.id)

    def _remove_entry(self, entry_id: str) -> RegistrationEntry | None:
        entry = self.entries.pop(entry_id, None)
        if entry is None:
            return None
        self._by_parent[entry.parent_id].discard(entry_id)
        if not self._by_parent[entry.parent_id]:
            del self._by_parent[entry.parent_id]
        if entry.parent_id == self._server_id:
            self._alias_entries[entry.spiffe_id].discard(entry_id)
            if not self._alias_entries[entry.spiffe_id]:
                del self._alias_entries[entry.spiffe_id]
        return entry

    def _aliases_of(self, node: AttestedNode) -> set[str]:
        return {
            alias for alias, ids in self._alias_entries.items()
            if any(matches(self.entries[i].selectors, node.selectors) for i in ids)
        }

    def _set_membership(self, agent: str, aliases: set[str]) -> None:
        for alias in self._node_aliases.pop(agent, set()):
            self._alias_members[alias].discard(agent)
        if aliases:
            self._node_aliases[agent] = set(aliases)
            for alias in aliases:
                self._alias_members[alias].add(agent)

    def _recompute_all_memberships(self) -> set[str]:
        """After an alias entry changes: O(nodes x aliases), which is rare by nature."""
        changed = set()
        for agent, node in self.nodes.items():
            new = self._aliases_of(node)
            if new != self._node_aliases.get(agent, set()):
                changed.add(agent)
                self._set_membership(agent, new)
        self._alias_members = defaultdict(set, {a: m for a, m in self._alias_members.items() if m})
        return changed

    def _affected_by_parent(self, parent_id: str) -> set[str]:
        return {parent_id} | set(self._alias_members.get(parent_id, ()))

    def apply_entry(self, entry_id: str, entry: RegistrationEntry | None) -> set[str]:
        """Apply a created/updated entry (or a deletion when `entry` is None); return the
        agent IDs whose authorized set may have changed."""
        old = self._remove_entry(entry_id)
        affected: set[str] = set()
        if old is not None:
            affected |= self._affected_by_parent(old.parent_id)
        if entry is not None:
            self._add_entry(entry)
            affected |= self._affected_by_parent(entry.parent_id)
        alias_touched = (old is not None and old.parent_id == self._server_id) or (
            entry is not None and entry.parent_id == self._server_id)
        if alias_touched:
            affected |= self._recompute_all_memberships()
            for alias in {e.spiffe_id for e in (old, entry) if e is not None}:
                affected |= self._affected_by_parent(alias)
        return {a for a in affected if a in self.nodes}

    def apply_node(self, spiffe_id: str, node: AttestedNode | None) -> set[str]:
        if node is None:
            self.nodes.pop(spiffe_id, None)
            self._set_membership(spiffe_id, set())
        else:
            self.nodes[spiffe_id] = node
            self._set_membership(spiffe_id, self._aliases_of(node))
        return {spiffe_id}

    # --- queries ------------------------------------------------------------------------

    def authorized_for(self, agent: str) -> list[RegistrationEntry]:
        ids = set(self._by_parent.get(agent, ()))
        for alias in self._node_aliases.get(agent, ()):
            ids |= self._by_parent.get(alias, set())
        return [self.entries[i] for i in sorted(ids)]

    def is_authorized(self, agent: str, entry_id: str) -> bool:
        entry = self.entries.get(entry_id)
        if entry is None:
            return False
        return entry.parent_id == agent or entry.parent_id in self._node_aliases.get(agent, ())
