"""The sync stream from the control plane: the entries and bundles this node may use.

Applies snapshot pages atomically (on the last page) and deltas as they come; remembers
the last revision and resumes from it; keeps the last known state on disk so a restart
during an outage still serves. Reconnects with capped exponential backoff and full jitter,
and tells apart in logs and the `trustmesh_agent_server_state` metric: connected, server
unreachable, and agent banned or evicted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import Callable
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from trustmesh._proto.trustmesh.v1 import node_pb2, types_pb2
from trustmesh.policy import Policy
from trustmesh.policy.wire import policy_from_pb, policy_to_pb
from trustmesh.bundle import Bundle, BundleSet
from trustmesh.errors import BundleError
from trustmesh.logs import log_event
from trustmesh.metrics import Registry
from trustmesh.spiffeid import TrustDomain

from agent.attestation import write_private
from agent.backoff import backoff_delay
from agent.convert import AgentEntry, bundle_from_pb, entry_from_pb
from agent.node_client import NodeClient
from agent.svid_cache import SvidCache

log = logging.getLogger("trustmesh.sync")

STATE_FILE = "sync_state.json"
STATES = ("connected", "unreachable", "banned")
BANNED_RETRY = 60.0


class SyncClient:
    def __init__(self, client: NodeClient, cache: SvidCache, data_dir: Path, td: TrustDomain, metrics: Registry,
                 on_own_bundle: Callable[[Bundle], None], rand: random.Random | None = None,
                 on_policy: Callable[[Policy], None] | None = None) -> None:
        self._on_policy = on_policy
        self._client = client
        self._cache = cache
        self._data_dir = data_dir
        self._td = td
        self._on_own_bundle = on_own_bundle
        self._rand = rand or random.Random()
        self.revision = 0
        self.entries: dict[str, AgentEntry] = {}
        self.bundles: dict[TrustDomain, Bundle] = {}
        # The allowlists deciding for this node's services; kept across restarts and outages.
        self.policy = Policy()
        self._policy_revision = metrics.gauge("trustmesh_agent_policy_revision", "policy revision the agent holds")
        self._state = metrics.gauge("trustmesh_agent_server_state", "1 for the agent's current state", ["state"])
        self._reconnects = metrics.counter("trustmesh_agent_sync_reconnects_total", "sync reconnects by reason",
                                           ["reason"])
        self.state = ""
        self._set_state("unreachable")

    def _set_state(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        for s in STATES:
            self._state.set(1 if s == state else 0, state=s)

    # --- persistence ----------------------------------------------------------------------

    def load_persisted(self) -> None:
        path = self._data_dir / STATE_FILE
        if not path.exists():
            return
        try:
            doc = json.loads(path.read_text())
            entries = {e["id"]: AgentEntry.from_dict(e) for e in doc["entries"]}
            bundles = {TrustDomain(td): Bundle.from_jwks(jwks.encode(), TrustDomain(td))
                       for td, jwks in doc["bundles"].items()}
            policy = (policy_from_pb(types_pb2.CompiledPolicy.FromString(base64.b64decode(doc["policy"])))
                      if doc.get("policy") else Policy())
        except (OSError, ValueError, KeyError, TypeError, BundleError, DecodeError) as err:
            log_event(log, "sync_state_unreadable", level=logging.WARNING, path=str(path), error=str(err))
            return
        self.revision = int(doc.get("revision", 0))
        self.entries, self.bundles, self.policy = entries, bundles, policy
        self._publish()
        log_event(log, "sync_state_loaded", entries=len(entries), revision=self.revision)

    def _persist(self) -> None:
        doc = {"revision": self.revision, "entries": [e.to_dict() for e in self.entries.values()],
               "policy": base64.b64encode(policy_to_pb(self.policy).SerializeToString()).decode(),
               "bundles": {td.name: b.to_jwks().decode() for td, b in self.bundles.items()}}
        write_private(self._data_dir / STATE_FILE, json.dumps(doc, sort_keys=True).encode(), 0o600)

    def _publish(self) -> None:
        self._policy_revision.set(self.policy.revision)
        if self._on_policy is not None:
            self._on_policy(self.policy)
        self._cache.set_entries(self.entries)
        self._cache.set_bundles(BundleSet(self.bundles.values()))
        own = self.bundles.get(self._td)
        if own is not None:
            self._on_own_bundle(own)

    # --- the stream -------------------------------------------------------------------------

    def _apply(self, response: node_pb2.SyncResponse, pending: dict[str, AgentEntry]) -> bool:
        """Apply one message; True when the visible state changed."""
        body = response.WhichOneof("body")
        if body == "snapshot":
            snap = response.snapshot
            pending.update((e.id, entry_from_pb(e)) for e in snap.entries)
            for b in snap.bundles:
                self.bundles[TrustDomain(b.trust_domain)] = bundle_from_pb(b)
            if not snap.last:
                return False
            self.entries = dict(pending)
            pending.clear()
            self.policy = policy_from_pb(snap.policy)
        elif body == "delta":
            delta = response.delta
            for e in delta.upserted_entries:
                self.entries[e.id] = entry_from_pb(e)
            for entry_id in delta.deleted_entry_ids:
                self.entries.pop(entry_id, None)
            for b in delta.bundles:
                self.bundles[TrustDomain(b.trust_domain)] = bundle_from_pb(b)
            for td in delta.deleted_bundles:
                self.bundles.pop(TrustDomain(td), None)
            if delta.HasField("policy"):
                self.policy = policy_from_pb(delta.policy)
        else:
            return False
        self.revision = max(self.revision, response.revision)
        return True

    async def _stream_once(self) -> None:
        call = self._client.stub().Sync(node_pb2.SyncRequest(since_revision=self.revision))
        pending: dict[str, AgentEntry] = {}
        try:
            async for response in call:
                if self.state != "connected":
                    self._set_state("connected")
                    log_event(log, "sync_connected", server=self._client.address, revision=self.revision)
                if self._apply(response, pending):
                    self._publish()
                    self._persist()
        finally:
            call.cancel()

    async def run(self) -> None:
        attempt = 0
        while True:
            try:
                await self._stream_once()
                reason, delay = "stream_ended", backoff_delay(0, rand=self._rand)
            except grpc.aio.AioRpcError as err:
                if self.state == "connected":
                    attempt = 0  # it was working: start the backoff afresh
                code = err.code()
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    self._set_state("banned")
                    log_event(log, "agent_refused", level=logging.ERROR, code=code.name, detail=err.details(),
                              hint="the agent is banned or evicted by the server; an operator must re-admit it; "
                                   "serving what it has until it expires")
                    reason, delay = "banned", BANNED_RETRY
                else:
                    self._set_state("unreachable")
                    log_event(log, "server_unreachable", level=logging.WARNING, server=self._client.address,
                              code=code.name, detail=err.details(), attempt=attempt)
                    self._client.failover()
                    reason, delay = "unreachable", backoff_delay(attempt, rand=self._rand)
                    attempt += 1
            else:
                attempt = 0
            self._reconnects.inc(reason=reason)
            await asyncio.sleep(delay)
