"""Bandwidth schedules and the token bucket, with an injected clock (no sockets)."""

from __future__ import annotations

from datetime import datetime

import pytest

from standby.domain.bandwidth import Schedule, ScheduleError, TokenBucket, format_rate, parse_rate
from standby.replication.sender import RateLimiter

MiB = 1024 * 1024


@pytest.mark.parametrize("text, rate", [
    ("20MiB/s", 20 * MiB), ("20 MiB/s", 20 * MiB), ("500K", 500_000), ("1.5GiB", 1.5 * 1024**3),
    ("100Mbit", 12_500_000), ("100mbps", 12_500_000), ("4096", 4096), ("unlimited", None), ("0", None),
])
def test_parse_rate(text: str, rate: float | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["fast", "10 parsecs", "-5M", ""])
def test_bad_rates(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_rate(text)


def test_format_rate() -> None:
    assert format_rate(None) == "unlimited"
    assert format_rate(20 * MiB) == "20MiB/s"


def test_office_hours() -> None:
    s = Schedule.parse("08:00-18:00=20MiB/s, otherwise unlimited")
    assert s.rate_at(datetime(2024, 6, 3, 7, 59)) is None
    assert s.rate_at(datetime(2024, 6, 3, 8, 0)) == 20 * MiB
    assert s.rate_at(datetime(2024, 6, 3, 17, 59)) == 20 * MiB
    assert s.rate_at(datetime(2024, 6, 3, 18, 0)) is None


def test_days_wrap_and_default() -> None:
    s = Schedule.parse("Mon-Fri 07:30-19:00=10MiB/s; Sat,Sun 00:00-24:00=80MiB/s; otherwise 50MiB/s")
    monday, saturday = datetime(2024, 6, 3, 12), datetime(2024, 6, 1, 12)
    assert s.rate_at(monday) == 10 * MiB
    assert s.rate_at(monday.replace(hour=20)) == 50 * MiB
    assert s.rate_at(saturday) == 80 * MiB
    assert s.rate_at(saturday.replace(hour=0)) == 80 * MiB
    night = Schedule.parse("22:00-06:00=unlimited, otherwise 5MiB/s")
    assert night.rate_at(datetime(2024, 6, 3, 23)) is None
    assert night.rate_at(datetime(2024, 6, 3, 3)) is None
    assert night.rate_at(datetime(2024, 6, 3, 6)) == 5 * MiB
    # a Friday-night window carries into Saturday morning, not Monday's
    fri = Schedule.parse("Fri 22:00-06:00=1MiB/s")
    assert fri.rate_at(datetime(2024, 6, 1, 3)) == 1 * MiB  # Saturday 03:00
    assert fri.rate_at(datetime(2024, 6, 4, 3)) is None  # Tuesday 03:00
    assert "otherwise 50MiB/s" in s.describe()


@pytest.mark.parametrize("text", ["08:00-18:00", "25:00-26:00=1M", "8-18=1M", "Xyz 08:00-09:00=1M",
                                  "08:00-18:00=1M, otherwise", ""])
def test_bad_schedules(text: str) -> None:
    with pytest.raises(ScheduleError):
        Schedule.parse(text)


def test_token_bucket_averages_the_rate() -> None:
    now = 0.0
    bucket = TokenBucket(1 * MiB, now, burst=256 * 1024)
    sent = 0
    while sent < 10 * MiB:
        wait = bucket.take(256 * 1024, now)
        now += wait
        sent += 256 * 1024
    # 10 MiB at 1 MiB/s with a 256 KiB burst: 9.75 s
    assert now == pytest.approx(9.75, rel=1e-6)


def test_token_bucket_refills_and_changes_rate() -> None:
    bucket = TokenBucket(1000.0, 0.0, burst=1000)
    assert bucket.take(1000, 0.0) == 0
    assert bucket.take(500, 0.0) == pytest.approx(0.5)
    bucket.set_rate(None, 0.5)
    assert bucket.take(10**9, 0.6) == 0
    bucket.set_rate(2000.0, 10.0)
    # the debt of 500 was paid back by 0.5 s; the new rate applies to what follows
    assert bucket.take(100, 10.0) == pytest.approx(0.05)


def test_rate_limiter_follows_the_schedule() -> None:
    clock = [0.0]
    local = [datetime(2024, 6, 3, 7, 59, 59)]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        clock[0] += s

    lim = RateLimiter(Schedule.parse("08:00-18:00=1MiB/s"), clock=lambda: clock[0], sleep=sleep,
                      now_local=lambda: local[0])
    for _ in range(100):
        lim.consume(MiB)
    assert slept == []  # unlimited before 08:00
    local[0] = datetime(2024, 6, 3, 8, 0, 1)
    clock[0] += 2
    for _ in range(10):
        lim.consume(MiB)
    assert sum(slept) == pytest.approx(9.75, rel=0.01)
    assert lim.waited == pytest.approx(sum(slept))
