"""Where the call being served comes from, for the audit log.

The call layer (api/calls.py) sets it for callers that carry a source (an address, or the
pid on the admin socket); the audit log (audit.py) adds it to every event recorded while
that call is served, so no domain service has to pass it along. A context variable: grpc.aio
serves each call in a task of its own, so the value is that call's alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

call_source: ContextVar[str] = ContextVar("trustmesh_call_source", default="")
# The role the call was admitted under (an operator's role, "admin-socket" on the admin socket,
# "admin" for an admin SVID), which audit.py adds to every event of the call as `role`.
call_role: ContextVar[str] = ContextVar("trustmesh_call_role", default="")


@contextmanager
def source_of_call(source: str) -> Iterator[None]:
    """Events recorded inside name `source` (before the call layer has set it for the call)."""
    token = call_source.set(source)
    try:
        yield
    finally:
        call_source.reset(token)
