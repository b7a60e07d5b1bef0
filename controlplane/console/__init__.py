"""The web console (issue 19): HTTPS pages for operators, served by the server process.

It is a client of the server's own admin and login listeners, not a second way in: an
operator logs in with password and one-time code, the console holds the operator
certificate it got for them in memory, and every page's data is an Admin API call made with
that certificate, so roles, step-up codes and the audit log apply as for the CLI.
admin.py reaches the server, sessions.py keeps who is logged in, views.py turns Admin
replies into the JSON of CONTRACT.md, app.py is the HTTP side; the pages themselves are the
static files in static/.
"""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path

from trustmesh.controlplane.console.admin import Upstream
from trustmesh.controlplane.console.app import Console, ConsoleSettings
from trustmesh.errors import TrustmeshError
from trustmesh.hostport import split_host_port
from trustmesh.httpserver import HttpServer, Limits, serve_app
from trustmesh.logs import log_event

log = logging.getLogger("trustmesh.console")

STATIC_DIR = Path(__file__).resolve().parent / "static"
# Serve the pages from another directory: a working copy while developing them, or a test's own.
STATIC_DIR_ENV = "TRUSTMESH_CONSOLE_STATIC_DIR"


def static_dir() -> Path:
    return Path(os.environ[STATIC_DIR_ENV]) if os.environ.get(STATIC_DIR_ENV) else STATIC_DIR
# The handshake and each request head within 10 s; a browser sends cookies and many headers.
LIMITS = Limits(request_timeout=10.0, max_line_bytes=8 * 1024, max_header_bytes=8 * 1024, max_headers=64)


async def serve_console(console: Console, address: str, ctx: ssl.SSLContext) -> HttpServer:
    host, port = split_host_port(address, listening=True)
    try:
        server = await serve_app(console.application(), host, port, ssl_context=ctx, limits=LIMITS)
    except OSError as err:
        raise TrustmeshError(f"cannot serve the console on {address}: {err.strerror}; pick another "
                             "--console-bind") from err
    log_event(log, "console_listening", address=server.address, static=str(console.static_dir))
    return server


__all__ = ["STATIC_DIR", "STATIC_DIR_ENV", "Console", "ConsoleSettings", "Upstream", "serve_console", "static_dir"]
