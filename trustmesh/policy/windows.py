"""Time windows on allow rules: `when: {days: [mon, fri], hours: "08:00-19:00", timezone: Europe/London}`.

A window is wall-clock time in its IANA zone. It holds at an instant when that instant,
converted to the zone, falls on one of its days between its start (inclusive) and its end
(exclusive). Hours whose end is before their start cross midnight; the day named is the day
the window starts, so `days: [fri], hours: "22:00-02:00"` holds Friday 22:00 to Saturday 02:00.

Daylight saving, deliberately: only instants are ever converted (never local times), so
- a local time that does not exist (the spring-forward gap) is never observed: a window
  opening inside the gap opens at the first instant after it, one closing inside the gap
  closes at the same instant; a window lying wholly inside the gap never holds that day;
- the repeated hour at fall-back is wall-clock time like any other: both passes of it are
  inside a window that covers it (01:00-01:30 holds twice that night, an hour of real time).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from trustmesh.policy.routes import PolicyError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # datetime.weekday() order
EVERY_DAY = 0x7F
MINUTES_PER_DAY = 24 * 60
MAX_WINDOWS_PER_RULE = 16
_HOURS = re.compile(r"([0-9]{2}):([0-9]{2})-([0-9]{2}):([0-9]{2})")
# The shape of an IANA name (Europe/London, America/Argentina/Buenos_Aires, Etc/GMT+5, UTC):
# checked before zoneinfo sees it, so no name ever reads a file outside the tz database.
_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+-]{0,63}(?:/[A-Za-z0-9_+-]{1,64}){0,3}")


def zone(name: object) -> ZoneInfo:
    """The IANA zone `name`; PolicyError naming the problem (python's zoneinfo finds zones in
    the system tz database, /usr/share/zoneinfo, or the tzdata package)."""
    if not isinstance(name, str) or not _ZONE_NAME.fullmatch(name):
        raise PolicyError(f"{name!r} is not a time zone: use an IANA name like Europe/London or UTC")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as err:  # OSError: a directory, an unreadable file
        raise PolicyError(f"unknown time zone {name!r}: use an IANA name like Europe/London or UTC (python's "
                          "zoneinfo found no such zone in the system tz database or the tzdata package)") from err


def parse_hours(text: object) -> tuple[int, int]:
    """"HH:MM-HH:MM" as (start, end) minutes after midnight; end 24:00 is midnight at the end."""
    match = _HOURS.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise PolicyError(f"{text!r} is not hours: use \"HH:MM-HH:MM\", e.g. \"08:00-19:00\" or \"22:00-02:00\"")
    sh, sm, eh, em = (int(g) for g in match.groups())
    if sh > 23 or sm > 59 or em > 59 or eh > 24 or (eh == 24 and em != 0):
        raise PolicyError(f"{text!r}: hours are 00:00 to 23:59 (and 24:00 as an end)")
    start, end = sh * 60 + sm, eh * 60 + em
    if start == end:
        raise PolicyError(f"{text!r} starts and ends at the same time: use \"00:00-24:00\" for the whole day")
    # An end of 00:00 is the midnight that ends the day: "12:00-00:00" is "12:00-24:00".
    return start, end or MINUTES_PER_DAY


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def _days_text(mask: int) -> str:
    """mon-fri, sat,sun or mon,wed-fri: runs of three or more days as a range."""
    on = [i for i in range(7) if mask & (1 << i)]
    parts: list[str] = []
    i = 0
    while i < len(on):
        j = i
        while j + 1 < len(on) and on[j + 1] == on[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{DAYS[on[i]]}-{DAYS[on[j]]}")
        else:
            parts.extend(DAYS[k] for k in on[i:j + 1])
        i = j + 1
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class TimeWindow:
    days: int  # bitmask, bit 0 = Monday
    start: int  # minutes after local midnight
    end: int  # minutes after local midnight, 1..1440; end <= start: ends the next day
    timezone: str

    def __post_init__(self) -> None:
        if not 0 < self.days <= EVERY_DAY:
            raise PolicyError(f"days bitmask {self.days} is not 1..127")
        if not 0 <= self.start < MINUTES_PER_DAY or not 0 < self.end <= MINUTES_PER_DAY or self.start == self.end:
            raise PolicyError(f"window {self.start}-{self.end} minutes is not a time range")
        zone(self.timezone)  # the name is checked once, here; ZoneInfo caches the zone

    @property
    def crosses_midnight(self) -> bool:
        return self.end < self.start

    def holds(self, at: datetime) -> bool:
        """True when `at` (any aware datetime) lies inside this window."""
        local = at.astimezone(ZoneInfo(self.timezone))
        minute, day = local.hour * 60 + local.minute, local.weekday()
        if not self.crosses_midnight:
            return bool(self.days & (1 << day)) and self.start <= minute < self.end
        if minute >= self.start:
            return bool(self.days & (1 << day))
        # Before the end, the window that holds is the one that started the day before.
        return minute < self.end and bool(self.days & (1 << ((day - 1) % 7)))

    def __str__(self) -> str:
        days = "" if self.days == EVERY_DAY else _days_text(self.days) + " "
        return f"{days}{_hhmm(self.start)}-{_hhmm(self.end)} {self.timezone}"

    def to_dict(self) -> dict[str, object]:
        item: dict[str, object] = {}
        if self.days != EVERY_DAY:
            item["days"] = [d for i, d in enumerate(DAYS) if self.days & (1 << i)]
        item["hours"] = f"{_hhmm(self.start)}-{_hhmm(self.end)}"
        item["timezone"] = self.timezone
        return item


WINDOW_KEYS = {"days", "hours", "timezone"}
WINDOW_SHAPE = "{days: [mon, ...] (optional), hours: \"HH:MM-HH:MM\", timezone: IANA name}"


def check_window(raw: object) -> tuple[TimeWindow | None, list[tuple[str, str]]]:
    """`raw` as a window, or None with every problem as (field below the window, message):
    ("", ...) for the window itself, (".hours", ...), (".days[1]", ...). Unknown keys are the
    caller's to report (the loader words them as for every other mapping)."""
    if not isinstance(raw, dict):
        return None, [("", f"must be a mapping {WINDOW_SHAPE}")]
    problems: list[tuple[str, str]] = []
    hours, days, tz = None, EVERY_DAY, ""
    if "hours" not in raw:
        problems.append((".hours", "is required, e.g. \"08:00-19:00\" (\"22:00-02:00\" crosses midnight)"))
    else:
        try:
            hours = parse_hours(raw["hours"])
        except PolicyError as err:
            problems.append((".hours", str(err)))
    if "timezone" not in raw:
        problems.append((".timezone", "is required: an IANA name like Europe/London or UTC"))
    else:
        try:
            zone(raw["timezone"])
            tz = raw["timezone"]
        except PolicyError as err:
            problems.append((".timezone", str(err)))
    if "days" in raw:
        items = raw["days"]
        if not isinstance(items, list) or not items:
            problems.append((".days", f"must be a non-empty list of {', '.join(DAYS)}; leave it out for every day"))
        else:
            days = 0
            for j, item in enumerate(items):
                if item not in DAYS:
                    problems.append((f".days[{j}]", f"unknown day {item!r}: use {', '.join(DAYS)}"))
                elif days & (1 << DAYS.index(item)):
                    problems.append((".days", f"{item} is listed twice"))
                else:
                    days |= 1 << DAYS.index(item)
    if problems or hours is None or any(k not in WINDOW_KEYS for k in raw):
        return None, problems
    return TimeWindow(days, hours[0], hours[1], tz), []


def parse_window(raw: object) -> TimeWindow:
    """`raw` as a window; PolicyError naming its first problem."""
    if isinstance(raw, dict):
        unknown = sorted(set(map(str, raw)) - WINDOW_KEYS)
        if unknown:
            raise PolicyError(f"unknown field {unknown[0]!r}; a window has days, hours and timezone")
    window, problems = check_window(raw)
    if window is None:
        where, message = problems[0]
        raise PolicyError(f"{where.lstrip('.')}: {message}" if where else message)
    return window


def windows_text(windows: tuple[TimeWindow, ...]) -> str:
    """How a denial names them: `window mon-fri 08:00-19:00 Europe/London` or `windows a, b`."""
    return ("window " if len(windows) == 1 else "windows ") + ", ".join(str(w) for w in windows)
