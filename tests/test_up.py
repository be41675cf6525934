"""`up`, `status`, `env` and `down` against real etcd processes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import ClusterFactory
from tests.helpers import LocalCluster, etcd_pids_under, run_cli

pytestmark = pytest.mark.slow


def test_up_gives_three_healthy_members(cluster: LocalCluster) -> None:
    result = cluster.cli("status", "-o", "json")
    assert result.code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["m1", "m2", "m3"]
    assert all(r["healthy"] and r["error"] is None for r in rows)
    assert sum(r["is_leader"] for r in rows) == 1
    assert {r["version"] for r in rows} == {"3.5.1"}
    assert len({r["raft_term"] for r in rows}) == 1
    assert all(r["db_size"] > 0 and r["raft_index"] > 0 for r in rows)
    assert set(rows[0]) == {
        "name",
        "endpoint",
        "version",
        "is_leader",
        "healthy",
        "db_size",
        "raft_term",
        "raft_index",
        "error",
        "db_in_use",
        "fragmentation",
        "quota",
        "alarms",
        "is_learner",
        "catch_up",
    }


def test_status_table_names_every_member(cluster: LocalCluster) -> None:
    result = cluster.cli("status")
    assert result.code == 0, result.stderr
    for member in cluster.data["members"]:
        assert member["name"] in result.stdout
        assert f"https://{member['address']}:2379" in result.stdout
    assert result.stdout.count("healthy") == 3


def test_put_through_one_member_read_through_each_other(cluster: LocalCluster) -> None:
    endpoints = cluster.env["ETCDCTL_ENDPOINTS"].split(",")
    put = cluster.etcdctl("put", "greeting", "hello", endpoint=endpoints[0])
    assert put.returncode == 0, put.stderr
    for endpoint in endpoints[1:]:
        got = cluster.etcdctl("get", "greeting", "--print-value-only", endpoint=endpoint)
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == "hello"


def test_env_drives_the_real_etcdctl(cluster: LocalCluster) -> None:
    result = cluster.cli("env")
    assert result.code == 0
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in result.stdout.splitlines()
    )
    assert set(exports) == {
        "ETCDCTL_API",
        "ETCDCTL_ENDPOINTS",
        "ETCDCTL_CACERT",
        "ETCDCTL_CERT",
        "ETCDCTL_KEY",
    }
    script = f'eval "$({os.sys.executable} -m etcdforge env {" ".join(cluster.args)})"; '
    script += "etcdctl put via-env yes >/dev/null && etcdctl get via-env --print-value-only"
    import subprocess

    from tests.helpers import etcdctl_binary

    path = f"{etcdctl_binary().parent}:{os.environ['PATH']}"
    proc = subprocess.run(
        ["bash", "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": path},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "yes"


def test_rerun_changes_nothing(cluster: LocalCluster) -> None:
    before = sorted(etcd_pids_under(cluster.state_dir))
    result = cluster.cli("up")
    assert result.code == 0, result.stderr
    assert "already running and healthy; nothing changed" in result.stdout
    assert sorted(etcd_pids_under(cluster.state_dir)) == before
    assert len(before) == 3


def test_kill_one_member_then_up_restarts_it_on_its_data(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory("crash")
    assert cluster.etcdctl("put", "survivor", "42").returncode == 0
    victim = cluster.state_dir / "members" / "m2"
    pid = int((victim / "etcd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid in etcd_pids_under(cluster.state_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid not in etcd_pids_under(cluster.state_dir)
    # If the victim was the leader the survivors need an election first: wait for it, bounded.
    health: list[bool] = []
    deadline = time.monotonic() + 20
    while health != [True, False, True] and time.monotonic() < deadline:
        health = [r["healthy"] for r in json.loads(cluster.cli("status", "-o", "json").stdout)]
    assert health == [True, False, True]
    result = cluster.cli("up")
    assert result.code == 0, result.stderr
    assert "started m2" in result.stdout
    m2 = f"https://{cluster.data['members'][1]['address']}:2379"
    got = cluster.etcdctl("get", "survivor", "--print-value-only", "--consistency=s", endpoint=m2)
    assert got.stdout.strip() == "42"
    assert len(etcd_pids_under(cluster.state_dir)) == 3


def test_down_then_up_keeps_data(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory("restart")
    assert cluster.etcdctl("put", "kept", "yes").returncode == 0
    result = cluster.cli("down")
    assert result.code == 0, result.stderr
    assert etcd_pids_under(cluster.state_dir) == []
    assert (cluster.state_dir / "pki" / "ca.key").exists()
    assert cluster.cli("up").code == 0
    assert cluster.etcdctl("get", "kept", "--print-value-only").stdout.strip() == "yes"


def test_down_purge_leaves_nothing(cluster_factory: ClusterFactory) -> None:
    cluster = cluster_factory("purge")
    result = cluster.cli("down", "--purge")
    assert result.code == 0, result.stderr
    assert etcd_pids_under(cluster.state_dir) == []
    assert not cluster.state_dir.exists()
    again = cluster.cli("status")
    assert again.code == 1
    assert "run `etcdforge up` first" in again.stderr


def test_default_cluster_from_nothing(tmp_path: Path) -> None:
    """The README's first command: no spec, no flags but an isolated state dir."""
    env = {"ETCDFORGE_STATE_HOME": str(tmp_path)}
    # The embedded default binds 127.0.1.1-3; skip rather than disturb a cluster running there.
    from etcdforge.ops.up import port_in_use

    if any(port_in_use(f"127.0.1.{i}", 2379) for i in (1, 2, 3)):
        pytest.skip("127.0.1.1-3:2379 already in use on this machine")
    try:
        result = run_cli("up", env=env)
        assert result.code == 0, result.stderr
        assert "started etcd-1, etcd-2, etcd-3" in result.stdout
        assert "known data inconsistency bug" in result.stderr  # the dev-cluster warning
        status = run_cli("status", "-o", "json", env=env)
        assert [r["name"] for r in json.loads(status.stdout)] == ["etcd-1", "etcd-2", "etcd-3"]
    finally:
        run_cli("down", "--purge", env=env)
    assert etcd_pids_under(tmp_path) == []


def test_cert_dir_keeps_ca_keys_apart_and_purge_removes_it(
    cluster_factory: ClusterFactory, tmp_path: Path
) -> None:
    cert_dir = tmp_path / "guarded-pki"
    cluster = cluster_factory("certdir", count=1, cert_dir=str(cert_dir))
    assert (cert_dir / "ca.key").exists() and (cert_dir / "peer-ca.key").exists()
    assert oct(cert_dir.stat().st_mode & 0o777) == "0o700"
    assert not list(cluster.state_dir.rglob("ca.key")), "no CA key under the state dir"
    assert cluster.etcdctl("put", "k", "v").returncode == 0  # the admin cert from cert_dir works
    assert cluster.cli("down", "--purge").code == 0
    assert not cert_dir.exists() and not cluster.state_dir.exists()
