"""Pure parts of backups: retention rules, names, metadata, ssh:// destinations, units."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
from pathlib import Path

import pytest

from etcdforge import backups, retention
from etcdforge.backups import BackupError, BackupMember, BackupMeta
from etcdforge.client import EndpointStatus
from etcdforge.ops.backup import pick_source
from etcdforge.ops.backup_dest import LocalDestination, parse_ssh_url
from etcdforge.ops.backup_schedule import render_service, render_timer

NOW = dt.datetime(2030, 6, 15, 12, 0, tzinfo=dt.UTC)


def _hourly(hours: int) -> list[retention.Dated]:
    return [retention.Dated(f"b{h:04d}", NOW - dt.timedelta(hours=h)) for h in range(hours)]


def test_keep_last_only() -> None:
    policy = retention.RetentionPolicy(keep_last=3, keep_daily_days=0, keep_weekly_days=0)
    doomed = retention.expired(_hourly(10), NOW, policy)
    assert doomed == [f"b{h:04d}" for h in range(9, 2, -1)]


def test_daily_and_weekly_keep_the_newest_of_each_period() -> None:
    policy = retention.RetentionPolicy(keep_last=2, keep_daily_days=3, keep_weekly_days=21)
    backups_ = _hourly(24 * 30)
    keep = retention.to_keep(backups_, NOW, policy)
    days = {b.time.date() for b in backups_ if b.name in keep}
    # the 2 newest, the newest of each of the last 3 days (+ today), one per ISO week for 21 days
    assert {"b0000", "b0001"} <= keep
    assert dt.date(2030, 6, 13) in days and dt.date(2030, 6, 12) in days
    weeks = {b.time.isocalendar()[:2] for b in backups_ if b.name in keep}
    assert len(weeks) == 4  # 21 days reach into a 4th ISO week
    assert len(keep) < 12
    oldest_kept = min(b.time for b in backups_ if b.name in keep)
    assert NOW - oldest_kept <= dt.timedelta(days=21)


def test_nothing_expires_while_every_backup_is_wanted() -> None:
    policy = retention.RetentionPolicy(keep_last=24, keep_daily_days=7, keep_weekly_days=28)
    assert retention.expired(_hourly(5), NOW, policy) == []


def _meta(**changes: object) -> BackupMeta:
    meta = BackupMeta(
        file="dev-20300615T120000Z-r42.db",
        cluster="dev",
        cluster_id="123",
        members=(
            BackupMember("m1", "7", ("https://127.0.0.1:2380",), ("https://127.0.0.1:2379",)),
        ),
        revision=42,
        etcd_version="3.5.30",
        taken_at=NOW.isoformat(),
        size=100,
        sha256="a" * 64,
        source="m1",
        total_keys=3,
    )
    return BackupMeta(**{**meta.__dict__, **changes})  # type: ignore[arg-type]


def test_metadata_round_trips_and_rejects_other_json() -> None:
    meta = _meta()
    assert BackupMeta.from_json(meta.to_json(), "x") == meta
    assert backups.backup_name("dev", NOW, 42) == meta.file
    with pytest.raises(BackupError, match=r"x\.json: not etcdforge backup metadata"):
        BackupMeta.from_json(json.dumps({"format": 1, "file": "a"}).encode(), "x.json")
    with pytest.raises(BackupError, match="not a sha256 line"):
        backups.parse_sha256_line("nonsense", "f.sha256")
    line = backups.sha256_line("b" * 64, "f.db").decode()
    assert line == f"{'b' * 64}  f.db\n"
    assert backups.parse_sha256_line(line, "f") == "b" * 64


def test_ssh_destinations_are_parsed_or_refused_in_one_line() -> None:
    where = parse_ssh_url("ssh://backup@10.0.0.9:2222/srv/etcd")
    assert (where.user, where.host, where.port, str(where.path)) == (
        "backup", "10.0.0.9", 2222, "/srv/etcd",
    )  # fmt: skip
    assert where.url == "ssh://backup@10.0.0.9:2222/srv/etcd"
    for bad in ("ssh://host/path", "ssh://u@host", "ssh://u@host:99999/p", "ssh://u@h/p?x=1"):
        with pytest.raises(BackupError, match="use ssh://user@host"):
            parse_ssh_url(bad)


def test_source_is_the_follower_furthest_ahead_never_a_learner() -> None:
    def status(endpoint: str, member: str, index: int, **kw: object) -> EndpointStatus:
        fields = {"version": "3.5.30", "leader": "1", "raft_applied_index": index, **kw}
        return EndpointStatus(endpoint=endpoint, member_id=member, **fields)  # type: ignore[arg-type]

    leader = status("a", "1", 100)
    behind, ahead = status("b", "2", 90), status("c", "3", 99)
    learner = status("d", "4", 100, is_learner=True)
    assert pick_source([leader, behind, ahead, learner]) == ahead
    assert pick_source([leader]) == leader
    assert pick_source([EndpointStatus(endpoint="a", error="down")]) is None


def test_units_escape_specifiers_and_carry_the_calendar() -> None:
    service = render_service("dev", ["/usr/bin/python3", "-m", "etcdforge", "--dest", "/b 50%"], {})
    assert "ExecStart=/usr/bin/python3 -m etcdforge --dest '/b 50%%'" in service
    assert "Type=oneshot" in service
    timer = render_timer("dev", "*-*-* 02:30:00")
    assert "OnCalendar=*-*-* 02:30:00" in timer and "Persistent=true" in timer
    assert "Unit=etcdforge-backup-dev.service" in timer


def test_a_new_backup_clears_what_an_interrupted_one_of_its_cluster_left(tmp_path: Path) -> None:
    """Sidecars without their snapshot and a dead writer's temp file go; a whole backup, another
    cluster's files (even one whose name starts with this one's) and a live writer's stay."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    taken = dt.datetime(2026, 12, 3, 13, 0, tzinfo=dt.UTC)
    whole = backups.backup_name("prod", taken, 7)
    orphan = backups.backup_name("prod", taken, 9)
    other = backups.backup_name("prod-1", taken, 9)
    files = [whole, f"{whole}.json", f"{whole}.sha256", f"{orphan}.json", f"{orphan}.sha256",
             f".{orphan}.json.{dead.pid}.abcd1234", f".{orphan}.sha256.{os.getpid()}.abcd1234",
             f"{other}.json", f".{other}.json.{dead.pid}.abcd1234"]  # fmt: skip
    for name in files:
        (tmp_path / name).write_text("x")
    LocalDestination(tmp_path).staging("prod")
    left = sorted(p.name for p in tmp_path.iterdir())
    gone = {f"{orphan}.json", f"{orphan}.sha256", f".{orphan}.json.{dead.pid}.abcd1234"}
    assert left == sorted(set(files) - gone)
