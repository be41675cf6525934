"""`etcdforge restore` on a real local cluster: a backup taken under writes restored into every
member (revisions bumped, old watches told "compacted"), a restore killed midway and resumed,
and every bad input refused in one line with nothing changed."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.backup_helpers import (
    backup,
    cluster_id,
    keys_at,
    keys_on_each,
    load,
    only_json,
    pids,
    revision,
    watch_from,
)
from tests.conftest import ClusterFactory
from tests.helpers import CLIResult, LocalCluster, kill_cli_at

pytestmark = pytest.mark.slow
BUMP = 1_000_000_000


@pytest.fixture(scope="module")
def cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    return cluster_factory("rs", version="3.5.30")


def latest_backup(cluster: LocalCluster) -> Path:
    meta = only_json(cluster.state_dir / "backups")[-1]
    return cluster.state_dir / "backups" / str(meta["file"])


def restore(cluster: LocalCluster, *args: str) -> CLIResult:
    return cluster.cli("restore", *args, timeout=300)


def no_leftovers(cluster: LocalCluster) -> None:
    members = cluster.state_dir / "members"
    assert not list(members.glob("*/data.pre-migrate")) and not list(
        members.glob("*/data.restoring")
    )
    assert not (cluster.state_dir / "rebuild" / "state.json").exists()


def test_backup_under_writes_restored_into_every_member(cluster: LocalCluster) -> None:
    with load(cluster, "/rs/load") as writer:
        time.sleep(0.5)
        acked_before = set(writer.acked)
        made = backup(cluster)
        time.sleep(0.3)  # writes the restore will undo
    assert made.code == 0, made.stderr
    meta = only_json(cluster.state_dir / "backups")[-1]
    snapshot_revision = int(meta["revision"])
    in_snapshot = keys_at(cluster, "/rs/load", snapshot_revision)
    assert acked_before <= in_snapshot
    newest_before = revision(cluster)
    old_id = cluster_id(cluster)
    old_token = json.loads((cluster.state_dir / "cluster.json").read_text())["token"]

    result = restore(cluster, str(latest_backup(cluster)), "--yes")
    assert result.code == 0, result.stderr
    assert f"revision {snapshot_revision}, revisions bumped by 1,000,000,000" in result.stdout
    for endpoint, keys in keys_on_each(cluster, "/rs/load").items():
        assert keys == in_snapshot, endpoint  # every key of the snapshot, nothing after it
    assert revision(cluster) >= snapshot_revision + BUMP > newest_before  # never backwards
    compacted = watch_from(cluster, "/rs/load/000000", newest_before)
    assert compacted.get("canceled") and int(str(compacted["compact_revision"])) >= BUMP
    assert cluster_id(cluster) != old_id
    token = json.loads((cluster.state_dir / "cluster.json").read_text())["token"]
    assert token != old_token
    flags = (cluster.state_dir / "members" / "m1" / "etcd.flags").read_text()
    assert f"--initial-cluster-token={token}" in flags
    no_leftovers(cluster)
    assert old_id in (cluster.state_dir / "cluster-ids").read_text()


def test_restore_killed_midway_resumes(cluster: LocalCluster) -> None:
    snapshot = latest_backup(cluster)
    seen = kill_cli_at(
        ["restore", *cluster.args, str(snapshot), "--yes"],
        lambda line: "restore m2 from the snapshot" in line,
    )
    assert "restore m1 from the snapshot" in seen
    rerun = restore(cluster, str(snapshot), "--yes")
    assert rerun.code == 0, rerun.stderr
    assert "restore m1 from the snapshot" not in rerun.stderr  # done before the kill
    no_leftovers(cluster)
    meta = only_json(cluster.state_dir / "backups")[-1]
    assert revision(cluster) >= int(meta["revision"]) + BUMP


def _copy(snapshot: Path, directory: Path, **meta_changes: object) -> Path:
    copy = directory / snapshot.name
    for suffix in ("", ".json", ".sha256"):
        shutil.copy(f"{snapshot}{suffix}", f"{copy}{suffix}")
    meta_file = Path(f"{copy}.json")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, **meta_changes}))
    return copy


def test_bad_inputs_are_refused_in_one_line_and_change_nothing(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    snapshot = latest_backup(cluster)
    before, before_id = pids(cluster), cluster_id(cluster)
    (tmp_path / "t").mkdir()
    truncated = _copy(snapshot, tmp_path / "t")
    truncated.write_bytes(truncated.read_bytes()[:4096])
    corrupt_dir = tmp_path / "c"
    corrupt_dir.mkdir()
    corrupt = _copy(snapshot, corrupt_dir)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x55
    corrupt.write_bytes(bytes(data))
    other_name_dir, other_id_dir, bare_dir = tmp_path / "n", tmp_path / "i", tmp_path / "b"
    for directory in (other_name_dir, other_id_dir, bare_dir):
        directory.mkdir()
    other_name = _copy(snapshot, other_name_dir, cluster="prod")
    other_id = _copy(snapshot, other_id_dir, cluster_id="42")
    bare = bare_dir / "plain.db"
    shutil.copy(snapshot, bare)
    cases = {
        truncated: "bytes but the metadata says",
        corrupt: "does not match its sidecar",
        other_name: "a backup of cluster prod, not rs; pass --other-cluster",
        other_id: "a backup of another cluster named rs (cluster ID 42;",
        bare: "no etcdforge metadata beside it",
        tmp_path / "missing.db": "no such file",
    }
    for path, expected in cases.items():
        result = restore(cluster, str(path), "--yes")
        assert result.code == 1, (path, result.stdout)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0], result.stderr
    assert pids(cluster) == before and cluster_id(cluster) == before_id
    assert not (cluster.state_dir / "rebuild" / "state.json").exists()
    dry = restore(cluster, str(bare), "--other-cluster", "--dry-run")
    assert dry.code == 0 and "verifies" in dry.stdout, dry.stderr
    assert pids(cluster) == before


def test_too_little_disk_for_the_restore_changes_nothing(
    cluster_factory: ClusterFactory, tmp_path_factory: pytest.TempPathFactory
) -> None:
    mount = tmp_path_factory.mktemp("small-disk")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(mount)], check=True)
    try:
        small = cluster_factory("rd", count=1, version="3.5.30", data_dir=str(mount))
        made = backup(small)
        assert made.code == 0, made.stderr
        snapshot = latest_backup(small)
        before = pids(small)
        result = small.cli("restore", str(snapshot), "--yes")
        assert result.code == 1
        (line,) = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert f"{mount}" in line and "free, restoring every member there needs" in line
        assert pids(small) == before
        small.cli("down")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
