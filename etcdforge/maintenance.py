"""Database upkeep in numbers: fragmentation, quota and alarms, from what a member reports.

Pure and free of pydantic, so `status` stays quick. etcd's database file only grows: compaction
frees pages inside it and a defragmentation rewrites it without them, so `dbSize - dbSizeInUse`
is what a defrag gives back. When the database reaches its quota every member raises the
NOSPACE alarm and refuses writes until the alarm is disarmed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

#: etcd's quota when `--quota-backend-bytes` is 0 or unset (3.4 to 3.6).
ETCD_DEFAULT_QUOTA = 2 << 30
NOSPACE = "NOSPACE"
_ALARM = re.compile(r"alarm:([A-Z_]+)")


def fragmentation(db_size: int | None, in_use: int | None) -> float | None:
    """Percent of the database file a defragmentation would give back."""
    if not db_size or in_use is None:
        return None
    return max(0.0, (db_size - in_use) * 100.0 / db_size)


def alarms_in(errors: Iterable[str]) -> tuple[str, ...]:
    """Alarm names from a status reply's `errors` ("memberID:123 alarm:NOSPACE "), once each."""
    found: dict[str, None] = {}
    for error in errors:
        for name in _ALARM.findall(error):
            found[name] = None
    return tuple(found)


def configured_quota(spec: Mapping[str, Any]) -> int:
    """The quota the members were rendered with, from the recorded spec (etcd's default if
    unset); a 3.6 member reports its own, which wins where known."""
    storage = spec.get("storage") or {}
    value = storage.get("quota_backend_bytes") if isinstance(storage, Mapping) else None
    return int(value) if value else ETCD_DEFAULT_QUOTA


def parse_threshold(text: str) -> float:
    """`30%` or `30` as a percentage in [0, 100]; ValueError with a readable message."""
    value = text.strip().removesuffix("%").strip()
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{text!r} is not a percentage; use e.g. 30%") from None
    if not 0 <= number <= 100:
        raise ValueError(f"{text!r} is not between 0% and 100%")
    return number


def human_size(size: int | None) -> str:
    """`1.5 MiB`; `-` when unknown."""
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"
