"""Bandwidth limits: rates, time-of-day schedules and a token bucket. Pure: time is
passed in, nothing sleeps or reads a clock.

A schedule is written as comma- or semicolon-separated windows, then an optional
default:

    "08:00-18:00=20MiB/s, otherwise unlimited"
    "Mon-Fri 07:30-19:00=10MiB/s; Sat,Sun 00:00-24:00=80MiB/s; otherwise 50MiB/s"
    "22:00-06:00=unlimited, otherwise 5MiB/s"        (a window may wrap past midnight)

The first window that contains the local time wins; outside every window the default
applies (unlimited unless given). Rates: a number with an optional unit: B, K/KB, M/MB,
G/GB (powers of 1000), KiB, MiB, GiB (powers of 1024), each optionally followed by
"/s"; bit rates as kbit, Mbit, Gbit (also "Mbps"); "unlimited", "none" or "0" for no limit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "ki": 1024, "mi": 1024**2, "gi": 1024**3,
    "kbit": 1000 / 8, "mbit": 1000**2 / 8, "gbit": 1000**3 / 8,
    "kbps": 1000 / 8, "mbps": 1000**2 / 8, "gbps": 1000**3 / 8,
}
_RATE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*(?:/\s*s(?:ec)?)?\s*")
_DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
_DAY = r"[A-Za-z]{3}[A-Za-z]*"
_ITEM_RE = re.compile(
    r"(?:(?:otherwise|default)\s*=?\s*(?P<default>[^,;]+?)\s*(?=[,;]|$))"
    rf"|(?:(?:(?P<days>{_DAY}(?:\s*[-,]\s*{_DAY})*)\s+)?(?P<start>\d{{1,2}}:\d{{2}})\s*-\s*"
    r"(?P<end>\d{1,2}:\d{2})\s*=\s*(?P<rate>[^,;]+?)\s*(?=[,;]|$))",
    re.IGNORECASE)
_SEP_RE = re.compile(r"[\s,;]+")


class ScheduleError(ValueError):
    """A rate or schedule string cannot be parsed."""


def parse_rate(text: str) -> float | None:
    """Bytes per second, or None for unlimited."""
    t = text.strip().lower()
    if t in ("unlimited", "none", "off", "0", "inf"):
        return None
    m = _RATE_RE.fullmatch(t)
    if not m:
        raise ScheduleError(f"cannot read rate {text!r} (examples: 20MiB/s, 100Mbit, 500K, unlimited)")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit not in _UNITS:
        raise ScheduleError(f"unknown unit {m.group(2)!r} in rate {text!r}")
    rate = number * _UNITS[unit]
    return None if rate == 0 else rate


def format_rate(rate: float | None) -> str:
    if rate is None:
        return "unlimited"
    for unit, factor in (("GiB/s", 1024**3), ("MiB/s", 1024**2), ("KiB/s", 1024)):
        if rate >= factor:
            return f"{rate / factor:.4g}{unit}"
    return f"{rate:.4g}B/s"


def _minutes(hhmm: str, text: str) -> int:
    h, m = (int(x) for x in hhmm.split(":"))
    if h > 24 or m > 59 or (h == 24 and m):
        raise ScheduleError(f"bad time {hhmm!r} in {text!r}")
    return h * 60 + m


def _parse_days(spec: str, text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in spec.lower().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            if a[:3] not in _DAYS or b[:3] not in _DAYS:
                raise ScheduleError(f"bad day range {part!r} in {text!r}")
            i, j = _DAYS.index(a[:3]), _DAYS.index(b[:3])
            k = i
            while True:
                days.add(k)
                if k == j:
                    break
                k = (k + 1) % 7
        else:
            if part[:3] not in _DAYS:
                raise ScheduleError(f"bad day {part!r} in {text!r}")
            days.add(_DAYS.index(part[:3]))
    return frozenset(days)


@dataclass(frozen=True)
class Window:
    start: int  # minutes after midnight
    end: int  # minutes after midnight; end <= start wraps past midnight
    rate: float | None
    days: frozenset[int] = frozenset(range(7))  # weekdays (Mon=0) on which the window starts

    def contains(self, when: datetime) -> bool:
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        if self.start == self.end:  # a whole day
            return day in self.days
        # wraps past midnight: the late part belongs to today, the early part to yesterday
        if minute >= self.start:
            return day in self.days
        return minute < self.end and (day - 1) % 7 in self.days


@dataclass(frozen=True)
class Schedule:
    windows: tuple[Window, ...] = ()
    default: float | None = None

    @classmethod
    def parse(cls, text: str) -> Schedule:
        windows: list[Window] = []
        default: float | None = None
        pos, seen = 0, False
        while True:
            sep = _SEP_RE.match(text, pos)
            pos = sep.end() if sep else pos
            if pos >= len(text):
                break
            m = _ITEM_RE.match(text, pos)
            if not m:
                raise ScheduleError(f"cannot read {text[pos:]!r} in schedule {text!r} (expected e.g. "
                                    "'08:00-18:00=20MiB/s', 'Mon-Fri 08:00-18:00=20MiB/s' or 'otherwise 50MiB/s')")
            pos = m.end()
            seen = True
            if m.group("default") is not None:
                default = parse_rate(m.group("default"))
                continue
            start, end = _minutes(m.group("start"), text), _minutes(m.group("end"), text)
            days = _parse_days(m.group("days"), text) if m.group("days") else frozenset(range(7))
            if start == 1440:
                raise ScheduleError(f"a window cannot start at 24:00 in {text!r}")
            if end == 1440:
                end = 0
            windows.append(Window(start, end, parse_rate(m.group("rate")), days))
        if not seen:
            raise ScheduleError("empty schedule")
        return cls(tuple(windows), default)

    def rate_at(self, when: datetime) -> float | None:
        """The limit in force at local time `when` (bytes/s, None = unlimited)."""
        for w in self.windows:
            if w.contains(when):
                return w.rate
        return self.default

    def describe(self) -> str:
        parts = []
        for w in self.windows:
            days = "" if len(w.days) == 7 else ",".join(_DAYS[d].capitalize() for d in sorted(w.days)) + " "
            parts.append(f"{days}{w.start // 60:02d}:{w.start % 60:02d}-{(w.end or 1440) // 60:02d}:{w.end % 60:02d}"
                         f"={format_rate(w.rate)}")
        parts.append(f"otherwise {format_rate(self.default)}")
        return ", ".join(parts)


class TokenBucket:
    """A token bucket over an injected clock: `take(n, now)` returns how long the caller
    must wait before sending n bytes (0 when it may send now).

    The bucket holds at most `burst` tokens (default: a quarter second of the rate, at
    least 256 KiB). Taking more than is there drives the balance negative: the wait is
    the time to pay the debt back, so a long run averages exactly `rate`. A rate of None
    means unlimited (never waits); `set_rate` changes it in flight (a schedule window
    opening) without losing the balance."""

    def __init__(self, rate: float | None, now: float, burst: float | None = None) -> None:
        self._burst_given = burst
        self.rate: float | None = None
        self.burst = 0.0
        self.tokens = 0.0
        self.last = now
        self.set_rate(rate, now)
        self.tokens = self.burst

    def set_rate(self, rate: float | None, now: float) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive or None")
        self._refill(now)
        self.rate = rate
        self.burst = (self._burst_given if self._burst_given is not None
                      else max(256 * 1024.0, (rate or 0) / 4))
        self.tokens = min(self.tokens, self.burst)

    def _refill(self, now: float) -> None:
        if now > self.last:
            if self.rate is not None:
                self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now

    def take(self, n: int, now: float) -> float:
        if self.rate is None:
            self.last = max(self.last, now)
            return 0.0
        self._refill(now)
        self.tokens -= n
        if self.tokens >= 0:
            return 0.0
        return -self.tokens / self.rate
