"""The spec's storage section as member settings, per release, and the numbers status shows."""

from __future__ import annotations

import pytest

from etcdforge import render
from etcdforge.errors import SpecError
from etcdforge.maintenance import alarms_in, configured_quota, fragmentation, parse_threshold
from etcdforge.spec import StorageSpec, parse_spec


def test_unset_storage_keeps_etcds_defaults_but_the_corruption_checks() -> None:
    assert render.storage_settings(StorageSpec(), None) == {}
    assert render.storage_settings(StorageSpec(), (3, 4, 23)) == {
        "experimental-initial-corrupt-check": "true"
    }
    assert render.storage_settings(StorageSpec(), (3, 5, 4)) == {
        "experimental-initial-corrupt-check": "true"
    }
    assert render.storage_settings(StorageSpec(), (3, 5, 5)) == {
        "experimental-initial-corrupt-check": "true",
        "experimental-compact-hash-check-enabled": "true",
    }
    assert render.storage_settings(StorageSpec(), (3, 6, 0)) == {
        "feature-gates": "InitialCorruptCheck=true,CompactHashCheck=true"
    }
    off = StorageSpec(corruption_checks=False)
    assert render.storage_settings(off, (3, 5, 30)) == {}


def test_every_storage_setting_is_rendered() -> None:
    storage = StorageSpec(
        quota_backend_bytes=8 << 30,
        auto_compaction_mode="periodic",
        auto_compaction_retention="1h",
        snapshot_count=10000,
        corruption_checks=False,
    )
    assert render.storage_settings(storage, (3, 5, 30)) == {
        "quota-backend-bytes": str(8 << 30),
        "auto-compaction-mode": "periodic",
        "auto-compaction-retention": "1h",
        "snapshot-count": "10000",
    }


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"auto_compaction_mode": "periodic"}, "go together"),
        ({"auto_compaction_mode": "revision", "auto_compaction_retention": "1h"}, "whole number"),
        ({"quota_backend_bytes": 1000}, "greater than or equal to 1048576"),
    ],
)
def test_bad_storage_settings_are_refused(storage: dict[str, object], message: str) -> None:
    data = {"name": "s", "members": [{"name": "a", "address": "127.0.0.1"}], "storage": storage}
    with pytest.raises(SpecError, match=message):
        parse_spec(data, "t.yaml")


def test_status_numbers() -> None:
    assert fragmentation(1000, 250) == 75.0
    assert fragmentation(None, 1) is None
    assert alarms_in(["memberID:1 alarm:NOSPACE ", "memberID:2 alarm:NOSPACE "]) == ("NOSPACE",)
    assert configured_quota({"storage": {"quota_backend_bytes": 16 << 20}}) == 16 << 20
    assert configured_quota({}) == 2 << 30
    assert parse_threshold("30%") == 30.0
    for bad in ("x%", "101%", "-1"):
        with pytest.raises(ValueError):
            parse_threshold(bad)
