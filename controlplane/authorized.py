"""The authorized-entry index: which entries each agent may use (pure; imports no store).

An agent may use the entries whose parent is its own ID, or a node alias it belongs to.
A node alias is an entry whose parent is the server's ID; a node belongs to it when all the
alias's selectors are among the node's (attestation) selectors. An entry with a node selector
(labels, see trustmesh/labels.py) goes instead to every agent whose node carries all of
its key=value labels; it is indexed by each of its pairs, and nodes by theirs, so a label
change recomputes only that node and a selector entry change only the nodes it names.

The index is loaded once and then kept current by the store's change feed, so answering
"what may agent X use" costs a walk over X's own entries, never over the registry, and an
idle fleet causes no store reads at all. Every change reports which agents it affects, so
only their sync streams wake up, and is noted per agent (ResumeLog) so that an agent that
reconnects gets a delta since the revision it last applied rather than a snapshot.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable

from trustmesh.controlplane.store.records import AttestedNode, RegistrationEntry
from trustmesh.labels import matches as labels_match
from trustmesh.selectors import matches
from trustmesh.spiffeid import SpiffeId


class AuthorizedIndex:
    # Agent IDs are keyed as text: they are what the peer's certificate and the sync streams
    # name, and a record's parent compares with them after one str().
    def __init__(self, server_id: SpiffeId, resume_per_agent: int = 128) -> None:
        self._server = server_id
        self._server_id = str(server_id)
        self.resume = ResumeLog(resume_per_agent)
        self._reset()

    def _reset(self) -> None:
        self.entries: dict[str, RegistrationEntry] = {}
        self.nodes: dict[str, AttestedNode] = {}
        self._by_parent: dict[str, set[str]] = defaultdict(set)
        # alias SPIFFE ID -> ids of the alias entries that define it
        self._alias_entries: dict[str, set[str]] = defaultdict(set)
        # agent ID -> alias SPIFFE IDs it belongs to, and the reverse
        self._node_aliases: dict[str, set[str]] = defaultdict(set)
        self._alias_members: dict[str, set[str]] = defaultdict(set)
        # Node selectors: (key, value) -> ids of the entries whose selector holds it, and
        # -> the agents whose node carries it; agent -> the selector entries its node matches.
        self._selector_entries: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._labelled_nodes: dict[tuple[str, str], set[str]] = defaultdict(set)
        self._node_selected: dict[str, set[str]] = {}

    # --- loading and changes ------------------------------------------------------------

    def load(self, entries: Iterable[RegistrationEntry], nodes: Iterable[AttestedNode], revision: int = 0) -> None:
        """Replace everything with what the store held at `revision`."""
        self._reset()
        self.resume.reset(revision)
        for node in nodes:
            self.nodes[str(node.spiffe_id)] = node
            self._index_labels(str(node.spiffe_id), None, node)
        for entry in entries:
            self._add_entry(entry)
        self._recompute_all_memberships()
        for agent in self.nodes:
            self._reselect(agent)

    def _add_entry(self, entry: RegistrationEntry) -> None:
        self.entries[entry.id] = entry
        if entry.node_selector:
            for pair in entry.node_selector:
                self._selector_entries[pair].add(entry.id)
            return
        parent = str(entry.parent_id)
        self._by_parent[parent].add(entry.id)
        if parent == self._server_id:
            self._alias_entries[str(entry.spiffe_id)].add(entry.id)

    def _remove_entry(self, entry_id: str) -> RegistrationEntry | None:
        entry = self.entries.pop(entry_id, None)
        if entry is None:
            return None
        if entry.node_selector:
            for pair in entry.node_selector:
                self._selector_entries[pair].discard(entry_id)
                if not self._selector_entries[pair]:
                    del self._selector_entries[pair]
            return entry
        parent, spiffe_id = str(entry.parent_id), str(entry.spiffe_id)
        self._by_parent[parent].discard(entry_id)
        if not self._by_parent[parent]:
            del self._by_parent[parent]
        if parent == self._server_id:
            self._alias_entries[spiffe_id].discard(entry_id)
            if not self._alias_entries[spiffe_id]:
                del self._alias_entries[spiffe_id]
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

    # --- node selectors -------------------------------------------------------------------

    def _index_labels(self, agent: str, old: AttestedNode | None, new: AttestedNode | None) -> None:
        for pair in old.effective_labels.items() if old is not None else ():
            self._labelled_nodes[pair].discard(agent)
            if not self._labelled_nodes[pair]:
                del self._labelled_nodes[pair]
        for pair in new.effective_labels.items() if new is not None else ():
            self._labelled_nodes[pair].add(agent)

    def _reselect(self, agent: str) -> set[str]:
        """Recompute the selector entries `agent`'s node matches: only the entries sharing
        one of its labels are looked at. Returns the ids that came or went."""
        node = self.nodes.get(agent)
        new: set[str] = set()
        if node is not None:
            labels = node.effective_labels
            for pair in labels.items():
                for entry_id in self._selector_entries.get(pair, ()):
                    if entry_id not in new and labels_match(dict(self.entries[entry_id].node_selector), labels):
                        new.add(entry_id)
        old = self._node_selected.pop(agent, set())
        if new:
            self._node_selected[agent] = new
        return old ^ new

    def _selected_by(self, entry: RegistrationEntry) -> set[str]:
        """The agents whose node carries every label of `entry`'s node selector."""
        sets = sorted((self._labelled_nodes.get(pair, set()) for pair in entry.node_selector), key=len)
        return set(sets[0]).intersection(*sets[1:]) if sets else set()

    def _apply_selector_entry(self, entry_id: str, old: RegistrationEntry | None,
                              entry: RegistrationEntry | None) -> set[str]:
        affected: set[str] = set()
        if old is not None and old.node_selector:
            for agent in self._selected_by(old):
                selected = self._node_selected.get(agent)
                if selected is not None and entry_id in selected:
                    selected.discard(entry_id)
                    if not selected:
                        del self._node_selected[agent]
                    affected.add(agent)
        if entry is not None and entry.node_selector:
            for agent in self._selected_by(entry):
                self._node_selected.setdefault(agent, set()).add(entry_id)
                affected.add(agent)
        return affected

    def _affected_by_parent(self, parent_id: str) -> set[str]:
        return {parent_id} | set(self._alias_members.get(parent_id, ()))

    def apply_entry(self, entry_id: str, entry: RegistrationEntry | None, revision: int = 0) -> set[str]:
        """Apply a created/updated entry (or a deletion when `entry` is None) made at store
        `revision`; return the agent IDs whose authorized set may have changed."""
        affected, alias_touched = self._apply_entry(entry_id, entry)
        if alias_touched:
            # Node alias membership moved: whole groups of entries came or went.
            for agent in affected:
                self.resume.restart(agent, revision)
        else:
            self.resume.record(affected, revision, entry_id)
        return affected

    def _apply_entry(self, entry_id: str, entry: RegistrationEntry | None) -> tuple[set[str], bool]:
        old = self._remove_entry(entry_id)
        affected: set[str] = set()
        if old is not None and not old.node_selector:
            affected |= self._affected_by_parent(str(old.parent_id))
        if entry is not None:
            self._add_entry(entry)
            if not entry.node_selector:
                affected |= self._affected_by_parent(str(entry.parent_id))
        affected |= self._apply_selector_entry(entry_id, old, entry)
        alias_touched = (old is not None and not old.node_selector and old.parent_id == self._server) or (
            entry is not None and not entry.node_selector and entry.parent_id == self._server)
        if alias_touched:
            affected |= self._recompute_all_memberships()
            for alias in {str(e.spiffe_id) for e in (old, entry) if e is not None}:
                affected |= self._affected_by_parent(alias)
        return {a for a in affected if a in self.nodes}, alias_touched

    def apply_node(self, spiffe_id: str, node: AttestedNode | None, revision: int = 0) -> set[str]:
        """Apply an attested node written (or deleted, when `node` is None) at `revision`."""
        old = self.nodes.get(spiffe_id)
        relabelled = old is None or node is None or old.labels != node.labels \
            or old.attestation_type != node.attestation_type
        if relabelled:
            self._index_labels(spiffe_id, old, node)
        if node is None:
            self.nodes.pop(spiffe_id, None)
            self._set_membership(spiffe_id, set())
            self._node_selected.pop(spiffe_id, None)
            self.resume.forget(spiffe_id)
        else:
            self.nodes[spiffe_id] = node
            self._set_membership(spiffe_id, self._aliases_of(node))
            # A label change recomputes this node alone, against the entries sharing a label.
            # (A renewal, which rewrites the record with the same labels, costs nothing here.)
            reselected = self._reselect(spiffe_id) if relabelled else set()
            if old is None or old.selectors != node.selectors:
                self.resume.restart(spiffe_id, revision)
            else:
                for entry_id in sorted(reselected):
                    self.resume.record((spiffe_id,), revision, entry_id)
        return {spiffe_id}

    def changed_since(self, agent: str, revision: int) -> set[str] | None:
        """Entry ids that changed for `agent` after `revision`; None: send a snapshot."""
        return self.resume.changed_since(agent, revision)

    # --- queries ------------------------------------------------------------------------

    def authorized_for(self, agent: str) -> list[RegistrationEntry]:
        ids = set(self._by_parent.get(agent, ()))
        for alias in self._node_aliases.get(agent, ()):
            ids |= self._by_parent.get(alias, set())
        ids |= self._node_selected.get(agent, set())
        return [self.entries[i] for i in sorted(ids)]

    def reached_by(self, entry_id: str) -> list[str]:
        """The agents a node-selector entry currently reaches (for `entry show`)."""
        return sorted(a for a, ids in self._node_selected.items() if entry_id in ids)

    def is_authorized(self, agent: str, entry_id: str) -> bool:
        entry = self.entries.get(entry_id)
        if entry is None:
            return False
        if entry.node_selector:
            return entry_id in self._node_selected.get(agent, ())
        parent = str(entry.parent_id)
        return parent == agent or parent in self._node_aliases.get(agent, ())


