"""Backups, restore and recovery of a cluster on three real hosts (systemd + sshd, tests/fleet.py),
deployed by `apply` with etcd 3.5.30: a backup under writes uploaded to another host over ssh://,
a restore into every host, and a recovery after two of the three hosts are destroyed."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.apply_helpers import ReleaseServer, host_spec, write_yaml
from tests.fleet import Host
from tests.helpers import CLIResult, require_tarball, run_cli
from tests.load import WriteLoad, read_keys, tls_context

pytestmark = pytest.mark.slow
BUMP = 1_000_000_000

# What etcdforge installed on a host, and the etcd user: a destroyed host comes back without.
_DESTROY = r"""
systemctl kill -s KILL etcd.service 2>/dev/null; systemctl stop etcd.service 2>/dev/null
rm -rf /var/lib/etcd /etc/etcd /opt/etcd /usr/local/bin/etcd /usr/local/bin/etcdctl \
  /usr/local/bin/etcdutl /etc/systemd/system/etcd.service
systemctl daemon-reload; userdel etcd 2>/dev/null; true
"""


@dataclass
class HostCluster:
    hosts: list[Host]
    spec: Path
    state: Path
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 600) -> CLIResult:
        return run_cli(*args, "-f", str(self.spec), env=self.env, timeout=timeout)

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{h.address}:2379" for h in self.hosts]

    @property
    def admin(self) -> tuple[Path, Path, Path]:
        pki = self.state / "pki"
        return pki / "ca.crt", pki / "admin.crt", pki / "admin.key"

    def http(self) -> httpx.Client:
        return httpx.Client(verify=tls_context(*self.admin), timeout=10)

    def status(self) -> list[dict[str, object]]:
        return list(json.loads(self.cli("status", "-o", "json").stdout))

    def keys_on_each(self, prefix: str) -> dict[str, set[str]]:
        with self.http() as client:
            return {e: read_keys(client, e, prefix) for e in self.endpoints}


def _revision(cluster: HostCluster) -> int:
    with cluster.http() as client:
        reply = client.post(f"{cluster.endpoints[0]}/v3/maintenance/status", json={})
        return int(reply.json()["header"]["revision"])


@pytest.fixture(scope="module")
def cluster(
    fleet_factory: Callable[[int], list[Host]],
    release_server: ReleaseServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[HostCluster]:
    require_tarball("3.5.30")
    hosts = fleet_factory(3)
    work = tmp_path_factory.mktemp("bkhosts")
    data = host_spec(
        "bkhosts",
        hosts,
        release_server.url("3.5.30"),
        state_dir=str(work / "state"),
        backup={
            "dest": str(work / "backups"),
            "identity_file": str(hosts[2].key_path),
            "known_hosts": str(hosts[2].known_hosts),
        },
    )
    spec = write_yaml(work / "cluster.yaml", data)
    deployed = HostCluster(
        hosts, spec, work / "state", {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
    )
    first = deployed.cli("apply")
    try:
        assert first.code == 0, first.stderr
        yield deployed
    finally:
        deployed.cli("reset", "--purge-data", "--yes")


def test_backup_under_writes_to_another_host_over_ssh(cluster: HostCluster) -> None:
    keeper = cluster.hosts[2]
    dest = f"ssh://deploy@{keeper.address}/home/deploy/etcd-backups"
    with WriteLoad(cluster.endpoints, cluster.admin, "/hb/load", reload=True) as writer:
        time.sleep(0.5)
        remote = cluster.cli("backup", "--dest", dest)
        local = cluster.cli("backup")
    assert remote.code == 0, remote.stderr
    assert local.code == 0, local.stderr
    assert f"{dest}/bkhosts-" in remote.stdout
    listing = keeper.run("sh", "-c", "stat -c '%a %U %n' /home/deploy/etcd-backups/*").stdout
    lines = listing.splitlines()
    assert len(lines) == 3 and all(line.startswith("600 deploy ") for line in lines)
    check = keeper.run(
        "sh", "-c", "cd /home/deploy/etcd-backups && sha256sum -c *.sha256", check=False
    )
    assert check.returncode == 0, check.stdout
    verified = cluster.cli("backup", "verify", "--dest", dest)
    assert verified.code == 0 and verified.stdout.startswith("ok: ssh://"), verified.stderr
    listed = json.loads(cluster.cli("backup", "list", "--dest", dest, "-o", "json").stdout)
    assert len(listed) == 1 and listed[0]["cluster"] == "bkhosts"
    assert writer.failures == [] and max(writer.missing(cluster.endpoints).values()) == 0


def test_restore_every_host_from_a_backup_taken_under_writes(cluster: HostCluster) -> None:
    with WriteLoad(cluster.endpoints, cluster.admin, "/hb/restore", reload=True) as writer:
        time.sleep(0.5)
        acked_before = set(writer.acked)
        made = cluster.cli("backup")
        time.sleep(0.3)
    assert made.code == 0, made.stderr
    backups = sorted((cluster.spec.parent / "backups").glob("*.db"))
    snapshot = backups[-1]
    meta = json.loads(Path(f"{snapshot}.json").read_text())
    newest = _revision(cluster)
    result = cluster.cli("restore", str(snapshot), "--yes")
    assert result.code == 0, result.stderr
    token = json.loads((cluster.state / "cluster.json").read_text())["token"]
    for host in cluster.hosts:
        env = host.run("cat", "/etc/etcd/etcd.env").stdout
        assert f"ETCD_INITIAL_CLUSTER_TOKEN={token}\n" in env
        assert host.run("test", "!", "-e", "/var/lib/etcd.pre-migrate", check=False).returncode == 0
    for endpoint, keys in cluster.keys_on_each("/hb/restore").items():
        assert acked_before <= keys, endpoint
    assert _revision(cluster) >= int(meta["revision"]) + BUMP > newest
    again = cluster.cli("apply")
    assert again.code == 0 and "nothing restarted" in again.stdout, again.stdout


def test_recover_after_two_of_three_hosts_are_destroyed(cluster: HostCluster) -> None:
    with WriteLoad(cluster.endpoints, cluster.admin, "/hb/recover", reload=True) as writer:
        time.sleep(1.0)
    acked = set(writer.acked)
    newest = _revision(cluster)
    time.sleep(0.5)  # followers apply what was committed
    for host in cluster.hosts[1:]:
        host.run("sh", "-c", _DESTROY)
    refused = cluster.cli("status")
    assert refused.code == 1
    plan = cluster.cli("recover", "--from-member", "etcd-1", "--dry-run")
    assert plan.code == 0 and "etcd-2: does not answer" in plan.stdout, plan.stderr
    result = cluster.cli("recover", "--from-member", "etcd-1", "--yes")
    assert result.code == 0, result.stderr
    assert all(row["healthy"] for row in cluster.status())
    for endpoint, keys in cluster.keys_on_each("/hb/recover").items():
        assert acked <= keys, endpoint
    assert _revision(cluster) >= newest + BUMP
    for host in cluster.hosts:
        active = host.run("systemctl", "is-active", "etcd.service", check=False).stdout.strip()
        assert active == "active"
