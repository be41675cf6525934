"""`etcdforge check` on three real hosts (systemd + sshd, tests/fleet.py) deployed by `apply`.

The members run etcd 3.5.30 from systemd with their settings in `ETCD_*` variables only (no
flags), so the CIS rows passing proves the audit reads the process's environment over SSH, as
kube-bench does. Then one host's data dir is opened up (`chmod 755`) and only its row fails.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from etcdforge.hosts import SSHHost, SSHTarget
from tests.apply_helpers import ReleaseServer, host_spec, write_yaml
from tests.fleet import Host
from tests.helpers import CLIResult, require_tarball, run_cli

pytestmark = pytest.mark.slow
VERSION = "3.5.30"
BACKUP = ("backup-age", "cluster")
ADVISED = {("version-advisories", f"etcd-{n}"): "warn" for n in (1, 2, 3)}  # 3.5.30's advisories


@dataclass
class Deployed:
    hosts: list[Host]
    spec: Path
    env: dict[str, str]

    def cli(self, *args: str, timeout: float = 300) -> CLIResult:
        return run_cli(*args, "-f", str(self.spec), env=self.env, timeout=timeout)

    def check(self) -> tuple[int, dict[str, Any]]:
        result = self.cli("check", "-o", "json")
        assert result.code in (0, 1, 3), result.stderr
        return result.code, json.loads(result.stdout)


@pytest.fixture(scope="module")
def deployed(
    fleet3: list[Host], release_server: ReleaseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    require_tarball(VERSION)
    work = tmp_path_factory.mktemp("check3")
    data = host_spec("check3", fleet3, release_server.url(VERSION), state_dir=str(work / "state"))
    deployed = Deployed(
        fleet3,
        write_yaml(work / "cluster.yaml", data),
        {"ETCDFORGE_CACHE_DIR": str(work / "cache")},
    )
    first = deployed.cli("apply", timeout=600)
    try:
        assert first.code == 0, first.stderr
        yield deployed
    finally:
        deployed.cli("reset", "--purge-data", "--yes")


def not_passing(report: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(r["check"], r["member"]): r["result"] for r in report["rows"] if r["result"] != "pass"}


def rows(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["check"], r["member"]): r for r in report["rows"]}


def test_check_passes_on_hosts_deployed_by_apply(deployed: Deployed) -> None:
    code, report = deployed.check()
    assert code == 3 and not_passing(report) == {BACKUP: "warn", **ADVISED}
    found = rows(report)
    assert found[("cis-2.2", "etcd-1")]["seen"] == "--client-cert-auth=true"  # from ETCD_*
    assert found[("cis-1.1.12", "etcd-2")]["seen"] == "/var/lib/etcd etcd:etcd"
    assert "/etc/etcd/pki/server.key 0600" in found[("key-file-mode", "etcd-3")]["seen"]
    assert "s from the admin machine" in found[("clock-skew", "etcd-1")]["seen"]
    assert "/var/lib/etcd" in found[("storage-disk", "etcd-3")]["seen"]
    backup = deployed.cli("backup")
    assert backup.code == 0, backup.stderr
    code, report = deployed.check()
    assert code == 3 and not_passing(report) == ADVISED
    assert "h old" in rows(report)[BACKUP]["seen"]


def test_data_dir_0755_on_one_host_fails_only_there(deployed: Deployed) -> None:
    host = deployed.hosts[1]
    host.run("chmod", "755", "/var/lib/etcd")
    try:
        code, report = deployed.check()
    finally:
        host.run("chmod", "700", "/var/lib/etcd")
    assert code == 1
    failing = not_passing(report)
    failing.pop(BACKUP, None)  # warns only when this test runs without the one above
    assert failing == {("cis-1.1.11", "etcd-2"): "fail", **ADVISED}
    assert rows(report)[("cis-1.1.11", "etcd-2")]["fix"] == "chmod 700 /var/lib/etcd"
    assert deployed.check()[0] == 3


def test_more_commands_at_once_than_sshd_allows_channels_all_run(deployed: Deployed) -> None:
    """sshd refuses an 11th concurrent channel on one connection (MaxSessions 10): a burst of
    commands on one SSHHost waits for free channels instead of failing."""
    host = deployed.hosts[0]
    target = SSHTarget(host.name, host.address, host.ssh_port, host.user, host.key_path,
                       host.known_hosts)  # fmt: skip

    async def burst() -> list[str]:
        ssh = await SSHHost.connect(target)
        try:
            runs = [ssh.run(["sh", "-c", f"sleep 0.3; echo {n}"]) for n in range(24)]
            return [r.out.strip() for r in await asyncio.gather(*runs)]
        finally:
            await ssh.close()

    assert asyncio.run(burst()) == [str(n) for n in range(24)]
