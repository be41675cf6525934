"""`etcdforge recover` on a real local cluster that lost two of its three members for good:
refused while quorum holds, a plan that says what will be lost, recovery from the newest backup
and from the survivor's own database (killed midway and resumed)."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest

from tests.backup_helpers import (
    backup,
    cluster_id,
    endpoints,
    keys_at,
    keys_on_each,
    load,
    only_json,
    pids,
    revision,
)
from tests.conftest import ClusterFactory
from tests.helpers import LocalCluster, kill_cli_at

pytestmark = pytest.mark.slow
BUMP = 1_000_000_000


@pytest.fixture(scope="module")
def cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    return cluster_factory("rc", version="3.5.30")


def destroy(cluster: LocalCluster, *names: str) -> None:
    """A member gone for good: its process killed and its data dir deleted."""
    running = pids(cluster)
    for name in names:
        os.kill(running[name], signal.SIGKILL)
    time.sleep(0.3)
    for name in names:
        shutil.rmtree(cluster.state_dir / "members" / name / "data")


def test_recover_is_refused_while_quorum_holds(cluster: LocalCluster) -> None:
    before = pids(cluster)
    result = cluster.cli("recover", "--from-member", "m1", "--yes")
    assert result.code == 1
    assert "has quorum (3 of 3 members follow one leader)" in result.stderr
    assert pids(cluster) == before


def test_recover_from_the_newest_backup_after_losing_two_members(cluster: LocalCluster) -> None:
    with load(cluster, "/rc/a") as writer:
        time.sleep(0.5)
        acked_before = set(writer.acked)
        made = backup(cluster)
        time.sleep(0.3)
    assert made.code == 0, made.stderr
    snapshot_revision = int(only_json(cluster.state_dir / "backups")[-1]["revision"])
    in_snapshot = keys_at(cluster, "/rc/a", snapshot_revision)
    assert acked_before <= in_snapshot
    newest = revision(cluster)
    old_id = cluster_id(cluster)
    destroy(cluster, "m2", "m3")
    plan = cluster.cli("recover", "--dry-run")
    assert plan.code == 0, plan.stderr
    assert "m1: answers" in plan.stdout and "m2: does not answer" in plan.stdout
    assert f"at revision {snapshot_revision}" in plan.stdout
    assert f"lost: {newest - snapshot_revision} revision(s)" in plan.stdout
    result = cluster.cli("recover", "--yes", timeout=300)
    assert result.code == 0, result.stderr
    assert "recovered from the newest backup" in result.stdout
    for endpoint, keys in keys_on_each(cluster, "/rc/a").items():
        assert keys == in_snapshot, endpoint
    assert revision(cluster) >= snapshot_revision + BUMP > newest
    assert cluster_id(cluster) != old_id


def test_recover_from_the_survivor_killed_midway_resumes(cluster: LocalCluster) -> None:
    with load(cluster, "/rc/b") as writer:
        time.sleep(1.0)
    acked = set(writer.acked)
    assert acked
    newest = revision(cluster)
    survivor = endpoints(cluster)[1]
    for _ in range(100):  # a follower applies what was committed within milliseconds
        if revision(cluster, survivor) >= newest:
            break
        time.sleep(0.05)
    destroy(cluster, "m1", "m3")
    seen = kill_cli_at(
        ["recover", *cluster.args, "--from-member", "m2", "--yes"],
        lambda line: "restore m2 from the snapshot" in line,
    )
    assert "stop it and copy its database" in seen
    rerun = cluster.cli("recover", "--from-member", "m2", "--yes", timeout=300)
    assert rerun.code == 0, rerun.stderr
    assert "recovered from member m2's database" in rerun.stdout
    for endpoint, keys in keys_on_each(cluster, "/rc/b").items():
        assert acked <= keys, endpoint  # the survivor had applied every acknowledged write
    assert revision(cluster) >= newest + BUMP
    assert not (cluster.state_dir / "rebuild" / "state.json").exists()
