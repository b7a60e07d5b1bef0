"""Where the call being served comes from, for the audit log.

The call layer (api/calls.py) sets it for callers that carry a source (an address, or the
pid on the admin socket); the audit log (audit.py) adds it to every event recorded while
that call is served, so no domain service has to pass it along. A context variable: grpc.aio
serves each call in a task of its own, so the value is that call's alone.
"""

from __future__ import annotations

from contextvars import ContextVar

call_source: ContextVar[str] = ContextVar("trustmesh_call_source", default="")
