"""Clipping untrusted text before it goes into a message, a log line, an audit event or a record.

Callers can send megabytes where a name is expected; an error message quoting them whole
would bloat logs and the audit chain, and a gRPC status message over 16 KiB is dropped by
the transport. Every place that echoes caller input clips it here, to one of these limits.
"""

from __future__ import annotations

MARKER = "..."

# Caller input quoted in an error message, a log line, or as the subject of a refusal.
SHOWN = 96
# An entry ID echoed back to (or audited for) an agent that sent one: IDs are no longer.
ENTRY_ID = 64
# An identity, address or reason an agent reports, listed in an aggregated audit event.
CLAIMED = 256
# Free text stored with a policy revision.
AUTHOR = 256
COMMENT = 1024
# The reason recorded in an audit event (an error message, itself quoting clipped input).
REASON = 2000


def clip(text: str, limit: int) -> str:
    """`text` if it has at most `limit` characters, else its start ending in "...", `limit` long,
    so that a clipped value is never mistaken for the whole."""
    if len(text) <= limit:
        return text
    if limit <= len(MARKER):
        return text[:limit]
    return text[: limit - len(MARKER)] + MARKER


def shown(text: str, limit: int = SHOWN) -> str:
    """`text` clipped and quoted (repr), ready to stand in a message."""
    return repr(clip(text, limit))
