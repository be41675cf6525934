"""Kill-point sweeps of the changing commands on local clusters (etcd 3.5.30), under a writer.

Each test SIGKILLs one command at 8 points spread over its whole run (tests/killsweep.py),
reruns it at once each time, and checks that it completes on the first rerun, that every member
is healthy, that the command's own postconditions hold, that nothing is left running or lying
around, and that no acknowledged write is missing on any member.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcdforge import pki
from etcdforge.ops.certs import pair_ok
from etcdforge.ops.renew import served_serial
from etcdforge.tls import TLSFiles
from tests.conftest import start_cluster, stop_cluster
from tests.helpers import LocalCluster, require_binary, run_cli, spec_data, write_spec
from tests.kill_inside import Inside
from tests.killsweep import Sweep, sweep
from tests.killsweep_targets import LocalTarget, require_passed, write_load
from tests.test_kubeadm_cluster import Stacked, fill, registry, start_stacked

pytestmark = pytest.mark.slow

VERSION = "3.5.30"
POINTS = 8
#: Between launching a member's etcd and writing its pid file.
BEFORE_PID_FILE = Inside("etcdforge.services.local:atomic_write", "before", "etcd.pid")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A fresh 3-member cluster per sweep: a failed sweep cannot spoil the next one."""
    started = start_cluster(tmp_path, "sweep", 3, VERSION)
    try:
        yield started
    finally:
        stop_cluster(started)


def _certs_check(cluster: LocalCluster) -> None:
    result = run_cli("certs", "check", *cluster.args)
    assert result.code == 0, result.stdout + result.stderr


# --- up ------------------------------------------------------------------------------------------


def test_up_from_nothing(tmp_path: Path) -> None:
    data = spec_data("fresh", 3, require_binary(VERSION))
    cluster = LocalCluster(write_spec(tmp_path, data), tmp_path / "state", data)
    target = LocalTarget(cluster)

    def purge() -> None:
        if cluster.state_dir.exists():
            result = cluster.cli("down", "--purge")
            assert result.code == 0, result.stderr

    def check() -> None:
        put = run_cli("status", *cluster.args)
        assert put.code == 0, put.stderr
        _certs_check(cluster)

    planted = [
        Inside("etcdforge.ops.certs:atomic_write", "after", "ca.key"),  # CA key without its cert
        Inside("etcdforge.fsutil:write_temp", "after", "cluster.json"),  # before the rename
        BEFORE_PID_FILE,
    ]
    args = ["up", *cluster.args]
    try:
        require_passed(
            sweep(Sweep(args, target, POINTS, prepare=purge, check=check, planted=planted))
        )
    finally:
        purge()


def test_down_purge(tmp_path: Path) -> None:
    data = spec_data("purge", 3, require_binary(VERSION))
    cluster = LocalCluster(write_spec(tmp_path, data), tmp_path / "state", data)

    def deploy() -> None:
        result = cluster.cli("up")
        assert result.code == 0, result.stderr

    def check() -> None:
        assert not cluster.state_dir.exists()

    planted = [
        Inside("etcdforge.services.local:_finish_stop", "before"),  # a member still stopping
        Inside("os:unlink", "before", "cluster.json"),  # all gone but the record
        Inside("os:unlink", "after", "cluster.json"),  # all gone but the state dir (its lock)
    ]
    target = LocalTarget(cluster, running=False)
    args = ["down", "--purge", *cluster.args]
    spec = Sweep(args, target, 4, prepare=deploy, check=check, healthy_after=False, planted=planted)
    require_passed(sweep(spec))


def test_up_on_a_crashed_member(cluster: LocalCluster) -> None:
    target = LocalTarget(cluster)

    def crash() -> None:  # the same member each round, so every round follows one timeline
        pid = int((cluster.state_dir / "members" / "m2" / "etcd.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while pid in target.member_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    args = ["up", *cluster.args]
    planted = [BEFORE_PID_FILE]
    with write_load(target, "crash") as load:
        require_passed(
            sweep(Sweep(args, target, POINTS, load=load, prepare=crash, planted=planted))
        )


# --- certificates ---------------------------------------------------------------------------------


def test_certs_renew_all_new_key(cluster: LocalCluster) -> None:
    target = LocalTarget(cluster)
    admin = TLSFiles(*target.admin_files())

    def check() -> None:
        _certs_check(cluster)
        for member in cluster.data["members"]:
            files = cluster.state_dir / "members" / member["name"] / "pki"
            assert pair_ok(files / "server.crt", files / "server.key")
            serial = pki.load_cert(files / "server.crt").serial_number
            assert served_serial(member["address"], 2379, admin) == serial

    args = ["certs", "renew", "--all", "--new-key", *cluster.args]
    planted = [  # between the two renames of a new pair: the member serves a mismatched pair
        Inside("os:replace", "before", "server.key"),
        Inside("os:replace", "before", "peer.key"),
    ]
    with write_load(target, "renew") as load:
        require_passed(sweep(Sweep(args, target, POINTS, load=load, check=check, planted=planted)))


def test_certs_rotate_ca(cluster: LocalCluster) -> None:
    target = LocalTarget(cluster)

    def check() -> None:
        assert not (cluster.state_dir / "pki" / "rotation").exists()
        assert len(pki.load_certs(cluster.state_dir / "pki" / "ca.crt")) == 1
        _certs_check(cluster)

    args = ["certs", "rotate-ca", *cluster.args]
    local = "etcdforge.services.local"
    planted = [
        Inside("etcdforge.ops.rotation_plan:restart_one", "before"),  # new trust, old process
        Inside(f"{local}:_finish_stop", "before"),  # SIGTERM sent, the member still stopping
        Inside(f"{local}:_finish_stop", "after"),  # stopped, its pid file not yet removed
        Inside(f"{local}:start", "before"),  # stopped, not started again
        BEFORE_PID_FILE,
        Inside("etcdforge.fsutil:write_temp", "after", "ca.crt"),  # a trust file half-swapped
    ]
    with write_load(target, "rotate") as load:
        require_passed(sweep(Sweep(args, target, POINTS, load=load, check=check, planted=planted)))


# --- kubeadm migrate -----------------------------------------------------------------------------


@pytest.fixture
def stacked(tmp_path: Path) -> Iterator[tuple[Stacked, dict[bytes, bytes]]]:
    source = start_stacked(tmp_path / "stacked", VERSION)
    try:
        yield source, fill(source, 300)
    finally:
        source.stop()


def test_kubeadm_migrate(
    cluster: LocalCluster, stacked: tuple[Stacked, dict[bytes, bytes]]
) -> None:
    source, expected = stacked
    target = LocalTarget(cluster)
    admin = TLSFiles(*target.admin_files())

    def check() -> None:
        for endpoint in target.endpoints:
            assert registry(endpoint, admin) == expected, endpoint
        assert not (cluster.state_dir / "migrate" / "progress.json").exists()

    args = ["kubeadm", "migrate", *cluster.args, "--from", source.url]
    args += ["--from-pki", str(source.pki_dir), "--replace"]
    planted = [
        Inside("etcdforge.snapshot:_run", "during", "save", delay=0.05),  # etcdctl left running
        Inside("etcdforge.snapshot:_run", "during", "restore", delay=0.05),  # etcdutl too
        Inside("pathlib:Path.rename", "before", "data.restoring"),  # old data aside, new not in
        Inside("etcdforge.ops.restore:start_all", "during", delay=0.3),
    ]
    require_passed(sweep(Sweep(args, target, POINTS, check=check, planted=planted)))
