"""Structured logs: one event per line, ``key=value`` pairs, never a secret.

Every component logs through ``log_event(logger, event, **fields)`` so the lines can be
grepped and parsed (``ts=… level=info component=server event=ready bind=127.0.0.1:8081``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_./:@,+")


def _quote(value: object) -> str:
    text = str(value)
    if text and all(ch in _SAFE for ch in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [
            f"ts={ts}.{int(record.msecs):03d}Z",
            f"level={record.levelname.lower()}",
            f"component={_quote(record.name.removeprefix('trustmesh.'))}",
            f"event={_quote(record.getMessage())}",
        ]
        fields: dict[str, Any] = getattr(record, "fields", {})
        parts.extend(f"{key}={_quote(value)}" for key, value in fields.items())
        if record.exc_info and record.exc_info[1] is not None:
            parts.append(f"error={_quote(repr(record.exc_info[1]))}")
        return " ".join(parts)


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # grpclib logs every cancelled stream (a workload hanging up) at INFO: routine, not news.
    logging.getLogger("grpclib").setLevel(max(logging.WARNING, root.level))
    # httpx logs every request at INFO; a federation refresh logs its own outcome as an event.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    logger.log(level, event, extra={"fields": fields})


class RateLimitedLog:
    """At most one line per key per `interval` seconds, for events a caller can trigger at
    will (refusals, resource errors): a flood must not become a flood of log lines. Lines held
    back are counted and reported as ``suppressed=N`` on the next line of their key. At most
    `max_keys` keys are remembered; past that, keys share one budget (one line per interval)."""

    _OVERFLOW = ("<other keys>",)

    def __init__(self, logger: logging.Logger, interval: float = 60.0, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._max_keys = max_keys
        self._clock = clock
        self._keys: dict[tuple[object, ...], tuple[float, int]] = {}  # key -> (last line at, held back since)
        self._pruned = float("-inf")

    def log(self, key: tuple[object, ...], event: str, level: int = logging.WARNING, **fields: Any) -> bool:
        """Log `event` unless a line of `key` went out less than `interval` ago; True if logged."""
        now = self._clock()
        if key not in self._keys and len(self._keys) >= self._max_keys:
            if now - self._pruned >= 1.0:  # at most once a second, however many new keys come
                self._keys = {k: v for k, v in self._keys.items() if now - v[0] < self._interval}
                self._pruned = now
            if len(self._keys) >= self._max_keys:
                key = self._OVERFLOW
        last = self._keys.get(key)
        if last is not None and now - last[0] < self._interval:
            self._keys[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            fields["suppressed"] = last[1]
        self._keys[key] = (now, 0)
        log_event(self._logger, event, level, **fields)
        return True
