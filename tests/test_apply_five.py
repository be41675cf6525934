"""`apply` of a 5-member etcd 3.4.23 cluster from a local tarball with a pinned sha256."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.apply_helpers import host_spec, sha256_of, write_yaml
from tests.fleet import Host
from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_five_hosts_from_a_local_pinned_tarball(
    fleet5: list[Host], etcd_releases: dict[str, Path], tmp_path: Path
) -> None:
    tarball = etcd_releases["3.4.23"]
    data = host_spec(
        "fleet5",
        fleet5,
        str(tarball),
        user="root",
        etcd={"sha256": sha256_of(tarball)},
        state_dir=str(tmp_path / "state"),
    )
    spec = write_yaml(tmp_path / "cluster.yaml", data)
    args = ["-f", str(spec)]
    try:
        result = run_cli("apply", *args, timeout=600)
        assert result.code == 0, result.stderr
        assert "5 member(s), etcd 3.4.23: all healthy" in result.stdout
        assert "warning" not in result.stderr  # 3.4.23 is not a known-bad release
        rows = json.loads(run_cli("status", *args, "-o", "json").stdout)
        assert [r["name"] for r in rows] == [f"etcd-{i}" for i in range(1, 6)]
        assert all(r["healthy"] and r["version"] == "3.4.23" for r in rows)
        env = run_cli("env", *args).stdout
        assert ",".join(f"https://{h.address}:2379" for h in fleet5) in env
        # 3.4 ships no etcdutl: its stable link dangles harmlessly, etcd and etcdctl resolve.
        host = fleet5[4]
        assert "3.4.23" in host.run("/usr/local/bin/etcdctl", "version").stdout
        again = run_cli("apply", *args, timeout=600)
        assert "nothing changed, nothing restarted" in again.stdout, again.stderr
    finally:
        reset = run_cli("reset", *args, "--purge-data", "--yes", timeout=300)
    assert reset.code == 0, reset.stderr
    for host in fleet5:
        assert host.run("pgrep", "-x", "etcd", check=False).returncode == 1
