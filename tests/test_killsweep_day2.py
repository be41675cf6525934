"""Kill-point sweeps of the day-2 commands on local clusters (etcd 3.5.30; upgrades 3.5.16 ->
3.5.30), with the harness of tests/killsweep.py: SIGKILLed at 8 points over the whole run, rerun
at once each time, then every member healthy, the command's postconditions, nothing left over,
and no acknowledged write missing on any member.

Commands that keep the data (member replace, defrag, backup) run under a writer for the whole
sweep. Commands that replace the data by design (restore, recover) and the upgrade (each round
starts from a fresh 3.5.16 cluster) check instead that every write acknowledged before the round
is on every member afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backup_helpers import only_json
from tests.conftest import start_cluster, stop_cluster
from tests.helpers import LocalCluster, require_binary, run_cli
from tests.kill_inside import Inside
from tests.killsweep import Sweep, sweep
from tests.killsweep_targets import LocalTarget, require_passed, write_load
from tests.load import WriteLoad
from tests.test_maintenance import fragment

pytestmark = pytest.mark.slow

VERSION = "3.5.30"
POINTS = 8
BEFORE_PID_FILE = Inside("etcdforge.services.local:atomic_write", "before", "etcd.pid")
STILL_STOPPING = Inside("etcdforge.services.local:_finish_stop", "before")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A fresh 3-member cluster per sweep: a failed sweep cannot spoil the next one."""
    started = start_cluster(tmp_path, "sweep2", 3, VERSION)
    try:
        yield started
    finally:
        stop_cluster(started)


def _written(target: LocalTarget, prefix: str) -> WriteLoad:
    """A second of acknowledged writes, finished: what every later round must still hold."""
    with write_load(target, prefix) as load:
        time.sleep(1.0)
    assert len(load.acked) > 10
    return load


def _all_there(load: WriteLoad, target: LocalTarget) -> None:
    assert load.missing(target.endpoints) == dict.fromkeys(target.endpoints, 0)


def _status(cluster: LocalCluster) -> list[dict[str, object]]:
    result = cluster.cli("status", "-o", "json")
    assert result.code == 0, result.stderr
    rows: list[dict[str, object]] = json.loads(result.stdout)
    return rows


def test_member_replace(cluster: LocalCluster) -> None:
    """A healthy member rebuilt (`--force`): removed, added back as a learner, promoted."""
    target = LocalTarget(cluster)

    def check() -> None:
        rows = _status(cluster)
        assert [r["name"] for r in rows] == ["m1", "m2", "m3"]
        assert all(r["healthy"] and not r["is_learner"] for r in rows), rows
        assert not (cluster.state_dir / "replace.json").exists()

    args = ["member", "replace", "m2", *cluster.args, "--yes", "--force"]
    planted = [
        Inside("etcdforge.ops.member_local:set_aside", "before"),  # removed, its data still there
        Inside("etcdforge.ops.member_local:LocalProvisioner.provision", "after"),  # files, no start
        BEFORE_PID_FILE,
    ]
    # The first replacement also turns m2's settings from a founding member's (state new) into
    # a joined one's; every later run finds them so. One run first, so that the calibration run
    # and the rounds start alike (a step only the calibration run did is a point never reached).
    first = run_cli(*args)
    assert first.code == 0, first.stderr
    with write_load(target, "replace") as load:
        require_passed(sweep(Sweep(args, target, POINTS, load=load, check=check, planted=planted)))


