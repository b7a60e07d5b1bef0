"""Console sessions: who is logged in from which browser, in memory only.

A session is created by a successful login and holds what the console acts with: the
operator's certificate and private key (inside its AdminClient, never written anywhere) and
the session's CSRF token. The browser holds only a random session token in a cookie; the
store is keyed by that token's SHA-256, so a lookup compares digests, not the secret, and a
dump of the keys is no list of cookies. Sessions end at the certificate's expiry, at logout,
at the next login from the same browser, or when the store is full (the oldest goes first).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from trustmesh.controlplane.console.admin import AdminClient

MAX_SESSIONS = 1000
TOKEN_BYTES = 32


def new_token() -> str:
    """32 random bytes, URL-safe base64: a session ID, a CSRF token, a login-form token."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def same_token(given: str | None, expected: str) -> bool:
    """Whether `given` is `expected`, in time independent of where they differ."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass
class AuditCursor:
    """The newest audit event a session's overview has read, and the times of the anomalies
    (detect.anomaly events) among the recent ones; one refresh at a time moves it."""

    seq: int = 0
    anomaly_times: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass
class Session:
    operator: str
    spiffe_id: str
    roles: tuple[str, ...]
    expires_at: float  # the operator certificate's not-after, unix seconds
    browser: str  # the browser's address, for the console's own log lines
    client: AdminClient  # the operator's certificate and key, and its channels to the server
    csrf: str = field(default_factory=new_token)
    streams: int = 0  # open live-update (SSE) streams
    ended: asyncio.Event = field(default_factory=asyncio.Event)  # set at logout, expiry or eviction
    # How far the overview has read the audit log, so each refresh reads only what is new.
    audit: AuditCursor = field(default_factory=lambda: AuditCursor())

    def remaining(self, now: float) -> float:
        return self.expires_at - now


class SessionStore:
    """At most `max_sessions` sessions, the oldest dropped first; every session that ends has
    its `ended` event set and its client closed."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, clock: Callable[[], float] = time.time) -> None:
        self._max = max_sessions
        self._clock = clock
        self._sessions: OrderedDict[bytes, Session] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    async def add(self, session: Session) -> str:
        """Keep `session` under a new token; returns the token (the cookie's value)."""
        token = new_token()
        self._sessions[_digest(token)] = session
        while len(self._sessions) > self._max:
            _, oldest = self._sessions.popitem(last=False)
            await _end(oldest)
        return token

    async def lookup(self, token: str | None) -> tuple[Session | None, str]:
        """The live session of `token`, or None and why: "missing" (no token), "unknown" (not
        a session of this console, or ended) or "expired" (it ends here)."""
        if not token:
            return None, "missing"
        key = _digest(token)
        session = self._sessions.get(key)
        if session is None:
            return None, "unknown"
        if session.remaining(self._clock()) <= 0:
            del self._sessions[key]
            await _end(session)
            return None, "expired"
        return session, ""

    async def end(self, token: str | None) -> Session | None:
        """End the session of `token`, if there is one; returns it."""
        session = self._sessions.pop(_digest(token), None) if token else None
        if session is not None:
            await _end(session)
        return session

    async def discard(self, session: Session) -> None:
        """End `session` when its token is not at hand (the server stopped accepting it)."""
        for key, held in list(self._sessions.items()):
            if held is session:
                del self._sessions[key]
                await _end(session)

    async def sweep(self) -> int:
        """End every expired session (their certificates are dead anyway); how many ended."""
        now = self._clock()
        expired = [k for k, s in self._sessions.items() if s.remaining(now) <= 0]
        for key in expired:
            await _end(self._sessions.pop(key))
        return len(expired)

    async def close(self) -> None:
        while self._sessions:
            _, session = self._sessions.popitem(last=False)
            await _end(session)


async def _end(session: Session) -> None:
    session.ended.set()
    await session.client.close()
