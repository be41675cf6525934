"""Tests of the test fleet itself: every real-host test trusts what these check."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import TypeVar

import pytest

import tests.fleet as fleet_mod
from tests.fleet import ADMIN_ADDRESS, Fleet, Host, debian_mirror, fleet_available

# Harmless if tests/conftest.py registers the plugin too (pytest loads a plugin once).
pytest_plugins = ["tests.fleet_plugin"]

T = TypeVar("T")


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _links(netns: str | None = None) -> str:
    argv = ["ip", *(["-n", netns] if netns else []), "-o", "link", "show"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _mounts() -> str:
    return Path("/proc/mounts").read_text()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _tcp_from_admin(address: str, port: int = 22, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def _tcp_from_host(src: Host, address: str, port: int = 22, timeout: int = 3) -> bool:
    """A TCP connect from inside src (bash /dev/tcp: minbase has no nc/ping)."""
    script = f"exec 3<>/dev/tcp/{address}/{port}"
    res = src.run("timeout", str(timeout), "bash", "-c", script, check=False, timeout=timeout + 10)
    return res.returncode == 0


def _hostname_over_ssh(host: Host) -> str:
    return host.ssh("hostname").stdout.strip()


def _all(checks: Sequence[Callable[[], T]]) -> list[T]:
    with ThreadPoolExecutor(max_workers=len(checks)) as pool:
        return list(pool.map(lambda check: check(), checks))


# -- no root needed -------------------------------------------------------------------------


def test_debian_mirror_from_deb822_and_one_line_sources(tmp_path: Path) -> None:
    parts = tmp_path / "sources.list.d"
    parts.mkdir()
    assert debian_mirror(tmp_path) == "http://deb.debian.org/debian"  # nothing configured
    (parts / "a.list").write_text("deb [arch=amd64] http://mirror.example/debian/ bookworm main\n")
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"
    (parts / "debian.sources").write_text(
        "Types: deb\n# comment\nURIs: http://proxy.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\nURIs: http://proxy.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n"
    )
    assert debian_mirror(tmp_path) == "http://proxy.example/debian"


def test_fleet_available_explains_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert "root" in (fleet_available() or "")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    reason = fleet_available() or ""
    assert "systemd-nspawn" in reason and "fleet-deps.sh" in reason


def test_fixtures_skip_locally_but_fail_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests import fleet_plugin

    monkeypatch.setattr(fleet_plugin, "fleet_available", lambda: "no nspawn here")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no nspawn here"):
        fleet_plugin.require_fleet()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no nspawn here"):
        fleet_plugin.require_fleet()


# -- real hosts -----------------------------------------------------------------------------


@pytest.mark.slow
def test_close_leaves_nothing_behind() -> None:
    """Own Fleet (first in the file, so normally the process's only one): start, close, audit."""
    from tests.fleet_plugin import require_fleet  # late: pytest_plugins imports it first

    require_fleet()
    fleet = Fleet()
    try:
        hosts = fleet.start(2)
        runid = fleet.runid
        assert runid is not None
        shared = fleet_mod._network is not None and fleet_mod._network.users > 1
        workdir = hosts[0].key_path.parent.parent
        for host in hosts:
            assert host.netns in _netns()
            assert str(host.root) in _mounts()
            assert _alive(host.nspawn_pid) and _alive(host.leader_pid)
        assert f"efa-{runid}" in _links()
    finally:
        fleet.close()
    fleet.close()  # idempotent

    names = _netns()
    mounts = _mounts()
    for host in hosts:
        assert host.netns not in names
        assert str(host.root) not in mounts
        assert not _alive(host.nspawn_pid), f"nspawn {host.nspawn_pid} still running"
        assert not _alive(host.leader_pid), f"container init {host.leader_pid} still running"
    assert str(workdir) not in mounts
    assert not workdir.exists()
    assert not list(Path("/sys/fs/cgroup").glob(f"*/etcdforge-fleet/{runid}/{hosts[0].name}"))
    if shared:  # another Fleet of this process still uses the bridge: only our ports must go
        ports = _links(f"efnet-{runid}")
        assert not any(f"efp-{runid}-{host.index}" in ports for host in hosts)
    else:
        assert f"efnet-{runid}" not in names
        assert f"efa-{runid}" not in _links()
        assert (
            "10.254.0."
            not in subprocess.run(
                ["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True
            ).stdout
        )
        assert not list(Path("/sys/fs/cgroup").glob(f"*/etcdforge-fleet/{runid}"))
    with pytest.raises(fleet_mod.FleetError):
        fleet.start(1)


@pytest.mark.slow
def test_hosts_boot_as_distinct_machines(fleet3: list[Host]) -> None:
    ids = set()
    for n, host in enumerate(fleet3):
        assert host.run("systemctl", "is-system-running").stdout.strip() == "running"
        assert host.run("systemctl", "is-active", "ssh").stdout.strip() == "active"
        assert host.run("hostname").stdout.strip() == host.name
        assert host.run("cat", "/etc/etcdforge-fleet-image").returncode == 0
        ids.add(host.run("cat", "/etc/machine-id").stdout.strip())
        assert re.fullmatch(r"10\.254\.0\.\d+", host.address)
        if n:
            assert host.address != fleet3[0].address
    assert len(ids) == 3
    keys = {(h.root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[1] for h in fleet3}
    assert len(keys) == 3, "every host must have its own host key"


@pytest.mark.slow
def test_sshd_accepts_keys_only(fleet3: list[Host], tmp_path: Path) -> None:
    host = fleet3[0]
    for user in ("root", "deploy", "nosudo"):
        assert host.ssh("id", "-un", user=user).stdout.strip() == user
    config = host.run("sshd", "-T").stdout
    assert "passwordauthentication no" in config
    assert "kbdinteractiveauthentication no" in config
    assert "permitrootlogin without-password" in config  # = prohibit-password
    # The server offers nothing but publickey, so a password can never be tried.
    argv = host.ssh_argv("true")
    argv[1:1] = ["-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert res.returncode == 255
    assert "Permission denied (publickey)" in res.stderr
    # A key the host does not know is refused.
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    argv = host.ssh_argv("true")
    argv[argv.index(str(host.key_path))] = str(other)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert res.returncode == 255 and "Permission denied" in res.stderr


@pytest.mark.slow
def test_deploy_has_sudo_and_nosudo_has_not(fleet3: list[Host]) -> None:
    host = fleet3[1]
    assert host.ssh("sudo", "-n", "id", "-u", user="deploy").stdout.strip() == "0"
    res = host.ssh("sudo", "-n", "true", user="nosudo", check=False)
    assert res.returncode != 0
    assert "password is required" in res.stderr or "not in the sudoers" in res.stderr


@pytest.mark.slow
def test_hosts_reach_each_other_and_nothing_else(fleet3: list[Host]) -> None:
    checks = [partial(_tcp_from_host, s, d.address) for s in fleet3 for d in fleet3 if s is not d]
    assert all(_all(checks))
    a, b, _ = fleet3
    assert a.run("getent", "hosts", b.name).stdout.split()[0] == b.address
    for host in fleet3:
        routes = host.run("ip", "-4", "route").stdout.strip().splitlines()
        assert routes == [f"10.254.0.0/24 dev eth0 proto kernel scope link src {host.address}"]
        assert host.run("ip", "-6", "route", "show", "default").stdout.strip() == ""


@pytest.mark.slow
def test_type_notify_unit_starts_via_sudo_over_ssh(fleet3: list[Host]) -> None:
    host = fleet3[2].as_user("deploy")
    unit = "efprobe-notify.service"
    path = f"/etc/systemd/system/{unit}"
    host.ssh(
        "sudo", "-n", "tee", path,
        input=(
            "[Unit]\nDescription=fleet Type=notify probe\n\n"
            "[Service]\nType=notify\nNotifyAccess=all\nTimeoutStartSec=30\n"
            "ExecStart=/bin/sh -c 'sleep 0.5; systemd-notify --ready; exec sleep infinity'\n"
        ),
    )  # fmt: skip
    try:
        host.ssh("sudo", "-n", "systemctl", "daemon-reload")
        started = time.monotonic()
        host.ssh("sudo", "-n", "systemctl", "start", unit)
        assert time.monotonic() - started >= 0.4, "start must wait for READY=1"
        show = host.run("systemctl", "show", unit, "-p", "Type,ActiveState,SubState").stdout
        assert show.split() == ["Type=notify", "ActiveState=active", "SubState=running"]
    finally:
        host.run("systemctl", "stop", unit, check=False)
        host.run("rm", "-f", path)
        host.run("systemctl", "daemon-reload")


@pytest.mark.slow
def test_cut_network_isolates_both_ways_and_restore_heals(fleet3: list[Host]) -> None:
    a, b, c = fleet3
    with socket.create_server((ADMIN_ADDRESS, 0)) as listener:
        port = listener.getsockname()[1]
        probes: list[Callable[[], bool]] = [
            lambda: _tcp_from_admin(c.address),  # admin -> c
            lambda: _tcp_from_host(c, ADMIN_ADDRESS, port),  # c -> admin
            lambda: _tcp_from_host(c, a.address),  # c -> a
            lambda: _tcp_from_host(a, c.address),  # a -> c
        ]
        bystander = [lambda: _tcp_from_host(a, b.address), lambda: _tcp_from_admin(b.address)]
        assert _all(probes + bystander) == [True] * 6
        with c.network_cut():
            assert _all(probes + bystander) == [False] * 4 + [True] * 2
            assert c.run("systemctl", "is-system-running").stdout.strip() == "running"
        assert _all(probes) == [True] * 4
        assert c.ssh("hostname").stdout.strip() == c.name


@pytest.mark.slow
def test_fleet5_is_five_more_hosts(fleet3: list[Host], fleet5: list[Host]) -> None:
    assert len(fleet5) == 5
    assert not {h.address for h in fleet5} & {h.address for h in fleet3}
    names = _all([partial(_hostname_over_ssh, h) for h in fleet5])
    assert names == [h.name for h in fleet5]
