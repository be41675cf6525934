"""`etcdforge upgrade` on a local 3-member cluster: 3.4.23 -> 3.5.16 -> 3.5.30 under a writer.

One cluster for the module, in file order: the refusals first (on 3.4.23: nothing may change),
then the minor upgrade killed midway and resumed, a broken 3.5.30 rolled back, the real 3.5.30,
and the refusals that need the upgraded cluster.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from etcdforge.record import read_record
from etcdforge.services.local import LocalRuntime, stop
from tests.conftest import ClusterFactory
from tests.helpers import (
    LocalCluster,
    etcd_binary,
    etcd_pids_under,
    kill_cli_at,
    require_binary,
)
from tests.load import WriteLoad

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    for version in ("3.5.16", "3.5.30"):
        require_binary(version)
    return cluster_factory("upg", version="3.4.23")


def binary(version: str) -> str:
    return str(require_binary(version))


def versions(cluster: LocalCluster) -> list[str]:
    rows = json.loads(cluster.cli("status", "-o", "json").stdout)
    assert all(r["healthy"] for r in rows), rows
    return [r["version"] for r in rows]


def endpoints(cluster: LocalCluster) -> list[str]:
    return [f"https://{m['address']}:2379" for m in cluster.data["members"]]


def load(cluster: LocalCluster, prefix: str) -> WriteLoad:
    pki_dir = cluster.state_dir / "pki"
    admin = (pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key")
    return WriteLoad(endpoints(cluster), admin, prefix, reload=True)


def refused(cluster: LocalCluster, *args: str) -> str:
    """Run an upgrade that must be refused: one line, exit 1, no member restarted."""
    before = sorted(etcd_pids_under(cluster.state_dir))
    result = cluster.cli("upgrade", *args)
    assert result.code == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert sorted(etcd_pids_under(cluster.state_dir)) == before
    assert not (cluster.state_dir / "upgrade.json").exists()
    return errors[0]


def test_skipping_a_minor_and_a_known_bad_target_are_refused(cluster: LocalCluster) -> None:
    skip = refused(cluster, "--to", "3.6.0")
    assert "etcd 3.4.23 -> 3.6.0 skips 3.5" in skip
    bad = refused(cluster, "--to", "3.5.1", "--binary", str(etcd_binary("3.5.1")))
    assert "etcd 3.5.1 has a known data inconsistency bug" in bad
    assert not (cluster.state_dir / "snapshots").exists()


def test_3_4_to_3_5_with_etcd_auth_enabled_is_refused(cluster: LocalCluster) -> None:
    assert cluster.etcdctl("user", "add", "root:pw").returncode == 0
    assert cluster.etcdctl("auth", "enable").returncode == 0
    try:
        error = refused(cluster, "--to", "3.5.16", "--binary", binary("3.5.16"))
        assert "with etcd auth enabled" in error
    finally:
        assert cluster.etcdctl("--user", "root:pw", "auth", "disable").returncode == 0
        assert cluster.etcdctl("user", "delete", "root").returncode == 0


def test_an_unhealthy_cluster_is_refused(cluster: LocalCluster) -> None:
    member = cluster.state_dir / "members" / "m3"
    assert stop(member / "etcd.pid", member / "data")
    try:
        error = refused(cluster, "--to", "3.5.16", "--binary", binary("3.5.16"))
        assert "not upgrading: the cluster is not healthy" in error and "m3" in error
    finally:
        assert cluster.cli("up").code == 0


def test_dry_run_prints_the_path_the_snapshot_and_the_order(cluster: LocalCluster) -> None:
    result = cluster.cli("upgrade", "--to", "3.5.16", "--binary", binary("3.5.16"), "--dry-run")
    assert result.code == 0, result.stderr
    out = result.stdout
    assert "path: etcd 3.4.23 -> 3.5.16 (minor upgrade 3.4 -> 3.5)" in out
    assert "snapshot (to be taken, verified and kept): " in out and "-v3.4.23-to-v3.5.16.db" in out
    assert "member order (followers first, the leader last after a hand-off): " in out
    assert "etcd 3.4.23 is affected by GHSA-6vch-q96h-7gc3" in result.stderr
    assert versions(cluster) == ["3.4.23"] * 3


def test_minor_upgrade_under_load_killed_midway_then_resumed(cluster: LocalCluster) -> None:
    args = ["upgrade", *cluster.args, "--to", "3.5.16", "--binary", binary("3.5.16")]
    stops = []

    def second_stop(line: str) -> bool:
        if line.rstrip().endswith(": stop etcd"):
            stops.append(line)
        return len(stops) == 2

    with load(cluster, "minor") as writes:
        seen = kill_cli_at(args, second_stop)
        assert "snapshot verified" in seen
        rerun = cluster.cli("upgrade", "--to", "3.5.16", "--binary", binary("3.5.16"))
        assert rerun.code == 0, rerun.stderr
    assert "resuming: " in rerun.stderr  # one member was on 3.5.16 already
    assert "keep the snapshot this upgrade took first" in rerun.stderr
    assert "checked: cluster version 3.5.0; every member's HashKV agrees" in rerun.stdout
    assert versions(cluster) == ["3.5.16"] * 3
    assert len(writes.acked) > 50 and writes.missing(endpoints(cluster)) == dict.fromkeys(
        endpoints(cluster), 0
    )
    snapshots = list((cluster.state_dir / "snapshots").iterdir())
    assert len(snapshots) == 1 and stat.S_IMODE(snapshots[0].stat().st_mode) == 0o600
    assert str(snapshots[0]) in rerun.stdout
    assert not (cluster.state_dir / "upgrade.json").exists()
    assert not list(cluster.state_dir.glob("members/*/etcd.binary"))
    record = read_record(cluster.state_dir)
    assert record is not None and (record.version, record.binary) == ("3.5.16", binary("3.5.16"))


def broken_etcd(directory: Path, version: str) -> Path:
    """An etcd that says it is `version` and cannot start, beside the real client tools."""
    directory.mkdir()
    script = directory / "etcd"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && {{ echo "etcd Version: {version}"; exit 0; }}\n'
        'echo "this etcd cannot start" >&2\nexit 1\n'
    )
    script.chmod(0o755)
    real = require_binary(version).parent
    for tool in ("etcdctl", "etcdutl"):
        os.symlink(real / tool, directory / tool)
    return script


def test_a_target_that_cannot_start_is_rolled_back_then_the_real_one_goes_in(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    broken = broken_etcd(tmp_path / "broken", "3.5.30")
    with load(cluster, "patch") as writes:
        failed = cluster.cli("upgrade", "--to", "3.5.30", "--binary", str(broken))
        assert failed.code == 1, failed.stdout
        errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "this etcd cannot start" in errors[0], failed.stderr
        assert f"rolled it back to {binary('3.5.16')} and stopped the upgrade" in errors[0]
        assert versions(cluster) == ["3.5.16"] * 3
        done = cluster.cli("upgrade", "--to", "3.5.30", "--binary", binary("3.5.30"))
        assert done.code == 0, done.stderr
    assert versions(cluster) == ["3.5.30"] * 3
    assert writes.missing(endpoints(cluster)) == dict.fromkeys(endpoints(cluster), 0)
    assert "keep the snapshot this upgrade took first" in done.stderr  # the one before the try
    assert "etcd 3.5.30 is affected by GHSA-6vch-q96h-7gc3" in done.stderr
    assert "etcd 3.5.16 is affected" not in done.stderr  # it runs nowhere any more
    assert f"next: {cluster.spec_path}: set etcd.binary: {binary('3.5.30')}" in done.stdout
    runtime = LocalRuntime(read_record(cluster.state_dir))  # type: ignore[arg-type]
    assert {str(runtime.binary(m["name"])) for m in cluster.data["members"]} == {binary("3.5.30")}


def test_minor_downgrade_and_a_stale_spec_in_up_are_refused(cluster: LocalCluster) -> None:
    error = refused(cluster, "--to", "3.4.23", "--binary", binary("3.4.23"))
    assert "etcd 3.5.30 -> 3.4.23 (m1 runs 3.5.30) is a minor downgrade: refused" in error
    stale = cluster.cli("up")  # the spec file still names 3.4.23
    assert stale.code == 1 and len(stale.stderr.splitlines()) == 1, stale.stderr
    assert f"downgrades are refused: etcd.binary: {binary('3.5.30')} in the spec" in stale.stderr
    assert versions(cluster) == ["3.5.30"] * 3
    status = cluster.cli("status")
    assert "warning: etcd 3.5.30 is affected by GHSA-6vch-q96h-7gc3" in status.stderr
    assert "3.5.33 is the first 3.5 release none of these affects" in status.stderr
