"""Helpers the benchmarks share: register entries fast, percentiles, result rows."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.harness import ServerProcess  # noqa: E402
from trustmesh._proto.trustmesh.v1 import admin_pb2, admin_pb2_grpc, types_pb2  # noqa: E402
from trustmesh.naming import agent_id  # noqa: E402
from trustmesh.spiffeid import TrustDomain  # noqa: E402
from trustmesh.wire import selector_to_pb  # noqa: E402


async def create_entries(server: ServerProcess, node: str, count: int, *, prefix: str = "svc",
                         start: int = 0, parallel: int = 32) -> list[str]:
    """`count` entries for `node` through the admin API (the CLI would start a process each)."""
    import asyncio

    async with server.admin_channel() as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        ids: list[str] = [""] * count
        semaphore = asyncio.Semaphore(parallel)

        async def one(i: int) -> None:
            entry = types_pb2.Entry(spiffe_id=f"spiffe://{server.trust_domain}/{prefix}-{start + i}",
                                    parent_id=str(agent_id(TrustDomain(server.trust_domain), node)),
                                    selectors=[selector_to_pb(f"unix:uid:{10000 + start + i}")])
            async with semaphore:
                reply = await stub.CreateEntry(admin_pb2.CreateEntryRequest(entry=entry), timeout=60)
            ids[i] = reply.entry.id

        await asyncio.gather(*(one(i) for i in range(count)))
        return ids


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def row(name: str, value: float, unit: str, reference: str, reference_value: float, goal: str,
        params: dict[str, Any], ratio: float | None = None) -> dict[str, object]:
    if ratio is None:
        ratio = value / reference_value if reference_value else 0.0
    return {"name": name, "value": round(value, 3), "unit": unit, "reference": reference,
            "reference_value": round(reference_value, 3), "ratio": round(ratio, 3), "goal": goal, "params": params}


async def attested_channel(token: str, cfg: dict[str, str]) -> Any:
    """A lightweight agent: attest with `token` over the real Node protocol, then a grpc.aio
    channel to the Node API with the agent SVID it got (cfg: bind, attest, bundle, dns)."""
    import grpc
    from cryptography.hazmat.primitives import serialization

    from tests.integration.node_client import pem_chain
    from trustmesh._proto.trustmesh.v1 import node_pb2, node_pb2_grpc
    from trustmesh.keys import generate_private_key
    from trustmesh.x509svid import build_csr

    roots = Path(cfg["bundle"]).read_bytes()
    options = [("grpc.ssl_target_name_override", cfg["dns"])]
    key = generate_private_key()
    async with grpc.aio.secure_channel(cfg["attest"], grpc.ssl_channel_credentials(roots), options=options) as ch:
        call = node_pb2_grpc.NodeStub(ch).Attest(timeout=120)
        await call.write(node_pb2.AttestRequest(csr=build_csr(key), join_token=token))
        await call.done_writing()
        reply = await call.read()
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    creds = grpc.ssl_channel_credentials(roots, key_pem, pem_chain(list(reply.result.svid_chain)))
    return grpc.aio.secure_channel(cfg["bind"], creds, options=options)

