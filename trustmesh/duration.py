"""Human durations on the command line and in config files: ``90s``, ``5m``, ``1h30m``, ``7d``."""

from __future__ import annotations

import re
from datetime import timedelta

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_PART = re.compile(r"(\d+)(ms|s|m|h|d)")


def parse_duration(text: str | int | float) -> timedelta:
    """Parse ``1h``, ``30m``, ``1h30m``, ``45s``, ``7d`` or a bare number of seconds.

    Raises ValueError with a message that shows the accepted forms.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return timedelta(seconds=text)
    s = text.strip().lower()
    if s.isdigit():
        return timedelta(seconds=int(s))
    pos, total = 0, 0.0
    for match in _PART.finditer(s):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not s or pos != len(s):
        raise ValueError(
            f"invalid duration {text!r}: use a number with a unit, e.g. 90s, 5m, 1h, 1h30m, 7d"
        )
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """The shortest exact form: ``1h30m``, ``45s``, ``0s``."""
    seconds = int(value.total_seconds())
    if seconds == 0:
        return "0s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            out.append(f"{count}{unit}")
    return "".join(out)
