"""`kubeadm migrate` into a cluster on real hosts: the production case (dedicated etcd machines).

A kubeadm-shaped stacked etcd runs on the admin machine, on loopback: the admin machine takes
the snapshot, so the fleet hosts never need to reach it. The target is 3 fleet hosts deployed
with `apply`. The refusal runs first, while the target is still empty, so "nothing changed"
is easy to see: no snapshot, no data dir moved, no unit restarted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from etcdforge.kubeadm import KubeadmPaths
from etcdforge.ops.kubeadm_migrate import migrate as migrate_op
from etcdforge.ops.plan import StepLines
from etcdforge.ops.target import Selection
from etcdforge.tls import TLSFiles
from tests.apply_helpers import ReleaseServer, host_spec, write_yaml
from tests.fleet import Host
from tests.helpers import CLIResult, etcd_pids_under, run_cli
from tests.test_kubeadm_cluster import Stacked, fill, registry, start_stacked

DATA = "/var/lib/etcd"
UNIT = "etcd.service"


@dataclass
class Setup:
    hosts: list[Host]
    spec: Path
    state: Path
    env: dict[str, str]
    source: Stacked
    expected: dict[bytes, bytes]

    def kube(self, command: str, *args: str) -> CLIResult:
        return run_cli("kubeadm", command, "-f", str(self.spec), *args, env=self.env, timeout=600)

    def migrate(self, *args: str) -> CLIResult:
        return self.kube(
            "migrate", "--from", self.source.url, "--from-pki", str(self.source.pki_dir), *args
        )

    @property
    def admin_tls(self) -> TLSFiles:
        pki = self.state / "pki"
        return TLSFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{h.address}:2379" for h in self.hosts]

    def main_pids(self) -> list[str]:
        return [
            h.run("systemctl", "show", "-p", "MainPID", "--value", UNIT).stdout.strip()
            for h in self.hosts
        ]


@pytest.fixture(scope="module")
def setup(
    fleet_factory: Callable[[int], list[Host]],
    release_server: ReleaseServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("migrate-hosts")
    source = start_stacked(work / "stacked", "3.5.1")
    try:
        expected = fill(source, 3000)
        hosts = fleet_factory(3)
        data = host_spec(
            "mighosts",
            hosts,
            release_server.url("3.5.1"),
            etcd={"allow_unsafe_version": True},
            state_dir=str(work / "state"),
        )
        spec = write_yaml(work / "cluster.yaml", data)
        env = {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
        made = Setup(hosts, spec, work / "state", env, source, expected)
        try:
            applied = run_cli("apply", "-f", str(spec), env=env, timeout=600)
            assert applied.code == 0, applied.stderr
            yield made
        finally:
            run_cli("reset", "-f", str(spec), "--purge-data", "--yes", env=env, timeout=300)
    finally:
        source.stop()
    assert etcd_pids_under(source.root) == []


def leftovers(host: Host) -> list[str]:
    """Anything a migration leaves beside the data dir: snapshots, restores, old data."""
    found = host.run("find", "/var/lib", "-maxdepth", "1", "-name", "*etcd*").stdout.split()
    return sorted(p for p in found if p != DATA)


def test_stopped_member_refuses_and_changes_nothing(setup: Setup) -> None:
    victim = setup.hosts[1]
    victim.run("systemctl", "stop", UNIT)
    try:
        pids = setup.main_pids()
        db = victim.run("sha256sum", f"{DATA}/member/snap/db").stdout
        result = setup.migrate()
        assert result.code == 1, result.stdout + result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error: target member etcd-2 "), lines[0]
        assert "not healthy" in lines[0]
        assert setup.main_pids() == pids
        assert victim.run("sha256sum", f"{DATA}/member/snap/db").stdout == db
        assert not (setup.state / "migrate" / "snapshot.db").exists()
        assert registry(setup.source.url, setup.source.healthcheck_tls) == setup.expected
        for host in setup.hosts:
            assert leftovers(host) == [], host
    finally:
        victim.run("systemctl", "start", UNIT)
    healed = run_cli("apply", "-f", str(setup.spec), env=setup.env, timeout=600)
    assert healed.code == 0, healed.stderr


def test_migrate_into_hosts_moves_every_registry_key(setup: Setup, tmp_path: Path) -> None:
    expected = setup.expected
    assert len(expected) > 2900
    result = setup.migrate()
    assert result.code == 0, result.stderr
    assert f"{len(expected)} /registry/ keys from {setup.source.url}" in result.stderr
    assert "identical on every member" in result.stderr
    for i, host in enumerate(setup.hosts):
        assert f"restore etcd-{i + 1} on etcd-{i + 1} ({host.address})" in result.stderr
    document = yaml.safe_load(result.stdout)
    assert document["kind"] == "ClusterConfiguration"
    assert document["etcd"]["external"]["endpoints"] == setup.endpoints

    # Every member, read with the admin certificate and with the apiserver's own.
    out = tmp_path / "etc-kubernetes-pki"
    assert setup.kube("certs", "--out", str(out)).code == 0
    apiserver = TLSFiles(
        out / "etcd" / "ca.crt",
        out / "apiserver-etcd-client.crt",
        out / "apiserver-etcd-client.key",
    )
    for endpoint in setup.endpoints:
        assert registry(endpoint, setup.admin_tls) == expected, endpoint
        assert registry(endpoint, apiserver) == expected, endpoint

    for host in setup.hosts:
        assert host.run("stat", "-c", "%a %U:%G", DATA).stdout.strip() == "700 etcd:etcd"
        foreign = host.run("find", DATA, "!", "-user", "etcd", "-o", "!", "-group", "etcd")
        assert foreign.stdout.strip() == "", host
        assert leftovers(host) == [], host  # no snapshot, no .restoring, old data removed
    assert not (setup.state / "migrate" / "progress.json").exists()
    assert (setup.state / "migrate" / "last.json").exists()

    # A second migration would replace that data: refused without --replace, nothing changed.
    pids = setup.main_pids()
    again = setup.migrate()
    assert again.code == 1
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    assert "already holds" in again.stderr and "--replace" in again.stderr
    assert setup.main_pids() == pids
    for host in setup.hosts:
        assert leftovers(host) == [], host


class _Interrupted(Exception):
    pass


def test_interrupted_replace_on_hosts_resumes(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after etcd-1 is restored: members stay down, the rerun finishes with that snapshot."""
    for key, value in setup.env.items():
        monkeypatch.setenv(key, value)

    def progress(title: str) -> None:
        if title.startswith("restore etcd-2 "):
            raise _Interrupted

    with pytest.raises(_Interrupted):
        migrate_op(
            Selection(file=setup.spec),
            setup.source.url,
            setup.source.pki_dir,
            KubeadmPaths(),
            replace=True,
            progress=StepLines(progress),
        )
    assert (setup.state / "migrate" / "progress.json").exists()
    for host in setup.hosts:
        state = host.run("systemctl", "is-active", UNIT, check=False).stdout.strip()
        assert state != "active", host
    assert leftovers(setup.hosts[0]) == [f"{DATA}.pre-migrate"]
    assert leftovers(setup.hosts[1]) == []

    resumed = setup.migrate("--replace")
    assert resumed.code == 0, resumed.stderr
    assert "restore etcd-1 " not in resumed.stderr and "restore etcd-3 " in resumed.stderr
    for endpoint in setup.endpoints:
        assert registry(endpoint, setup.admin_tls) == setup.expected, endpoint
    for host in setup.hosts:
        assert leftovers(host) == [], host
