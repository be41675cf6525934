"""Bad inputs stop `apply` before anything changes on any host, with one line naming the host.

Three fresh fleet hosts of their own; each test undoes what it did to them. The last test does
deploy, on hosts where the distribution's etcd unit is enabled, and resets afterwards.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apply_helpers import ReleaseServer, host_spec, write_yaml
from tests.fleet import Host
from tests.helpers import CLIResult, run_cli

pytestmark = pytest.mark.slow

UNTOUCHED = (
    "test ! -e /etc/etcd && test ! -e /opt/etcd && test ! -e /etc/systemd/system/etcd.service"
    " && ! id etcd >/dev/null 2>&1"
)


@pytest.fixture(scope="module")
def hosts(fleet_factory: Callable[[int], list[Host]]) -> list[Host]:
    return fleet_factory(3)


@pytest.fixture
def attempt(
    hosts: list[Host], release_server: ReleaseServer, tmp_path: Path
) -> Iterator[Callable[..., CLIResult]]:
    """Run `apply` on a spec derived from the good one; check nothing changed anywhere."""

    def run(edit: Callable[[dict[str, Any]], None] | None = None, **extra: Any) -> CLIResult:
        data = host_spec(
            "pf",
            hosts,
            release_server.url("3.5.1"),
            etcd={"allow_unsafe_version": True, **extra.pop("etcd", {})},
            state_dir=str(tmp_path / "state"),
            **extra,
        )
        if edit is not None:
            edit(data)
        spec = write_yaml(tmp_path / "cluster.yaml", data)
        env = {"ETCDFORGE_CACHE_DIR": str(tmp_path / "cache")}
        return run_cli("apply", "-f", str(spec), env=env, timeout=300)

    yield run
    for host in hosts:
        assert host.run("sh", "-c", UNTOUCHED, check=False).returncode == 0, host.name
    assert not (tmp_path / "state" / "pki").exists()  # not even the CA was created


def one_line(result: CLIResult) -> str:
    assert result.code == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def test_unreachable_host(attempt: Callable[..., CLIResult]) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["members"][2]["address"] = "10.254.0.250"
        data["members"][2]["ssh"]["connect_timeout"] = 3

    line = one_line(attempt(edit))
    assert line.startswith("error: etcd-3 (10.254.0.250): unreachable at deploy@10.254.0.250:22")


def test_wrong_key(attempt: Callable[..., CLIResult], tmp_path: Path) -> None:
    key = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    def edit(data: dict[str, Any]) -> None:
        data["members"][1]["ssh"]["identity_file"] = str(key)

    line = one_line(attempt(edit))
    assert "etcd-2 (10.254.0." in line and "refused (permission denied)" in line


def test_no_sudo(attempt: Callable[..., CLIResult]) -> None:
    def edit(data: dict[str, Any]) -> None:
        data["members"][0]["ssh"]["user"] = "nosudo"

    line = one_line(attempt(edit))
    assert line.startswith("error: etcd-1 (10.254.0.")
    assert "sudo does not work without a password" in line


def test_port_taken(attempt: Callable[..., CLIResult], hosts: list[Host]) -> None:
    squatter = hosts[1]
    squatter.run(
        "systemd-run", "--unit=squat", "/usr/sbin/sshd", "-D", "-p", "2380", "-o", "PidFile=none"
    )
    try:
        for _ in range(50):  # bounded wait for the listener
            if ":2380 " in squatter.run("ss", "-Htln").stdout:
                break
            squatter.run("sleep", "0.1")
        line = one_line(attempt())
    finally:
        squatter.run("systemctl", "stop", "squat", check=False)
    assert line.startswith(f"error: etcd-2 ({squatter.address}): port 2380 on 0.0.0.0 is taken")
    assert "sshd" in line


def test_foreign_data_dir(attempt: Callable[..., CLIResult], hosts: list[Host]) -> None:
    hosts[2].run("mkdir", "-p", "/var/lib/etcd/member/snap")
    try:
        line = one_line(attempt())
    finally:
        hosts[2].run("rm", "-rf", "/var/lib/etcd")
    assert line.startswith(f"error: etcd-3 ({hosts[2].address}): /var/lib/etcd already holds")
    assert "another cluster" in line


def test_wrong_checksum_installs_nothing(attempt: Callable[..., CLIResult], tmp_path: Path) -> None:
    line = one_line(attempt(etcd={"sha256": "0" * 64}))
    assert "disagrees with" in line and "SHA256SUMS" in line
    assert not list((tmp_path / "cache").glob("etcd-v*"))


def test_known_bad_version_refused_without_the_override(
    attempt: Callable[..., CLIResult],
) -> None:
    line = one_line(attempt(etcd={"allow_unsafe_version": False}))
    assert "etcd 3.5.1 has a known data inconsistency bug" in line
    assert "allow_unsafe_version" in line


def test_distribution_unit_is_disabled_and_ours_takes_over(
    hosts: list[Host], release_server: ReleaseServer, tmp_path: Path
) -> None:
    distro = hosts[0]
    distro.run(
        "sh", "-c",
        "printf '[Service]\\nExecStart=/bin/sleep infinity\\n[Install]\\nWantedBy=multi-user.target\\n'"
        " > /lib/systemd/system/etcd.service && systemctl daemon-reload"
        " && systemctl enable --now etcd.service",
    )  # fmt: skip
    data = host_spec(
        "distro",
        hosts,
        release_server.url("3.4.23"),
        user="root",
        state_dir=str(tmp_path / "state"),
    )
    spec = write_yaml(tmp_path / "cluster.yaml", data)
    env = {"ETCDFORGE_CACHE_DIR": str(tmp_path / "cache")}
    try:
        plan = run_cli("plan", "-f", str(spec), env=env)
        assert plan.code == 0, plan.stderr
        assert "stop and disable the distribution's etcd.service" in plan.stdout
        result = run_cli("apply", "-f", str(spec), env=env, timeout=300)
        assert result.code == 0, result.stderr
        fragment = distro.run("systemctl", "show", "-p", "FragmentPath", "--value", "etcd")
        assert fragment.stdout.strip() == "/etc/systemd/system/etcd.service"
        assert distro.run("pgrep", "-x", "sleep", check=False).returncode != 0
        status = run_cli("status", "-f", str(spec), env=env)
        assert status.code == 0 and status.stdout.count("3.4.23") == 3, status.stdout
    finally:
        reset = run_cli("reset", "-f", str(spec), "--purge-data", "--yes", env=env)
        distro.run("sh", "-c", "systemctl disable --now etcd.service; "
                   "rm -f /lib/systemd/system/etcd.service; systemctl daemon-reload", check=False)  # fmt: skip
        for host in hosts:
            host.run("userdel", "etcd", check=False)
    assert reset.code == 0, reset.stderr
