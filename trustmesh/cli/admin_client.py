"""The CLI's connection to the server's admin socket, shared by every admin command."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc

from trustmesh._proto.trustmesh.v1 import admin_pb2_grpc
from trustmesh.errors import TrustmeshError

ENV = "TRUSTMESH_ADMIN_SOCKET"
DEFAULT_SOCKET = "./.trustmesh/server/admin.sock"
TIMEOUT = 30.0

T = TypeVar("T")


class AdminCallError(TrustmeshError):
    """The server refused an admin call; the message is the server's own."""


def add_socket_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-socket",
        help=f"the server's admin socket (default ${ENV}, else {DEFAULT_SOCKET})",
    )


def socket_path(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "admin_socket", None) or os.environ.get(ENV) or DEFAULT_SOCKET)


def call(args: argparse.Namespace, invoke: Callable[[admin_pb2_grpc.AdminStub], T]) -> T:
    """Run one admin RPC; turn transport and status errors into messages a person can act on."""
    path = socket_path(args)
    if not path.exists():
        raise AdminCallError(
            f"cannot reach the trustmesh server at {path}: is `trustmesh server run` running? "
            f"set --admin-socket or {ENV}"
        )
    with grpc.insecure_channel(f"unix:{path}") as channel:
        try:
            return invoke(admin_pb2_grpc.AdminStub(channel))
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise AdminCallError(
                    f"cannot reach the trustmesh server at {path} ({err.details()}): "
                    "is it running, and may you open the socket?"
                ) from None
            raise AdminCallError(f"{err.details()} ({code.name})") from None


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))
