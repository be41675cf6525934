"""Every supported etcd release comes up; the supervisor never signals a process it did not start."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from etcdforge.binaries import check_version, find_etcd, parse_version
from etcdforge.errors import ServiceError
from etcdforge.ops.target import Selection
from etcdforge.ops.up import up
from etcdforge.record import read_record
from etcdforge.services import local
from tests.conftest import ClusterFactory
from tests.helpers import (
    DEBIAN_RELEASES,
    etcd_pids_under,
    release_dir,
    require_binary,
    spec_data,
    write_spec,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("version", ["3.4.23", "3.5.0", "3.5.1", *DEBIAN_RELEASES])
def test_up_runs_each_supported_release(cluster_factory: ClusterFactory, version: str) -> None:
    cluster = cluster_factory(f"v{version.replace('.', '')}", version=version)
    rows = json.loads(cluster.cli("status", "-o", "json").stdout)
    assert len(rows) == 3
    assert {r["version"] for r in rows} == {version}
    assert all(r["healthy"] for r in rows)
    assert cluster.etcdctl("put", "k", version).returncode == 0
    assert cluster.etcdctl("get", "k", "--print-value-only").stdout.strip() == version


@pytest.mark.parametrize("version", DEBIAN_RELEASES)
def test_debian_built_releases_are_detected_with_their_tools(version: str) -> None:
    """Debian's builds print their version like the official ones and need no warning."""
    found = find_etcd(require_binary(version))
    assert found.version == parse_version(version)
    assert found.etcdctl == release_dir(version) / "etcdctl"
    assert found.etcdutl == release_dir(version) / "etcdutl"
    assert check_version(found.version, dev_cluster=False, allow_unsafe=False) is None


def test_each_cluster_gets_its_own_token_and_keeps_it(cluster_factory: ClusterFactory) -> None:
    first = cluster_factory("tok-a", count=1)
    second = cluster_factory("tok-b", count=1)
    token_a = read_record(first.state_dir)
    token_b = read_record(second.state_dir)
    assert token_a is not None and token_b is not None
    assert token_a.token != token_b.token
    assert first.cli("up").code == 0
    again = read_record(first.state_dir)
    assert again is not None and again.token == token_a.token


def test_down_never_signals_a_process_it_did_not_start(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory("pidsafe", count=1)
    member_dir = cluster.state_dir / "members" / "m1"
    pid_file = member_dir / "etcd.pid"
    real_pid = int(pid_file.read_text())
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        pid_file.write_text(f"{stranger.pid}\n")  # as if the PID had been recycled
        result = cluster.cli("down")
        assert result.code == 0, result.stderr
        assert stranger.poll() is None, "a process that is not our etcd must survive `down`"
        # The member's own etcd is found by its data dir, not by the stale pid file, and stopped.
        assert "stopped m1" in result.stdout
        assert real_pid not in etcd_pids_under(cluster.state_dir)
    finally:
        stranger.kill()
        stranger.wait(timeout=10)
    assert not local.stop(pid_file, member_dir / "data")  # nothing of ours is left to stop
    assert etcd_pids_under(cluster.state_dir) == []


def test_an_etcd_whose_pid_file_was_never_written_is_found_not_orphaned(
    cluster_factory: ClusterFactory,
) -> None:
    """A command killed between launching etcd and writing its pid file leaves a running member
    no pid file names; the next command finds it by its data dir, so `up` does not refuse a
    "busy" port and `down` stops it."""
    cluster = cluster_factory("orphan", count=1)
    pid_file = cluster.state_dir / "members" / "m1" / "etcd.pid"
    real_pid = int(pid_file.read_text())
    pid_file.unlink()
    again = cluster.cli("up")
    assert again.code == 0, again.stderr
    assert "nothing changed" in again.stdout
    assert etcd_pids_under(cluster.state_dir) == [real_pid]
    stopped = cluster.cli("down")
    assert stopped.code == 0 and "stopped m1" in stopped.stdout, stopped.stderr
    assert etcd_pids_under(cluster.state_dir) == []


def test_port_taken_by_another_process_stops_before_any_change(tmp_path: Path) -> None:
    binary = require_binary("3.5.1")
    data = spec_data("busy", 1, binary)
    spec = write_spec(tmp_path, data)
    address = data["members"][0]["address"]
    import socket

    with socket.socket() as squatter:
        squatter.bind((address, 2379))
        squatter.listen()
        state = tmp_path / "state"
        with pytest.raises(ServiceError) as info:
            up(Selection(file=spec, state_dir=state))
        assert str(info.value) == (
            f"member m1: {address}:2379 is already in use by another process; "
            "stop it or give the member other addresses in the spec"
        )
        assert not state.exists()
