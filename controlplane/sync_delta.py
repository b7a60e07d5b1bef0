"""What a sync stream sends an agent, as pure functions (no I/O): the counterpart of agent/sync.py.

A stream starts with a snapshot of everything the agent is authorized for (paged), or, when
the agent resumes from a revision the resume log still covers, with a delta since then. It
then sends a delta whenever what the agent is authorized for differs from what the stream
has sent (`Sent`), and an empty one as keepalive. Only the last page of a delta carries the
new revision: an agent cut off half-way resumes from the old one and gets all of it again.

These are the wire form of the delta, so they build protobuf messages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

from google.protobuf.message import Message

from trustmesh._proto.trustmesh.v1 import node_pb2, types_pb2
from trustmesh.bundle import Bundle
from trustmesh.controlplane.api.convert import entry_to_pb
from trustmesh.controlplane.store.records import RegistrationEntry
from trustmesh.policy import Policy
from trustmesh.policy.wire import policy_to_pb
from trustmesh.wire import bundle_to_pb

# A sync message holds at most this many entries and about this many bytes: with 4 MB as
# gRPC's message limit, a page never comes near it whatever the entries hold.
PAGE_ENTRIES = 500
PAGE_BYTES = 1024 * 1024

M = TypeVar("M", bound=Message)


def paged(items: Sequence[M], max_items: int = PAGE_ENTRIES, max_bytes: int = PAGE_BYTES) -> list[list[M]]:
    """Split messages into pages of at most `max_items` and about `max_bytes` each; always at
    least one (maybe empty) page. One item larger than `max_bytes` gets a page of its own."""
    pages: list[list[M]] = [[]]
    size = 0
    for item in items:
        n = item.ByteSize() + 8  # + the field tag and length prefix, generously
        if pages[-1] and (len(pages[-1]) >= max_items or size + n > max_bytes):
            pages.append([])
            size = 0
        pages[-1].append(item)
        size += n
    return pages


def delta_messages(upserted: Sequence[types_pb2.Entry], deleted: Sequence[str],
                   bundles: Sequence[types_pb2.Bundle], deleted_bundles: Sequence[str],
                   policy: types_pb2.CompiledPolicy | None, *, start: int, end: int) -> list[node_pb2.SyncResponse]:
    """One delta as paged SyncResponses. Only the last page carries the new revision `end`:
    an agent cut off half-way then resumes from `start` and gets all of it again."""
    deltas = [node_pb2.SyncDelta()]
    size = 0

    def room_for(n: int, full: bool) -> node_pb2.SyncDelta:
        nonlocal size
        if size and (full or size + n > PAGE_BYTES):
            deltas.append(node_pb2.SyncDelta())
            size = 0
        size += n
        return deltas[-1]

    for entry in upserted:
        room_for(entry.ByteSize() + 8, len(deltas[-1].upserted_entries) >= PAGE_ENTRIES).upserted_entries.append(entry)
    for entry_id in deleted:
        room_for(len(entry_id) + 8, False).deleted_entry_ids.append(entry_id)
    last = deltas[-1]
    last.bundles.extend(bundles)
    last.deleted_bundles.extend(deleted_bundles)
    if policy is not None:
        last.policy.CopyFrom(policy)
    return [node_pb2.SyncResponse(revision=end if i == len(deltas) - 1 else start, delta=d)
            for i, d in enumerate(deltas)]


# --- what an agent is authorized for, and what a stream has sent ----------------------------


@dataclass(frozen=True)
class AgentState:
    """Everything one agent receives, as of store `revision`."""

    entries: Sequence[RegistrationEntry]
    bundles: Mapping[str, types_pb2.Bundle]  # trust domain -> bundle: ours, and those federated with
    policy: types_pb2.CompiledPolicy
    revision: int


def agent_state(entries: Sequence[RegistrationEntry], *, own_bundle: types_pb2.Bundle,
                federated: Mapping[str, Bundle],
                policy: Policy, revoked_serials: frozenset[str], revision: int,
                http_routes: bool = True, time_windows: bool = True) -> AgentState:
    """The state of an agent authorized for `entries`: our own bundle and the stored bundle of
    every trust domain they federate with, and the allowlists deciding for their destinations
    (without route rules for an agent that cannot enforce them: `http_routes` False; without
    rules that have time windows for one that cannot evaluate those: `time_windows` False)."""
    bundles = {own_bundle.trust_domain: own_bundle}
    for td in sorted({td.name for e in entries for td in e.federates_with}):
        stored = federated.get(td)
        if stored is not None and td not in bundles:
            bundles[td] = bundle_to_pb(stored)
    compiled = policy.for_destinations([e.spiffe_id for e in entries])
    if not http_routes:
        compiled = compiled.without_routes()
    if not time_windows:
        compiled = compiled.without_windows()
    return AgentState(entries, bundles, policy_to_pb(replace(compiled, revoked_serials=revoked_serials)), revision)


@dataclass(frozen=True)
class Sent:
    """What one sync stream has sent, to compute the next delta by difference."""

    entries: Mapping[str, int]  # entry id -> entry revision
    bundles: Mapping[str, bytes]  # trust domain -> the serialized Bundle message
    policy: types_pb2.CompiledPolicy
    revision: int


def _sent(state: AgentState) -> Sent:
    return Sent({e.id: e.revision for e in state.entries},
                {td: b.SerializeToString() for td, b in state.bundles.items()}, state.policy, state.revision)


@dataclass(frozen=True)
class Start:
    """The first messages of a stream, what it has then sent, and whether it resumed."""

    messages: list[node_pb2.SyncResponse]
    sent: Sent
    resumed: bool


def start(state: AgentState, *, since: int, changed: Iterable[str] | None, known_trust_domains: Iterable[str],
          bundle_sequences: Mapping[str, int], policy_changed_at: int) -> Start:
    """A delta since `since` when `changed` (the entry ids that changed for this agent after
    it) is known, else a paged snapshot; either way followed by the bundles to drop: every
    trust domain in `known_trust_domains` (stored now or deleted since) the agent does not
    federate with."""
    sent = _sent(state)
    revision = state.revision
    drop = sorted(set(known_trust_domains) - set(state.bundles))
    if changed is None:
        pages = paged([entry_to_pb(e) for e in state.entries])
        last = len(pages) - 1
        messages = [node_pb2.SyncResponse(revision=revision, snapshot=node_pb2.SyncSnapshot(
            entries=page, page=number, last=number == last,
            bundles=list(state.bundles.values()) if number == last else [],
            policy=state.policy if number == last else None)) for number, page in enumerate(pages)]
        if drop:
            messages += delta_messages([], [], [], drop, None, start=revision, end=revision)
        return Start(messages, sent, resumed=False)
    changed_ids = set(changed)
    current = {e.id: e for e in state.entries}
    upserted = [entry_to_pb(current[i]) for i in sorted(changed_ids) if i in current]
    deleted = sorted(i for i in changed_ids if i not in current)
    fresh = [b for td, b in state.bundles.items()
             if not (b.sequence_number and bundle_sequences.get(td) == b.sequence_number)]
    new_policy = state.policy if (upserted or deleted or policy_changed_at > since) else None
    return Start(delta_messages(upserted, deleted, fresh, drop, new_policy, start=since, end=revision), sent,
                 resumed=True)


def next_delta(state: AgentState, sent: Sent, *, keepalive: bool = False) -> tuple[list[node_pb2.SyncResponse], Sent]:
    """The delta from what `sent` records to `state`, and what has been sent after it;
    no messages (and `sent` unchanged) when nothing changed and no keepalive is due."""
    current = {e.id for e in state.entries}
    upserted = [e for e in state.entries if sent.entries.get(e.id) != e.revision]
    deleted = [i for i in sent.entries if i not in current]
    serialized = {td: b.SerializeToString() for td, b in state.bundles.items()}
    changed_bundles = [state.bundles[td] for td, data in serialized.items() if sent.bundles.get(td) != data]
    dropped = [td for td in sent.bundles if td not in serialized]
    policy_changed = state.policy != sent.policy
    if not (upserted or deleted or changed_bundles or dropped or policy_changed or keepalive):
        return [], sent
    messages = delta_messages([entry_to_pb(e) for e in upserted], deleted, changed_bundles, dropped,
                              state.policy if policy_changed else None, start=sent.revision, end=state.revision)
    return messages, Sent({e.id: e.revision for e in state.entries}, serialized, state.policy, state.revision)


def delivered_policy_revision(message: node_pb2.SyncResponse) -> int | None:
    """The policy revision a delta message delivers, if it carries a policy."""
    if message.WhichOneof("body") == "delta" and message.delta.HasField("policy"):
        return int(message.delta.policy.revision)
    return None
