"""The sync stream from the control plane: the entries, bundles and policy this node may use.

Snapshot pages are collected and swapped in atomically on the last page (entries, bundles
and policy together, so a half-received snapshot is never visible); deltas apply as they
come. The last revision is remembered and a reconnect resumes from it (with the bundle
sequence numbers held, so unchanged bundles are not resent). The last known state is kept
on disk so a restart during an outage still serves.

Reconnects use capped exponential backoff with full jitter. The logs and the metrics
`trustmesh_agent_server_state{state}` and `trustmesh_agent_sync_reconnects_total{reason}`
tell apart: connected, server unreachable, server untrusted (it answers, but its
certificate does not chain to our trust bundle: said once, at ERROR, naming the bundle),
and agent refused (banned, evicted, or its identity in use elsewhere: PERMISSION_DENIED on a
call made with the agent SVID; the agent then asks again only rarely and keeps serving what
it has). A token refused at attestation ends the agent at start (see attestation.py).

When the agent SVID rotates, the stream is reopened on the new channel at once: the server
ends a stream whose certificate has expired, and the old channel is to be closed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import grpc
from google.protobuf.message import DecodeError

from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc, types_pb2
from trustmesh.agent.config import DEFAULT_ROTATION, RotationConfig
from trustmesh.agent.convert import AgentEntry, entry_from_pb
from trustmesh.agent.node_client import ServerState
from trustmesh.backoff import backoff_delay
from trustmesh.bundle import Bundle, BundleSet
from trustmesh.errors import BundleError
from trustmesh.files import atomic_write
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.policy import Policy, PolicyError
from trustmesh.policy.wire import HTTP_ROUTES, TIME_WINDOWS, policy_from_pb, policy_to_pb
from trustmesh.spiffeid import TrustDomain
from trustmesh.wire import bundle_from_pb

log = logging.getLogger("trustmesh.sync")

STATE_FILE = "sync_state.json"
BANNED_RETRY = RotationConfig().refused_retry
# The server sends a keepalive on an idle stream every 300 s; two missed ones mean the
# connection is dead without anyone having told us (a partition, a vanished NAT entry).
IDLE_TIMEOUT = 2 * 300.0 + 60.0
REFUSED = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class SyncConnection(Protocol):
    """What the sync stream needs of the connection to the control plane."""

    @property
    def address(self) -> str: ...

    @property
    def generation(self) -> int: ...

    async def wait_new_generation(self, after: int) -> int: ...

    def stub(self) -> node_pb2_grpc.NodeStub: ...

    def failover(self) -> None: ...

    async def untrusted(self) -> str | None:
        """Why the current server fails verification against our trust bundle, if it does."""
        ...

    @property
    def untrusted_message(self) -> str:
        """What to tell the operator then (names the bundle)."""
        ...


class EntrySink(Protocol):
    """Where the synced state goes (the SVID cache)."""

    def set_entries(self, entries: dict[str, AgentEntry]) -> None: ...

    def set_bundles(self, bundles: BundleSet) -> None: ...


class SyncState:
    """The entries, bundles and policy the agent holds, and how messages change them.

    Pure: no I/O, so snapshot and delta handling are tested message by message."""

    def __init__(self, permissive_listeners: Sequence[str] = ()) -> None:
        self.revision = 0
        # Told to the server at every stream start, which keeps them on this agent's record.
        self.permissive_listeners = tuple(permissive_listeners)
        self.entries: dict[str, AgentEntry] = {}
        self.bundles: dict[TrustDomain, Bundle] = {}
        self.policy = Policy()
        self._pending_entries: dict[str, AgentEntry] = {}
        self._pending_bundles: dict[TrustDomain, Bundle] = {}
        self._pending_policy: Policy | None = None

    def start_stream(self) -> None:
        """A new stream starts: pages of an interrupted snapshot are worthless."""
        self._pending_entries, self._pending_bundles, self._pending_policy = {}, {}, None

    def request(self) -> node_pb2.SyncRequest:
        return node_pb2.SyncRequest(
            since_revision=self.revision, policy_revision=self.policy.revision,
            permissive_listeners=self.permissive_listeners, features=[HTTP_ROUTES, TIME_WINDOWS],
            bundle_sequences={td.name: b.sequence_number for td, b in self.bundles.items() if b.sequence_number})

    def apply(self, response: node_pb2.SyncResponse) -> bool:
        """Apply one message; True when the visible state changed (then publish and persist)."""
        body = response.WhichOneof("body")
        if body == "snapshot":
            snap = response.snapshot
            self._pending_entries.update((e.id, entry_from_pb(e)) for e in snap.entries)
            self._pending_bundles.update((TrustDomain(b.trust_domain), bundle_from_pb(b)) for b in snap.bundles)
            if snap.HasField("policy"):
                self._pending_policy = policy_from_pb(snap.policy)
            if not snap.last:
                return False
            self.entries, self.bundles = self._pending_entries, self._pending_bundles
            self.policy = self._pending_policy if self._pending_policy is not None else Policy()
            self.start_stream()
        elif body == "delta":
            delta = response.delta
            # Read first: a policy this agent cannot use changes nothing (not even the entries).
            policy = policy_from_pb(delta.policy) if delta.HasField("policy") else None
            for e in delta.upserted_entries:
                self.entries[e.id] = entry_from_pb(e)
            for entry_id in delta.deleted_entry_ids:
                self.entries.pop(entry_id, None)
            for b in delta.bundles:
                self.bundles[TrustDomain(b.trust_domain)] = bundle_from_pb(b)
            for td in delta.deleted_bundles:
                self.bundles.pop(TrustDomain(td), None)
            if policy is not None:
                self.policy = policy
        else:
            return False  # a message type from a newer server: nothing we can apply
        # A paged delta carries the new revision only on its last page, so a stream cut
        # half-way resumes from before it and receives all of it again.
        self.revision = max(self.revision, response.revision)
        return True

    # --- persistence ---------------------------------------------------------------------

    def to_json(self) -> bytes:
        doc = {"revision": self.revision, "entries": [e.to_dict() for e in self.entries.values()],
               "policy": base64.b64encode(policy_to_pb(self.policy).SerializeToString()).decode(),
               "bundles": {td.name: b.to_jwks().decode() for td, b in self.bundles.items()}}
        return json.dumps(doc, sort_keys=True).encode()

    def load_json(self, data: bytes) -> None:
        """Replace the state with a persisted one; raises ValueError (or a subclass) if unreadable."""
        try:
            doc = json.loads(data)
            entries = {e["id"]: AgentEntry.from_dict(e) for e in doc["entries"]}
            bundles = {TrustDomain(td): Bundle.from_jwks(jwks.encode(), TrustDomain(td))
                       for td, jwks in doc["bundles"].items()}
            policy = (policy_from_pb(types_pb2.CompiledPolicy.FromString(base64.b64decode(doc["policy"])))
                      if doc.get("policy") else Policy())
            revision = int(doc.get("revision", 0))
        except (KeyError, TypeError, AttributeError, BundleError, DecodeError) as err:
            raise ValueError(f"{type(err).__name__}: {err}") from err
        self.revision, self.entries, self.bundles, self.policy = revision, entries, bundles, policy


class SyncClient:
    def __init__(self, client: SyncConnection, cache: EntrySink, data_dir: Path, td: TrustDomain,
                 metrics: Registry, on_own_bundle: Callable[[Bundle], None], rand: random.Random | None = None,
                 on_policy: Callable[[Policy], None] | None = None, *,
                 rotation: RotationConfig = DEFAULT_ROTATION, idle_timeout: float = IDLE_TIMEOUT,
                 server_state: ServerState | None = None, permissive_listeners: Sequence[str] = ()) -> None:
        self._client = client
        self._cache = cache
        self._data_dir = data_dir
        self._td = td
        self._on_own_bundle = on_own_bundle
        self._on_policy = on_policy
        self._rand = rand or random.Random()
        self._rotation = rotation
        self._idle_timeout = idle_timeout
        self._state_data = SyncState(permissive_listeners)
        self._policy_revision = metrics.gauge("trustmesh_agent_policy_revision", "policy revision the agent holds")
        self._server_state = server_state or ServerState(metrics)
        self._reconnects = metrics.counter("trustmesh_agent_sync_reconnects_total", "sync reconnects by reason",
                                           ["reason"])
        self._revision = metrics.gauge("trustmesh_agent_sync_revision", "store revision the agent has applied")

    # Read by the agent (policy for its listeners) and by tests.
    @property
    def revision(self) -> int:
        return self._state_data.revision

    @property
    def entries(self) -> dict[str, AgentEntry]:
        return self._state_data.entries

    @property
    def bundles(self) -> dict[TrustDomain, Bundle]:
        return self._state_data.bundles

    @property
    def policy(self) -> Policy:
        return self._state_data.policy

    @property
    def state(self) -> str:
        return self._server_state.state

    def _set_state(self, state: str) -> bool:
        return self._server_state.set(state)

    # --- persistence ----------------------------------------------------------------------

    def load_persisted(self) -> None:
        path = self._data_dir / STATE_FILE
        if not path.exists():
            return
        try:
            self._state_data.load_json(path.read_bytes())
        except (OSError, ValueError) as err:
            log_event(log, "sync_state_unreadable", level=logging.WARNING, path=str(path), error=str(err))
            return
        self._publish()
        log_event(log, "sync_state_loaded", entries=len(self.entries), revision=self.revision)

    def _persist(self) -> None:
        atomic_write(self._data_dir / STATE_FILE, self._state_data.to_json(), 0o600)

    def _publish(self) -> None:
        self._policy_revision.set(self.policy.revision)
        self._revision.set(self.revision)
        if self._on_policy is not None:
            self._on_policy(self.policy)
        self._cache.set_entries(self.entries)
        self._cache.set_bundles(BundleSet(self.bundles.values()))
        own = self.bundles.get(self._td)
        if own is not None:
            self._on_own_bundle(own)

    # --- the stream -------------------------------------------------------------------------

    async def _next(self, call: grpc.aio.UnaryStreamCall, generation: int) -> node_pb2.SyncResponse | None:
        """The next message; None when the stream should be reopened on a new channel.
        Raises AioRpcError as the call does, and TimeoutError when the stream went silent."""
        read = asyncio.ensure_future(call.read())
        rotated = asyncio.ensure_future(self._client.wait_new_generation(generation))
        try:
            done, _ = await asyncio.wait({read, rotated}, timeout=self._idle_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (read, rotated):
                task.cancel()
        if read in done:
            message = read.result()  # raises the call's AioRpcError
            return None if message is grpc.aio.EOF else message
        if rotated in done:
            return None
        raise TimeoutError(f"no message from {self._client.address} for {self._idle_timeout:.0f}s")

    async def _stream_once(self) -> str:
        """Hold one stream until it ends; return why it ended without an error."""
        generation = self._client.generation
        self._state_data.start_stream()
        call = self._client.stub().Sync(self._state_data.request())
        try:
            while True:
                response = await self._next(call, generation)
                if response is None:
                    return "rotated" if self._client.generation != generation else "stream_ended"
                if self.state != "connected":
                    self._set_state("connected")
                    log_event(log, "sync_connected", server=self._client.address, revision=self.revision)
                if self._state_data.apply(response):
                    self._publish()
                    self._persist()
        finally:
            call.cancel()

    async def run(self) -> None:
        rotation = self._rotation
        attempt = 0
        while True:
            try:
                reason = await self._stream_once()
                attempt = 0
                if reason == "rotated":
                    log_event(log, "sync_reopened", reason="new_channel", server=self._client.address)
                # Rotated: reopen at once with the new SVID. Ended cleanly (a server
                # shutting down): pause a little, so a fleet does not reconnect in step.
                delay = 0.0 if reason == "rotated" else backoff_delay(0, base=rotation.backoff_base,
                                                                      rand=self._rand)
            except grpc.aio.AioRpcError as err:
                if self.state == "connected":
                    attempt = 0  # it was working: start the backoff afresh
                code = err.code()
                if code in REFUSED:
                    self._set_state("banned")
                    log_event(log, "agent_refused", level=logging.ERROR, call="Sync", code=code.name,
                              detail=err.details(),
                              hint="the server refuses this agent (banned, evicted, or its identity in use "
                                   "elsewhere: see detail); an operator must re-admit it; serving what it has "
                                   "until it expires")
                    reason, delay = "banned", rotation.refused_retry
                else:
                    reason, delay = await self._unreachable(code, err.details() or "", attempt)
                    attempt += 1
            except TimeoutError as err:
                reason, delay = await self._unreachable(None, str(err), attempt)
                attempt += 1
            except PolicyError as err:
                # A server newer than this agent (or a broken one): the policy in force stays,
                # and the operator is told, since retrying alone will not fix it.
                log_event(log, "policy_unusable", level=logging.ERROR, server=self._client.address, error=str(err),
                          hint="upgrade this agent to the server's release; the last policy it could read stays "
                               "in force")
                reason, delay = "bad_policy", rotation.refused_retry
            self._reconnects.inc(reason=reason)
            await asyncio.sleep(delay)

    async def _unreachable(self, code: grpc.StatusCode | None, detail: str, attempt: int) -> tuple[str, float]:
        """The stream failed for want of a server (`code` None: it went silent). Tell an
        untrusted server from an absent one, then try the next address after a backoff."""
        why = await self._client.untrusted() if code == grpc.StatusCode.UNAVAILABLE else None
        if why is not None:
            reason = "untrusted"
            if self._set_state("untrusted"):
                # Once per episode: retrying cannot fix this, the operator must.
                log_event(log, "server_untrusted", level=logging.ERROR, server=self._client.address,
                          error=self._client.untrusted_message, detail=why)
            else:
                log_event(log, "server_untrusted", level=logging.DEBUG, server=self._client.address,
                          detail=why, attempt=attempt)
        else:
            reason = "unreachable"
            self._set_state("unreachable")
            log_event(log, "server_unreachable", level=logging.WARNING, server=self._client.address,
                      code=code.name if code is not None else "SILENT", detail=detail, attempt=attempt)
        self._client.failover()
        return reason, backoff_delay(attempt, base=self._rotation.backoff_base, cap=self._rotation.backoff_cap,
                                     rand=self._rand)
