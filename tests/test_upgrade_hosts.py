"""Upgrades on three real hosts (systemd + sshd, tests/fleet.py): 3.4.23 -> 3.5.16 -> 3.5.30.

One cluster for the module, in file order: refusals on 3.4.23 (nothing changes), `plan` of the
minor upgrade, `upgrade --to 3.5.16` under a writer killed midway and resumed, a 3.5.30 tarball
that cannot start (valid pinned checksum) rolled back, the real 3.5.30 by changing the spec and
running `apply`, and a minor downgrade refused by `apply` before any change.
"""

from __future__ import annotations

import json
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.apply_helpers import ReleaseServer, host_spec, publish, sha256_of, write_yaml
from tests.fleet import Host
from tests.helpers import CLIResult, kill_cli_at, require_binary, require_tarball, run_cli
from tests.load import WriteLoad

pytestmark = pytest.mark.slow


@dataclass
class Cluster:
    hosts: list[Host]
    spec: Path
    state: Path
    env: dict[str, str]
    server: ReleaseServer

    def cli(self, *args: str, timeout: float = 600) -> CLIResult:
        return run_cli(*args, "-f", str(self.spec), env=self.env, timeout=timeout)

    def set_release(self, version: str) -> None:
        data = host_spec(
            "upg", self.hosts, self.server.url(version), state_dir=str(self.state)
        )  # fmt: skip
        write_yaml(self.spec, data)

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{h.address}:2379" for h in self.hosts]

    def load(self, prefix: str) -> WriteLoad:
        pki_dir = self.state / "pki"
        admin = (pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key")
        return WriteLoad(self.endpoints, admin, prefix, reload=True)

    def versions(self) -> list[str]:
        rows = json.loads(self.cli("status", "-o", "json").stdout)
        assert all(r["healthy"] for r in rows), rows
        return [r["version"] for r in rows]

    def current(self) -> set[str]:
        return {h.run("readlink", "/opt/etcd/current").stdout.strip() for h in self.hosts}

    def pids(self) -> list[str]:
        show = ["systemctl", "show", "-p", "MainPID", "--value", "etcd.service"]
        return [h.run(*show).stdout.strip() for h in self.hosts]

    def no_missing_writes(self, load: WriteLoad) -> None:
        assert len(load.acked) > 20, load.failures[-3:]
        assert load.missing(self.endpoints) == dict.fromkeys(self.endpoints, 0)


@pytest.fixture(scope="module")
def cluster(
    fleet3: list[Host], release_server: ReleaseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    for version in ("3.5.16", "3.5.30"):
        require_tarball(version)
    work = tmp_path_factory.mktemp("upgrade-hosts")
    env = {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
    found = Cluster(fleet3, work / "cluster.yaml", work / "state", env, release_server)
    found.set_release("3.4.23")
    first = found.cli("apply")
    try:
        assert first.code == 0, first.stderr
        yield found
    finally:
        found.cli("reset", "--purge-data", "--yes")


def refused(result: CLIResult) -> str:
    assert result.code == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_refusals_before_any_download_or_change(cluster: Cluster) -> None:
    before = cluster.pids()
    skip = refused(cluster.cli("upgrade", "--to", "3.6.0"))
    assert "etcd 3.4.23 -> 3.6.0 skips 3.5" in skip
    bad = refused(cluster.cli("upgrade", "--to", "3.5.1", "--release", cluster.server.url("3.5.1")))
    assert "etcd 3.5.1 has a known data inconsistency bug" in bad
    assert cluster.pids() == before and cluster.current() == {"v3.4.23"}
    for host in cluster.hosts:
        assert host.run("ls", "/opt/etcd").stdout.split() == ["current", "v3.4.23"]


def test_plan_shows_the_path_the_snapshot_and_the_member_order(cluster: Cluster) -> None:
    cluster.set_release("3.5.16")
    try:
        plan = cluster.cli("plan")
    finally:
        cluster.set_release("3.4.23")
    assert plan.code == 0, plan.stderr
    out = plan.stdout
    assert "  - install etcd v3.5.16 into /opt/etcd/v3.5.16\n" in out, out
    assert "path: etcd 3.4.23 -> 3.5.16 (minor upgrade 3.4 -> 3.5)" in out
    assert "snapshot (to be taken, verified and kept): " in out
    assert "member order (followers first, the leader last after a hand-off): etcd-" in out
    assert "etcd 3.4.23 is affected by GHSA-6vch-q96h-7gc3" in plan.stderr
    assert cluster.current() == {"v3.4.23"}


def test_minor_upgrade_under_load_killed_midway_then_resumed(cluster: Cluster) -> None:
    args = ["upgrade", "-f", str(cluster.spec), "--to", "3.5.16"]
    args += ["--release", cluster.server.url("3.5.16")]
    stops: list[str] = []

    def second_stop(line: str) -> bool:
        if line.rstrip().endswith(": stop etcd.service"):
            stops.append(line)
        return len(stops) == 2

    with cluster.load("minor") as writes:
        seen = kill_cli_at(args, second_stop, env=cluster.env)
        assert "snapshot verified" in seen
        assert len(cluster.current()) == 2  # one host switched, the others not yet
        rerun = run_cli(*args, env=cluster.env, timeout=600)
        assert rerun.code == 0, rerun.stderr
    assert "resuming: " in rerun.stderr
    assert "checked: cluster version 3.5.0; every member's HashKV agrees" in rerun.stdout
    assert "etcd 3.5.16 is affected by GHSA-6vch-q96h-7gc3" in rerun.stderr
    assert "etcd 3.4.23 is affected" not in rerun.stderr  # it runs nowhere any more
    assert f"next: {cluster.spec}: set etcd.version: 3.5.16, etcd.release: " in rerun.stdout
    assert cluster.versions() == ["3.5.16"] * 3 and cluster.current() == {"v3.5.16"}
    cluster.no_missing_writes(writes)
    for host in cluster.hosts:  # side by side: the old release stays
        assert host.run("ls", "/opt/etcd").stdout.split() == ["current", "v3.4.23", "v3.5.16"]


def broken_tarball(directory: Path, version: str) -> Path:
    """An official-layout tarball whose etcd says it is `version` and cannot start."""
    top = directory / f"etcd-v{version}-linux-amd64"
    top.mkdir(parents=True)
    script = top / "etcd"
    script.write_text(
        "#!/bin/sh\n"
        f'[ "$1" = --version ] && {{ echo "etcd Version: {version}"; exit 0; }}\n'
        'echo "this etcd cannot start" >&2\nexit 1\n'
    )
    script.chmod(0o755)
    for tool in ("etcdctl", "etcdutl"):
        shutil.copy(require_binary(version).parent / tool, top / tool)
    tarball = directory / f"{top.name}.tar.gz"
    with tarfile.open(tarball, "w:gz", compresslevel=1) as archive:
        archive.add(top, top.name)
    return tarball


def test_a_release_that_cannot_start_is_rolled_back(cluster: Cluster, tmp_path: Path) -> None:
    tarball = broken_tarball(tmp_path, "3.5.30")
    publish(cluster.server.root / "broken", "3.5.30", tarball)
    url = f"{cluster.server.base_url}/broken/v3.5.30/{tarball.name}"
    with cluster.load("broken") as writes:
        result = cluster.cli(
            "upgrade", "--to", "3.5.30", "--release", url, "--sha256", sha256_of(tarball)
        )
    error = refused(result)
    assert "did not come up on etcd 3.5.30" in error and "this etcd cannot start" in error
    assert "rolled it back to v3.5.16 and stopped the upgrade" in error
    assert cluster.versions() == ["3.5.16"] * 3 and cluster.current() == {"v3.5.16"}
    cluster.no_missing_writes(writes)


def test_changing_the_spec_then_apply_takes_the_same_safe_path(cluster: Cluster) -> None:
    cluster.set_release("3.5.30")
    with cluster.load("patch") as writes:
        result = cluster.cli("apply")
    assert result.code == 0, result.stderr
    for phase in ("• health gate", "• snapshot", "• members", "• verify"):
        assert phase in result.stderr
    assert "keep the snapshot this upgrade took first" in result.stderr  # from the rolled back try
    assert "checked: cluster version 3.5.0; every member's HashKV agrees" in result.stdout
    assert cluster.versions() == ["3.5.30"] * 3 and cluster.current() == {"v3.5.30"}
    cluster.no_missing_writes(writes)
    again = cluster.cli("plan")
    assert "nothing to change" in again.stdout, again.stdout


def test_a_minor_downgrade_is_refused_by_apply_before_any_change(cluster: Cluster) -> None:
    before = cluster.pids()
    record = (cluster.state / "cluster.json").read_bytes()
    cluster.set_release("3.4.23")
    try:
        error = refused(cluster.cli("apply"))
    finally:
        cluster.set_release("3.5.30")
    assert "etcd 3.5.30 -> 3.4.23 (etcd-1 runs 3.5.30) is a minor downgrade: refused" in error
    assert cluster.pids() == before and cluster.current() == {"v3.5.30"}
    assert (cluster.state / "cluster.json").read_bytes() == record
