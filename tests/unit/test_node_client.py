"""The node client's channels: a new one per agent SVID, the old one closed after a grace
period (a rotation every half-life must not leak channels), the failed one at once."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

from cryptography.hazmat.primitives import serialization

from trustmesh.agent.attestation import AgentIdentity
from trustmesh.agent.node_client import NodeClient
from trustmesh.keys import generate_private_key
from trustmesh.spiffeid import SpiffeId, TrustDomain
from trustmesh.x509svid import build_ca_certificate, build_leaf_certificate

TD = TrustDomain("example.org")
NOW = datetime.now(timezone.utc)


def identity() -> tuple[AgentIdentity, bytes]:
    root_key, key = generate_private_key(), generate_private_key()
    root = build_ca_certificate(trust_domain=TD, public_key=root_key.public_key(), issuer=None, issuer_key=root_key,
                                not_before=NOW - timedelta(hours=1), not_after=NOW + timedelta(days=1),
                                path_length=1, common_name="root")
    sid = SpiffeId.parse("spiffe://example.org/agent/n1")
    leaf = build_leaf_certificate(spiffe_id=sid, public_key=key.public_key(), issuer=root,
                                  issuer_key=root_key, not_before=NOW, not_after=NOW + timedelta(hours=1))
    return AgentIdentity(sid, key, (leaf,)), root.public_bytes(serialization.Encoding.PEM)


async def test_rotation_retires_the_channel_and_closes_it_after_the_grace() -> None:
    ident, roots = identity()
    client = NodeClient(["127.0.0.1:1", "127.0.0.1:2"], roots, TD, ident, retire_grace=10)
    client.stub()
    generation = client.generation
    client.use_identity(identity()[0])
    assert client.generation == generation + 1
    assert await client.close_retired() == 0, "requests in flight on it may still finish"
    assert await client.close_retired(now=time.monotonic() + 11) == 1
    client.stub()
    client.failover()
    assert client.address == "127.0.0.1:2"
    assert await client.close_retired() == 1, "a failed address's channel goes at once"
    client.use_roots(roots)  # the same roots: nothing changes
    assert client.generation == generation + 2
    await client.close()


async def test_waiters_learn_of_a_new_generation() -> None:
    import asyncio

    ident, roots = identity()
    client = NodeClient(["127.0.0.1:1"], roots, TD, ident)
    waiter = asyncio.create_task(client.wait_new_generation(client.generation))
    await asyncio.sleep(0)
    assert not waiter.done()
    client.use_identity(ident)
    assert await asyncio.wait_for(waiter, 1) == 1
    await client.close()
