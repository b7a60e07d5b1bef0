"""The Admin service on the admin unix socket (skeleton: being filled in)."""

from __future__ import annotations

import grpc

from controlplane.api.node import NodeAPI
from controlplane.runtime import ServerRuntime


class AdminAPI:
    def __init__(self, rt: ServerRuntime, node_api: NodeAPI) -> None:
        self._rt = rt
        self._node_api = node_api

    def register(self, server: grpc.aio.Server) -> None:
        """Add the Admin servicer to `server`."""
