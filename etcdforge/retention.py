"""Which backups to keep: the newest N, plus one a day and one a week for a while. Pure.

A backup is kept if any rule wants it: among the `keep_last` newest; the newest of its UTC day
within `keep_daily_days` of now; the newest of its ISO week within `keep_weekly_days`. Everything
else is expired. The rules only ever look at backups of one cluster in one place.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int
    keep_daily_days: int
    keep_weekly_days: int


@dataclass(frozen=True)
class Dated:
    name: str
    time: dt.datetime  # aware, any zone


def to_keep(backups: Sequence[Dated], now: dt.datetime, policy: RetentionPolicy) -> set[str]:
    newest_first = sorted(backups, key=lambda b: b.time, reverse=True)
    keep = {b.name for b in newest_first[: policy.keep_last]}
    keep |= _newest_per(newest_first, now, policy.keep_daily_days, _day)
    keep |= _newest_per(newest_first, now, policy.keep_weekly_days, _week)
    return keep


def expired(backups: Sequence[Dated], now: dt.datetime, policy: RetentionPolicy) -> list[str]:
    """Names to delete, oldest first."""
    keep = to_keep(backups, now, policy)
    return [b.name for b in sorted(backups, key=lambda b: b.time) if b.name not in keep]


def _day(time: dt.datetime) -> Hashable:
    return time.astimezone(dt.UTC).date()


def _week(time: dt.datetime) -> Hashable:
    return time.astimezone(dt.UTC).isocalendar()[:2]


def _newest_per(
    newest_first: Sequence[Dated],
    now: dt.datetime,
    days: int,
    period: Callable[[dt.datetime], Hashable],
) -> set[str]:
    if days <= 0:
        return set()
    since = now - dt.timedelta(days=days)
    seen: set[Hashable] = set()
    keep = set()
    for backup in newest_first:
        if backup.time < since:
            break
        key = period(backup.time)
        if key not in seen:
            seen.add(key)
            keep.add(backup.name)
    return keep
