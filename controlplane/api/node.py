"""The agent-facing Node service (skeleton: being filled in by the control-plane issue)."""

from __future__ import annotations

import asyncio

import grpc

from controlplane.runtime import ServerRuntime


class NodeAPI:
    def __init__(self, rt: ServerRuntime) -> None:
        self._rt = rt

    def register(self, server: grpc.aio.Server) -> None:
        """Add the Node servicer to `server`."""

    async def run(self, stop: asyncio.Event) -> None:
        """Background work (the store change feed driving the authorized-entry index)."""
        await stop.wait()
