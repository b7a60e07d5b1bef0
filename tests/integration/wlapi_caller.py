"""A hostile Workload API caller, run as its own process (often under another uid by setpriv).

It speaks HTTP/2 itself (with h2) on a socket it controls, so it can do what gRPC libraries
never do: share its connection with a forked child, announce a request of any size, or just
hold connections open. Prints one JSON line per result.

    wlapi_caller.py fetch SOCKET
    wlapi_caller.py fork-exec SOCKET PROGRAM [ARGS...]   the child asks once PROGRAM runs
    wlapi_caller.py oversize SOCKET BYTES
    wlapi_caller.py flood SOCKET COUNT                   then waits until stdin closes
    wlapi_caller.py headers SOCKET COUNT                 COUNT connections, each 1 MiB of header block
"""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
import time
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from trustmesh._proto.spiffe.workload import workload_pb2  # noqa: E402


def call(sock: socket.socket, method: str, announce: int | None = None) -> dict[str, Any]:
    """One FetchX509SVID-style call; `announce` claims a request that long and sends as much
    of it as flow control lets through. Returns the gRPC status, message and SPIFFE IDs."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [(":method", "POST"), (":scheme", "http"), (":authority", "localhost"),
                               (":path", f"/SpiffeWorkloadAPI/{method}"), ("content-type", "application/grpc"),
                               ("te", "trailers"), ("workload.spiffe.io", "true")])
    pending = b"\0" + (announce or 0).to_bytes(4, "big")
    left = announce or 0
    ended = False
    result: dict[str, Any] = {"status": None, "message": "", "ids": [], "sent": 0}
    body = b""
    sock.settimeout(20)
    while True:
        # Send what flow control allows: the prefix, then (oversize) zeros up to `announce`.
        while not ended and stream in conn.streams:
            window = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if pending:
                chunk, pending = pending[:window], pending[window:]
            else:
                chunk = bytes(min(window, left))
                left -= len(chunk)
            if not chunk and (pending or left):
                break  # the window is shut: wait for the server
            conn.send_data(stream, chunk, end_stream=not pending and not left)
            result["sent"] += len(chunk)
            ended = not pending and not left
        sock.sendall(conn.data_to_send())
        try:
            data = sock.recv(65536)
        except TimeoutError:
            result["status"] = "timeout"
            return result
        if not data:
            result["status"] = result["status"] or "closed"
            return result
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.DataReceived):
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if len(body) >= 5 and len(body) >= 5 + int.from_bytes(body[1:5], "big"):
                    message = workload_pb2.X509SVIDResponse.FromString(body[5:5 + int.from_bytes(body[1:5], "big")])
                    result["ids"] = [s.spiffe_id for s in message.svids]
                    result["status"] = 0
                    return result  # a streaming call never ends on its own: one message is the answer
            elif isinstance(event, (h2.events.TrailersReceived, h2.events.ResponseReceived)):
                headers = dict(event.headers)
                if "grpc-status" in headers:
                    result["status"] = int(headers["grpc-status"])
                    result["message"] = headers.get("grpc-message", "")
                    return result
            elif isinstance(event, h2.events.StreamReset):
                result["status"] = f"reset {event.error_code}"
                return result
            elif isinstance(event, h2.events.ConnectionTerminated):
                result["status"] = f"goaway {event.error_code}"
                return result
        sock.sendall(conn.data_to_send())


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "fetch":
        emit(call(connect(path), "FetchX509SVID"))
    elif mode == "fork-exec":
        program = os.path.realpath(sys.argv[3])
        sock = connect(path)
        parent = os.getpid()
        if os.fork() == 0:
            # The child keeps the connection and asks once its parent runs the target program.
            deadline = time.monotonic() + 10
            while os.path.realpath(f"/proc/{parent}/exe") != program and time.monotonic() < deadline:
                time.sleep(0.01)
            emit(call(sock, "FetchX509SVID"))
            os._exit(0)
        os.execv(program, sys.argv[3:])
    elif mode == "oversize":
        emit(call(connect(path), "FetchX509SVID", announce=int(sys.argv[3])))
    elif mode == "flood":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        held = []
        for _ in range(int(sys.argv[3])):
            try:
                held.append(connect(path))
            except OSError as err:
                emit({"connected": len(held), "error": str(err)})
                break
        emit({"connected": len(held)})
        sys.stdin.read()  # hold them until the test closes our stdin
    elif mode == "headers":
        # HEADERS without END_HEADERS, then CONTINUATION frames: flow control does not apply.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        held, sent = [], 0
        for _ in range(int(sys.argv[3])):
            try:
                sock = connect(path)
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b""))
                sock.sendall(_frame(1, 0, 1, bytes(16_000)))
                for _ in range(63):
                    sock.sendall(_frame(9, 0, 1, bytes(16_384)))
                    sent += 16_384
            except OSError:
                pass  # the agent hung up on us: what we wanted to know
            held.append(sock)
        emit({"connections": len(held), "sent": sent})
    else:
        raise SystemExit(f"unknown mode {mode}")


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


if __name__ == "__main__":
    main()