def test_defrag(cluster: LocalCluster) -> None:
    target = LocalTarget(cluster)
    fragmented: dict[str, int] = {}

    def prepare() -> None:  # the same work every round: ~3 MiB each member gives back
        fragment(cluster, "/sweep/frag")
        fragmented.update({str(r["name"]): int(r["db_size"]) for r in _status(cluster)})  # type: ignore[call-overload]

    def check() -> None:
        # Given back, on every member: the writer's own churn keeps the fragmentation of a
        # small database noisy, so the sizes are compared rather than the percentage.
        sizes = {str(r["name"]): int(r["db_size"]) for r in _status(cluster)}  # type: ignore[call-overload]
        assert all(sizes[n] < fragmented[n] / 2 for n in sizes), (fragmented, sizes)

    args = ["defrag", *cluster.args]
    with write_load(target, "defrag") as load:
        # Which member leads (defragmented last, after a hand-off) changes from round to round.
        spec = Sweep(args, target, POINTS, load=load, prepare=prepare, check=check)
        require_passed(sweep(spec))


def test_backup(cluster: LocalCluster) -> None:
    target = LocalTarget(cluster)
    backups = cluster.state_dir / "backups"

    def check() -> None:
        assert not list(backups.glob(".*")), list(backups.iterdir())  # no staging left
        newest = only_json(backups)[-1]
        verified = cluster.cli("backup", "verify", str(backups / str(newest["file"])))
        assert verified.code == 0, verified.stderr

    planted = [Inside("etcdforge.snapshot:_run", "during", "save", delay=0.05)]
    with write_load(target, "backup") as load:
        # The source (a follower) changes from round to round: more rounds to reach every line.
        spec = Sweep(["backup", *cluster.args], target, POINTS, load=load, check=check,
                     planted=planted)  # fmt: skip
        require_passed(sweep(spec))


def test_restore(cluster: LocalCluster) -> None:
    target = LocalTarget(cluster)
    before = _written(target, "restore")
    made = cluster.cli("backup")
    assert made.code == 0, made.stderr
    snapshot = (
        cluster.state_dir / "backups" / str(only_json(cluster.state_dir / "backups")[-1]["file"])
    )
    args = ["restore", *cluster.args, str(snapshot), "--yes"]
    planted = [
        Inside("etcdforge.snapshot:_run", "during", "restore", delay=0.05),  # etcdutl running
        BEFORE_PID_FILE,
    ]
    require_passed(sweep(Sweep(args, target, POINTS, check=lambda: _all_there(before, target),
                        planted=planted)))  # fmt: skip


def test_recover_after_losing_two_members(cluster: LocalCluster) -> None:
    target = LocalTarget(cluster)
    before = _written(target, "recover")
    time.sleep(0.5)  # every member has applied what was acknowledged

    def lose_quorum() -> None:
        for name in ("m2", "m3"):
            pid = int((cluster.state_dir / "members" / name / "etcd.pid").read_text())
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while len(target.member_pids()) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)

    args = ["recover", *cluster.args, "--from-member", "m1", "--yes"]
    spec = Sweep(args, target, POINTS, prepare=lose_quorum,
                 check=lambda: _all_there(before, target), planted=[BEFORE_PID_FILE])  # fmt: skip
    require_passed(sweep(spec))


def test_upgrade_3_5_16_to_3_5_30(tmp_path: Path) -> None:
    target_binary = str(require_binary(VERSION))
    cluster = start_cluster(tmp_path, "sweepup", 3, "3.5.16")
    target = LocalTarget(cluster)
    written: list[WriteLoad] = []

    def fresh_3_5_16() -> None:
        stop_cluster(cluster)
        started = cluster.cli("up")
        assert started.code == 0, started.stderr
        written[:] = [_written(target, "upgrade")]

    def check() -> None:
        assert [r["version"] for r in _status(cluster)] == [VERSION] * 3
        assert not (cluster.state_dir / "upgrade.json").exists()
        _all_there(written[0], target)

    args = ["upgrade", *cluster.args, "--to", VERSION, "--binary", target_binary]
    planted = [
        Inside("etcdforge.ops.switch:LocalSwitch.point", "after"),  # switched, not restarted
        STILL_STOPPING,
        BEFORE_PID_FILE,
    ]
    try:
        require_passed(sweep(Sweep(args, target, POINTS, prepare=fresh_3_5_16, check=check,
                            planted=planted)))  # fmt: skip
    finally:
        stop_cluster(cluster)
