"""Membership changes on real hosts (systemd + sshd, tests/fleet.py), etcd 3.5.30: grow 3 -> 5
by adding two hosts, replace a destroyed host by a new one under the same name, rebuild a member
whose disk died on its own host, shrink 5 -> 3; under a write load read back from every member,
the CLI killed midway and rerun."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.apply_helpers import ReleaseServer, host_spec, write_yaml
from tests.fleet import Host
from tests.helpers import CLIResult, kill_cli_at, require_tarball, run_cli
from tests.load import WriteLoad

pytestmark = pytest.mark.slow


def env_value(host: Host, key: str) -> str:
    text = host.run("cat", "/etc/etcd/etcd.env").stdout
    return next(line.split("=", 1)[1] for line in text.splitlines() if line.startswith(key + "="))


def ok(result: CLIResult) -> CLIResult:
    assert result.code == 0, result.stdout + result.stderr
    return result


def test_grow_replace_a_destroyed_host_and_shrink(
    fleet_factory: Callable[[int], list[Host]],
    release_server: ReleaseServer,
    tmp_path: Path,
) -> None:
    require_tarball("3.5.30")
    hosts = fleet_factory(6)
    url = release_server.url("3.5.30")
    state = tmp_path / "state"

    def spec_for(*named: tuple[str, Host]) -> list[str]:
        members = [h for _, h in named]
        data: dict[str, Any] = host_spec("grow", members, url, user="root", state_dir=str(state))
        for entry, (name, _) in zip(data["members"], named, strict=True):
            entry["name"] = name
        write_yaml(tmp_path / "cluster.yaml", data)
        return ["-f", str(tmp_path / "cluster.yaml")]

    def names(members: list[Host]) -> list[tuple[str, Host]]:
        return [(f"etcd-{i + 1}", h) for i, h in enumerate(members)]

    def cli(*args: str) -> CLIResult:
        return run_cli(*args, timeout=600)

    def no_drift(args: list[str]) -> None:
        plan = ok(cli("plan", *args))
        assert "nothing to change" in plan.stdout, plan.stdout

    args = spec_for(*names(hosts[:3]))
    ok(cli("apply", *args))
    endpoints = [f"https://{h.address}:2379" for h in hosts[:2]]
    pki = state / "pki"
    admin = (pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
    old = hosts[2]
    try:
        with WriteLoad(endpoints, admin, "hosts", reload=True) as load:
            # 3 -> 5: two new hosts, killed once after the first `member add`.
            args = spec_for(*names(hosts[:5]))
            plan = ok(cli("plan", *args))
            assert "1. add etcd-4" in plan.stdout and "2. add etcd-5" in plan.stdout
            kill_cli_at(["apply", *args], lambda line: "member add etcd-4" in line)
            grown = ok(cli("apply", *args))
            restarts = [line for line in grown.stderr.splitlines() if "restart" in line]
            assert restarts == []  # members join with the settings apply renders: no restart
            assert env_value(hosts[0], "ETCD_INITIAL_CLUSTER").count("=https://") == 5
            assert env_value(hosts[4], "ETCD_INITIAL_CLUSTER_STATE") == "existing"
            assert ok(cli("kubeadm", "apiserver-flags", *args)).stdout.count("https://") == 5
            no_drift(args)
            # etcd-3's machine is destroyed (unreachable); a new machine takes its name.
            new = hosts[5]
            args = spec_for(*names(hosts[:2]), ("etcd-3", new), *names(hosts[:5])[3:])
            with old.network_cut():
                replace = ["member", "replace", "etcd-3", *args, "--yes"]
                seen = kill_cli_at(replace, lambda line: "member add etcd-3" in line)
                assert f"etcd-3 ({old.address}) is not reachable" in seen
                assert "skipped: member etcd-3" in seen  # its etcd could not be stopped
                done = ok(cli(*replace))
                assert "member etcd-3 replaced" in done.stdout
            no_drift(args)
            # etcd-2's disk dies: rebuilt in place, on the same host.
            hosts[1].run("systemctl", "stop", "etcd")
            hosts[1].run("rm", "-rf", "/var/lib/etcd")
            ok(cli("member", "replace", "etcd-2", *args, "--yes"))
            assert hosts[1].run("systemctl", "is-enabled", "etcd").stdout.strip() == "enabled"
            no_drift(args)
            # 5 -> 3: etcd-4 and etcd-5 leave; their units stop, their data is set aside.
            args = spec_for(*names(hosts[:2]), ("etcd-3", new))
            shrunk = ok(cli("apply", *args, "--yes"))
            assert "remove member etcd-" in shrunk.stdout
            no_drift(args)
            time.sleep(0.5)
        members = [*hosts[:2], hosts[5]]
        everyone = [f"https://{h.address}:2379" for h in members]
        assert load.missing(everyone) == dict.fromkeys(everyone, 0)
        rows = json.loads(ok(cli("status", *args, "-o", "json")).stdout)
        assert [(r["name"], r["endpoint"]) for r in rows] == [
            (f"etcd-{i + 1}", e) for i, e in enumerate(everyone)
        ]
        assert env_value(hosts[0], "ETCD_INITIAL_CLUSTER").count("=https://") == 3
        assert hosts[5].address in env_value(hosts[1], "ETCD_INITIAL_CLUSTER")
        assert ok(cli("kubeadm", "apiserver-flags", *args)).stdout.count("https://") == 3
        for gone in hosts[3:5]:
            assert gone.run("systemctl", "is-active", "etcd", check=False).returncode != 0
            assert gone.run("systemctl", "is-enabled", "etcd", check=False).returncode != 0
            assert "etcd.removed-" in gone.run("ls", "/var/lib").stdout
    finally:
        run_cli("reset", *args, "--purge-data", "--yes", timeout=300)
        for host in (old, *hosts[3:5]):
            host.run("systemctl", "disable", "--now", "etcd", check=False)