class ResumeLog:
    """Which entries changed for each agent, and at which store revision (pure, bounded).

    A reconnecting agent says up to which revision it applied the sync stream; when the log
    still covers everything after that revision for this agent, the server answers with a
    delta of exactly those entries instead of a full snapshot. Agents reconnect routinely
    (every agent SVID renewal means a new channel), so this keeps reconnects cheap.

    The log only ever over-approximates: an entry listed as changed that did not change is
    sent again, harmlessly. Where the exact set would take work (an alias entry or a node's
    selectors changed, so whole groups of entries came or went) the agent's history simply
    restarts and its next reconnect gets a snapshot.
    """

    def __init__(self, per_agent: int = 128) -> None:
        self._per_agent = per_agent
        self._floor = 0  # nothing at or before this revision is known for anyone
        self._agent_floor: dict[str, int] = {}
        self._changes: dict[str, deque[tuple[int, str]]] = {}

    def reset(self, revision: int) -> None:
        """After a full (re)load at `revision`: earlier history is unknown."""
        self._floor = revision
        self._agent_floor.clear()
        self._changes.clear()

    def record(self, agents: Iterable[str], revision: int, entry_id: str) -> None:
        for agent in agents:
            changes = self._changes.setdefault(agent, deque())
            changes.append((revision, entry_id))
            if len(changes) > self._per_agent:
                dropped, _ = changes.popleft()
                self._agent_floor[agent] = max(self._agent_floor.get(agent, 0), dropped)

    def restart(self, agent: str, revision: int) -> None:
        """The agent's authorized set changed wholesale at `revision`."""
        self._changes.pop(agent, None)
        self._agent_floor[agent] = max(self._agent_floor.get(agent, 0), revision)

    def forget(self, agent: str) -> None:
        """The agent is gone (evicted); a re-attested one starts with restart()."""
        self._changes.pop(agent, None)
        self._agent_floor.pop(agent, None)

    def changed_since(self, agent: str, revision: int) -> set[str] | None:
        """Ids of the entries that changed for `agent` after `revision`, or None when the
        log cannot tell (the agent must get a snapshot)."""
        if revision < max(self._floor, self._agent_floor.get(agent, 0)):
            return None
        return {entry_id for rev, entry_id in self._changes.get(agent, ()) if rev > revision}
