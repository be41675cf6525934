"""`etcdforge backup` on a real local cluster: verified snapshots under writes, retention, the
files a bad backup is made of, a destination without room, and the systemd schedule."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backup_helpers import (
    MIB,
    backup,
    endpoints,
    keys_at,
    load,
    only_json,
    put_big,
    revision,
)
from tests.conftest import ClusterFactory
from tests.helpers import LocalCluster, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    return cluster_factory(
        "bk",
        version="3.5.30",
        backup={"keep_last": 3, "keep_daily_days": 0, "keep_weekly_days": 0},
    )


def backups_dir(cluster: LocalCluster) -> Path:
    return cluster.state_dir / "backups"


def test_backup_under_writes_is_verified_private_and_described(cluster: LocalCluster) -> None:
    with load(cluster, "/bk/load") as writer:
        time.sleep(0.5)
        acked_before_backup = set(writer.acked)
        before = revision(cluster)
        result = backup(cluster)
    assert result.code == 0, result.stderr
    assert "verified" in result.stdout
    (meta,) = only_json(backups_dir(cluster))
    snapshot = backups_dir(cluster) / str(meta["file"])
    for path in (snapshot, Path(f"{snapshot}.json"), Path(f"{snapshot}.sha256")):
        assert path.stat().st_mode & 0o777 == 0o600
    assert meta["cluster"] == "bk" and meta["size"] == snapshot.stat().st_size
    assert int(meta["revision"]) >= before
    assert {m["name"] for m in meta["members"]} == {"m1", "m2", "m3"}  # type: ignore[union-attr]
    assert meta["etcd_version"] == "3.5.30"
    status = json.loads(cluster.cli("status", "-o", "json").stdout)
    leader = next(r["name"] for r in status if r["is_leader"])
    assert meta["source"] != leader  # the leader is spared
    # everything acknowledged before the backup began is in it
    assert acked_before_backup <= keys_at(cluster, "/bk/load", int(meta["revision"]))
    check = subprocess.run(
        ["sha256sum", "-c", f"{snapshot.name}.sha256"],
        cwd=snapshot.parent, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout
    verify = backup(cluster, "verify")
    assert verify.code == 0 and f"ok: {snapshot}" in verify.stdout, verify.stderr
    listed = json.loads(backup(cluster, "list", "-o", "json").stdout)
    assert [b["file"] for b in listed] == [meta["file"]]
    assert writer.failures == [] and max(writer.missing(endpoints(cluster)).values()) == 0


def test_retention_keeps_the_newest(cluster: LocalCluster) -> None:
    for _ in range(4):
        result = backup(cluster)
        assert result.code == 0, result.stderr
    kept = only_json(backups_dir(cluster))
    assert len(kept) == 3
    assert len(list(backups_dir(cluster).iterdir())) == 9  # three files each, nothing else
    revisions = [int(m["revision"]) for m in kept]
    assert revisions == sorted(revisions)


@pytest.fixture()
def copy_of_a_backup(cluster: LocalCluster, tmp_path: Path) -> Iterator[Path]:
    meta = only_json(backups_dir(cluster))[-1]
    source = backups_dir(cluster) / str(meta["file"])
    for suffix in ("", ".json", ".sha256"):
        shutil.copy(f"{source}{suffix}", tmp_path / f"{source.name}{suffix}")
    yield tmp_path / source.name


def test_truncated_and_corrupt_backups_fail_verify_in_one_line(
    cluster: LocalCluster, copy_of_a_backup: Path
) -> None:
    data = copy_of_a_backup.read_bytes()
    copy_of_a_backup.write_bytes(data[: len(data) // 2])
    truncated = backup(cluster, "verify", str(copy_of_a_backup))
    assert truncated.code == 1
    assert truncated.stderr.strip().splitlines() == [
        f"bad: {copy_of_a_backup}: {len(data) // 2} bytes but the metadata says {len(data)}: "
        "truncated or replaced; use another backup"
    ]
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    copy_of_a_backup.write_bytes(bytes(flipped))
    corrupt = backup(cluster, "verify", str(copy_of_a_backup))
    assert corrupt.code == 1 and len(corrupt.stderr.strip().splitlines()) == 1
    assert "does not match its sidecar" in corrupt.stderr
    copy_of_a_backup.with_name(copy_of_a_backup.name + ".json").unlink()
    bare = backup(cluster, "verify", str(copy_of_a_backup))
    assert bare.code == 1 and "no metadata beside it" in bare.stderr


def test_too_little_room_at_the_destination_writes_nothing(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    put_big(cluster, "/bk/big", 1 * MIB, count=3)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        result = backup(cluster, "--dest", str(small))
        assert result.code == 1
        (line,) = result.stderr.strip().splitlines()[-1:]
        assert line.startswith(f"error: {small}: only ") and "free some space" in line
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_schedule_units_pass_systemd_analyze_and_their_command_backs_up(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    units = tmp_path / "units"
    result = backup(cluster, "schedule", "--out", str(units))
    assert result.code == 0, result.stderr
    service, timer = units / "etcdforge-backup-bk.service", units / "etcdforge-backup-bk.timer"
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(service), str(timer)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stderr
    assert "etcdforge-backup-bk" not in verify.stderr  # no warning about our units
    assert "OnCalendar=hourly" in timer.read_text()
    exec_start = next(
        line.removeprefix("ExecStart=")
        for line in service.read_text().splitlines()
        if line.startswith("ExecStart=")
    )
    before = {m["file"] for m in only_json(backups_dir(cluster))}
    ran = subprocess.run(shlex.split(exec_start), capture_output=True, text=True, check=False)
    assert ran.returncode == 0, ran.stderr
    after = {m["file"] for m in only_json(backups_dir(cluster))}
    assert after - before, ran.stdout


def test_a_bad_calendar_is_refused_before_writing(cluster: LocalCluster, tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    data = dict(cluster.data, backup={"schedule": "every tuesday-ish"})
    spec.write_text(json.dumps(data))
    result = run_cli(
        "backup", "schedule", "-f", str(spec), "--state-dir", str(cluster.state_dir),
        "--out", str(tmp_path / "units"),
    )  # fmt: skip
    assert result.code == 1
    assert "backup.schedule 'every tuesday-ish' is not a systemd OnCalendar" in result.stderr
    assert not (tmp_path / "units").exists()
