"""`apply` on three real hosts (systemd + sshd, tests/fleet.py), as the sudo user `deploy`.

One cluster is deployed for the module and shared by the read-mostly tests; the tests that
take it apart (kill the CLI midway, reset) run last, in file order.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from etcdforge import pki
from tests.apply_helpers import ReleaseServer, host_spec, write_yaml
from tests.fleet import Host
from tests.helpers import CLIResult, etcdctl_binary, kill_cli_at, run_cli
from tests.load import WriteLoad

pytestmark = pytest.mark.slow


@dataclass
class Deployed:
    hosts: list[Host]
    spec: Path
    state: Path
    env: dict[str, str]
    first: CLIResult

    def cli(self, *args: str, timeout: float = 300) -> CLIResult:
        return run_cli(*args, "-f", str(self.spec), env=self.env, timeout=timeout)

    def etcdctl(
        self, *args: str, endpoints: list[str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        exports = self.cli("env")
        assert exports.code == 0, exports.stderr
        env = dict(os.environ)
        for line in exports.stdout.splitlines():
            name, _, value = line.removeprefix("export ").partition("=")
            env[name] = value.strip("'")
        if endpoints is not None:
            env["ETCDCTL_ENDPOINTS"] = ",".join(endpoints)
        return subprocess.run(
            [str(etcdctl_binary()), "--command-timeout=5s", *args],
            capture_output=True, text=True, env=env, timeout=30, check=False,
        )  # fmt: skip


def endpoint(host: Host) -> str:
    return f"https://{host.address}:2379"


def main_pids(hosts: list[Host]) -> list[int]:
    return [
        int(h.run("systemctl", "show", "-p", "MainPID", "--value", "etcd.service").stdout)
        for h in hosts
    ]


def statuses(deployed: Deployed) -> list[dict[str, Any]]:
    result = deployed.cli("status", "-o", "json")
    return list(json.loads(result.stdout))


@pytest.fixture(scope="module")
def deployed(
    fleet3: list[Host], release_server: ReleaseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    work = tmp_path_factory.mktemp("apply3")
    data = host_spec(
        "fleet3",
        fleet3,
        release_server.url("3.5.1"),
        etcd={"allow_unsafe_version": True},
        state_dir=str(work / "state"),
    )
    spec = write_yaml(work / "cluster.yaml", data)
    env = {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
    first = run_cli("apply", "-f", str(spec), env=env, timeout=600)
    deployed = Deployed(fleet3, spec, work / "state", env, first)
    try:
        assert first.code == 0, first.stderr
        yield deployed
    finally:
        deployed.cli("reset", "--purge-data", "--yes")


def test_apply_deploys_three_healthy_members(deployed: Deployed) -> None:
    assert "3 member(s), etcd 3.5.1: all healthy" in deployed.first.stdout
    assert "running it only because etcd.allow_unsafe_version is set" in deployed.first.stderr
    rows = statuses(deployed)
    assert [r["name"] for r in rows] == ["etcd-1", "etcd-2", "etcd-3"]
    assert [r["endpoint"] for r in rows] == [endpoint(h) for h in deployed.hosts]
    assert all(r["healthy"] for r in rows) and sum(r["is_leader"] for r in rows) == 1
    assert {r["version"] for r in rows} == {"3.5.1"}


def test_put_and_get_from_the_admin_machine_with_the_admin_cert(deployed: Deployed) -> None:
    a, _, c = deployed.hosts
    put = deployed.etcdctl("put", "hello", "fleet", endpoints=[endpoint(a)])
    assert put.returncode == 0, put.stderr
    got = deployed.etcdctl("get", "hello", "--print-value-only", endpoints=[endpoint(c)])
    assert got.stdout.strip() == "fleet", got.stderr


def test_host_files_modes_owners_and_no_ca_key(deployed: Deployed) -> None:
    host = deployed.hosts[1]
    listing = host.run(
        "stat", "-c", "%n %a %U:%G",
        "/var/lib/etcd", "/etc/etcd/pki", "/etc/etcd/pki/server.key", "/etc/etcd/pki/peer.key",
        "/etc/etcd/pki/ca.crt", "/etc/etcd/etcd.env", "/etc/systemd/system/etcd.service",
    ).stdout.splitlines()  # fmt: skip
    assert listing == [
        "/var/lib/etcd 700 etcd:etcd",
        "/etc/etcd/pki 750 root:etcd",
        "/etc/etcd/pki/server.key 600 etcd:etcd",
        "/etc/etcd/pki/peer.key 600 etcd:etcd",
        "/etc/etcd/pki/ca.crt 644 root:root",
        "/etc/etcd/etcd.env 640 root:etcd",
        "/etc/systemd/system/etcd.service 644 root:root",
    ]
    assert sorted(host.run("ls", "/etc/etcd/pki").stdout.split()) == [
        "ca.crt", "peer-ca.crt", "peer.crt", "peer.key", "server.crt", "server.key",
    ]  # fmt: skip
    keys = host.run("sh", "-c", "find / -xdev -name '*.key' -path '*etcd*'").stdout.split()
    assert sorted(keys) == ["/etc/etcd/pki/peer.key", "/etc/etcd/pki/server.key"]
    # Its own key, not another member's: the server cert names this host's address.
    cert = host.run("cat", "/etc/etcd/pki/server.crt").stdout.encode()
    assert host.address in pki.inspect_cert(x509.load_pem_x509_certificate(cert)).sans
    assert host.run("readlink", "/usr/local/bin/etcd").stdout.strip() == "/opt/etcd/current/etcd"
    assert host.run("readlink", "/opt/etcd/current").stdout.strip() == "v3.5.1"
    user = host.run("ps", "-o", "user=", "-p", str(main_pids([host])[0])).stdout.strip()
    assert user == "etcd"


def test_unit_passes_systemd_analyze_and_listens_only_with_tls(deployed: Deployed) -> None:
    host = deployed.hosts[0]
    verify = host.run("systemd-analyze", "verify", "/etc/systemd/system/etcd.service", check=False)
    assert verify.returncode == 0, verify.stderr
    assert "etcd.service" not in verify.stderr  # no warning about our unit
    listeners = host.run("ss", "-Htln").stdout.split("\n")
    ports = sorted(line.split()[3] for line in listeners if line.strip() and ":22" not in line)
    assert ports == [f"{host.address}:2379", f"{host.address}:2380"]  # no 127.0.0.1:2379
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{host.address}:2379/health", timeout=3)
    no_cert = subprocess.run(
        [str(etcdctl_binary()), f"--endpoints={endpoint(host)}",
         f"--cacert={deployed.state / 'pki' / 'ca.crt'}", "--command-timeout=3s", "get", "x"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert no_cert.returncode != 0  # client-cert-auth: the CA alone is not enough


def test_second_apply_changes_and_restarts_nothing(deployed: Deployed) -> None:
    before = main_pids(deployed.hosts)
    result = deployed.cli("apply")
    assert result.code == 0, result.stderr
    assert "healthy; nothing changed, nothing restarted" in result.stdout
    assert main_pids(deployed.hosts) == before
    plan = deployed.cli("plan")
    assert plan.code == 0, plan.stderr
    assert "nothing to change" in plan.stdout


def test_plan_shows_drift_changes_nothing_and_apply_repairs_without_restart(
    deployed: Deployed,
) -> None:
    host = deployed.hosts[2]
    host.run("chmod", "0644", "/etc/etcd/pki/server.key")
    host.run("sh", "-c", "echo ETCD_DEBUG=true >> /etc/etcd/etcd.env")
    before = main_pids(deployed.hosts)
    plan = deployed.cli("plan")
    assert plan.code == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert lines.count("  - write /etc/etcd/etcd.env: +0 -1 lines (ETCD_DEBUG)") == 1
    assert "  - write /etc/etcd/pki/server.key: mode 0644 -> 0600" in lines
    assert host.run("stat", "-c", "%a", "/etc/etcd/pki/server.key").stdout.strip() == "644"
    result = deployed.cli("apply")
    assert result.code == 0, result.stderr
    assert f"etcd-3 ({host.address}): 2 change(s)" in result.stdout
    assert host.run("stat", "-c", "%a", "/etc/etcd/pki/server.key").stdout.strip() == "600"
    assert main_pids(deployed.hosts) == before  # the running process already had the settings


def test_renewed_certificate_is_installed_by_apply_without_restart(deployed: Deployed) -> None:
    from etcdforge.ops.renew import served_serial
    from etcdforge.tls import TLSFiles

    host = deployed.hosts[0]
    state_pki = deployed.state / "pki"
    admin = TLSFiles(state_pki / "ca.crt", state_pki / "admin.crt", state_pki / "admin.key")
    served_before = served_serial(host.address, 2379, admin)
    before = main_pids(deployed.hosts)
    renewed = deployed.cli("certs", "renew", "--member", "etcd-1")
    assert renewed.code == 0, renewed.stderr
    assert "run `etcdforge apply -f ...` to install them on the hosts" in renewed.stdout
    assert served_serial(host.address, 2379, admin) == served_before  # not pushed yet
    result = deployed.cli("apply")
    assert result.code == 0, result.stderr
    local = pki.load_cert(deployed.state / "members" / "etcd-1" / "pki" / "server.crt")
    assert served_serial(host.address, 2379, admin) == local.serial_number != served_before
    assert main_pids(deployed.hosts) == before  # etcd reads the new files on the next handshake


def _admin_files(deployed: Deployed) -> tuple[Path, Path, Path]:
    pki_dir = deployed.state / "pki"
    return pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key"


class ServiceWatch:
    """Samples every host's etcd unit (MainPID, ActiveState) until stopped (bounded)."""

    def __init__(self, hosts: list[Host]) -> None:
        self.hosts = hosts
        self.samples: list[list[tuple[str, str]]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ServiceWatch:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        deadline = time.monotonic() + 900
        while not self.stop.is_set() and len(self.samples) < 20000 and time.monotonic() < deadline:
            sample = []
            for host in self.hosts:
                shown = host.run(
                    "systemctl", "show", "-p", "MainPID", "-p", "ActiveState", "etcd.service",
                    check=False,
                ).stdout  # fmt: skip
                fields = dict(line.partition("=")[::2] for line in shown.splitlines())
                sample.append((fields.get("MainPID", "?"), fields.get("ActiveState", "?")))
            self.samples.append(sample)
            time.sleep(0.1)

    def pids(self, index: int) -> set[str]:
        return {s[index][0] for s in self.samples if s[index][1] == "active"}


def _rotate_until(deployed: Deployed, marker: str) -> str:
    """Run `certs rotate-ca` and SIGKILL it once a progress line after phase 1 began has `marker`."""
    began = False

    def at_marker(line: str) -> bool:
        nonlocal began
        began = began or "begin phase 1" in line
        return began and marker in line

    args = ["certs", "rotate-ca", "-f", str(deployed.spec)]
    return kill_cli_at(args, at_marker, env=deployed.env)


def _host_certs(host: Host, path: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(host.run("cat", path).stdout.encode())


def test_rotate_ca_on_hosts_under_load_killed_midway_and_resumed(
    deployed: Deployed, tmp_path: Path
) -> None:
    from etcdforge.ops.certs import chains_to

    state_pki = deployed.state / "pki"
    old = tmp_path / "old"
    old.mkdir()
    for name in ("ca.crt", "peer-ca.crt", "admin.crt", "admin.key"):
        shutil.copy(state_pki / name, old / name)
    dry = deployed.cli("certs", "rotate-ca", "--dry-run")
    assert dry.code == 0, dry.stderr
    assert "  - install both CAs on the hosts, restarting one at a time" in dry.stdout
    assert not (state_pki / "rotation").exists()
    before = main_pids(deployed.hosts)
    with (
        ServiceWatch(deployed.hosts) as watch,
        WriteLoad(
            [endpoint(h) for h in deployed.hosts], _admin_files(deployed), "rotate", reload=True
        ) as load,
    ):
        output = _rotate_until(deployed, "restart etcd.service")
        assert "trust the old and new cluster CAs in the state directory" in output
        assert (state_pki / "rotation" / "phase").read_text().strip() == "1"
        assert len(pki.load_certs(state_pki / "ca.crt")) == 2
        paused = deployed.cli("certs", "rotate-ca", "--stop-after", "trust", timeout=600)
        assert paused.code == 0, paused.stderr
        assert "paused after phase 'trust'" in paused.stdout
        assert "remember the cluster CA in use" not in paused.stderr  # resumed, not restarted
        for host in deployed.hosts:
            assert len(_host_certs(host, "/etc/etcd/pki/ca.crt")) == 2
        resumed = deployed.cli("certs", "rotate-ca", timeout=600)
        assert resumed.code == 0, resumed.stderr
        assert "CA rotation complete" in resumed.stdout
        assert "trust the old and new CAs in files of" not in resumed.stderr
        assert "install the new certificates on the hosts (no restart)" in resumed.stderr
        acked = len(load.acked)
        deadline = time.monotonic() + 30  # a request may be mid-retry: wait for the next ack
        while len(load.acked) <= acked and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(load.acked) > acked, "writes continue after the rotation"
    stored = deployed.etcdctl("get", "rotate/", "--prefix", "--keys-only")
    assert stored.returncode == 0, stored.stderr
    assert set(stored.stdout.split()) >= set(load.acked), "0 lost writes"
    assert not (state_pki / "rotation").exists()
    # Restarted (twice, from the CLI's output) and never two members down at once.
    after = main_pids(deployed.hosts)
    assert all(a != b for a, b in zip(after, before, strict=True))
    assert all(sum(state != "active" for _, state in s) <= 1 for s in watch.samples)
    assert all(len(watch.pids(i)) >= 2 for i in range(3)), watch.samples[-1]
    restarts = [line for line in resumed.stderr.splitlines() if "restart etcd.service" in line]
    assert len(restarts) == 3, resumed.stderr  # phase 3's only: 1 was done, 2 restarts nothing
    assert all(r["healthy"] for r in statuses(deployed))
    # Hosts trust the new CAs only; their leaves chain to them.
    new_ca, new_peer_ca = (
        pki.load_certs(state_pki / "ca.crt"),
        pki.load_certs(state_pki / "peer-ca.crt"),
    )
    assert len(new_ca) == len(new_peer_ca) == 1
    assert new_ca[0].subject != pki.load_cert(old / "ca.crt").subject
    for host in deployed.hosts:
        assert _host_certs(host, "/etc/etcd/pki/ca.crt") == new_ca
        assert _host_certs(host, "/etc/etcd/pki/peer-ca.crt") == new_peer_ca
        assert chains_to(_host_certs(host, "/etc/etcd/pki/server.crt")[0], new_ca)
        assert chains_to(_host_certs(host, "/etc/etcd/pki/peer.crt")[0], new_peer_ca)
    assert deployed.cli("certs", "check").code == 0
    # The old admin certificate is refused; the new one works.
    url = f"{endpoint(deployed.hosts[0])}/v3/kv/range"

    def admin_context(files: Path) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(state_pki / "ca.crt"))
        context.check_hostname = False
        context.load_cert_chain(str(files / "admin.crt"), str(files / "admin.key"))
        return context

    assert httpx.post(url, json={"key": "YQ=="}, verify=admin_context(state_pki)).status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.post(url, json={"key": "YQ=="}, verify=admin_context(old), timeout=5)


def test_members_running_other_settings_restart_one_at_a_time(deployed: Deployed) -> None:
    for host in deployed.hosts:  # each member now runs with a setting the spec does not have
        host.run("sh", "-c", "echo ETCD_HEARTBEAT_INTERVAL=100 >> /etc/etcd/etcd.env")
        host.run("systemctl", "restart", "etcd.service", timeout=120)
    assert deployed.etcdctl("put", "before-roll", "1").returncode == 0
    before = main_pids(deployed.hosts)
    result = deployed.cli("apply")
    assert result.code == 0, result.stderr
    after = main_pids(deployed.hosts)
    assert all(a != b for a, b in zip(after, before, strict=True))
    progress = [line for line in result.stderr.splitlines() if "→" in line]
    restarts = [i for i, line in enumerate(progress) if "restart etcd.service" in line]
    assert len(restarts) == 3
    for index in restarts:  # every restart right after a full-cluster health check
        assert "wait for every member to be healthy before restarting" in progress[index - 1]
    assert "settings ETCD_HEARTBEAT_INTERVAL" in progress[restarts[0]]
    assert all(r["healthy"] for r in statuses(deployed))
    assert deployed.etcdctl("get", "before-roll", "--print-value-only").stdout.strip() == "1"


def test_rotate_ca_is_refused_while_apply_changes_the_cluster(deployed: Deployed) -> None:
    """Two commands never change one cluster at once: while `apply` rolls the members, a
    `certs rotate-ca` (from another shell, same admin machine) is refused with the holder and
    changes nothing; once `apply` is done, a waiting one goes ahead."""
    for host in deployed.hosts:  # give `apply` a rolling restart to do
        host.run("sh", "-c", "echo ETCD_ELECTION_TIMEOUT=1200 >> /etc/etcd/etcd.env")
        host.run("systemctl", "restart", "etcd.service", timeout=120)
    env = {**os.environ, **deployed.env}
    args = ["-m", "etcdforge", "apply", "-f", str(deployed.spec)]
    applying = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert applying.stderr is not None
        for line in applying.stderr:  # bounded: apply ends, or the marker shows up
            if "before restarting" in line:
                break
        refused = deployed.cli("certs", "rotate-ca")
        assert refused.code == 1
        line = refused.stderr.strip().splitlines()[-1]
        assert "is locked by" in line and "etcdforge apply" in line, refused.stderr
        assert not (deployed.state / "pki" / "rotation").exists(), "nothing changed"
        waited = deployed.cli("certs", "rotate-ca", "--stop-after", "trust", "--wait-lock", "5m")
        assert waited.code == 0, waited.stderr
    finally:
        applying.communicate(timeout=600)
    assert applying.returncode == 0
    resumed = deployed.cli("certs", "rotate-ca", timeout=600)  # finish what was paused
    assert resumed.code == 0, resumed.stderr
    assert all(r["healthy"] for r in statuses(deployed))


def test_cut_host_cluster_keeps_writing_then_member_catches_up(deployed: Deployed) -> None:
    a, b, c = deployed.hosts
    with c.network_cut():
        for i in range(20):
            put = deployed.etcdctl("put", f"cut/{i}", str(i), endpoints=[endpoint(a), endpoint(b)])
            assert put.returncode == 0, put.stderr
        rows = statuses(deployed)
        assert [r["healthy"] for r in rows] == [True, True, False]
    value = ""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        got = deployed.etcdctl(
            "get", "cut/19", "--print-value-only", "--consistency=s", endpoints=[endpoint(c)]
        )
        value = got.stdout.strip()
        if value == "19":
            break
        time.sleep(0.5)
    assert value == "19"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(r["healthy"] for r in statuses(deployed)):
        time.sleep(0.5)
    assert all(r["healthy"] for r in statuses(deployed))


def test_kill_the_cli_midway_then_rerun_completes(deployed: Deployed) -> None:
    reset = deployed.cli("reset", "--purge-data", "--yes")
    assert reset.code == 0, reset.stderr
    kill_cli_at(
        ["apply", "-f", str(deployed.spec)],
        lambda line: "write /etc/etcd/pki/server.key" in line,
        env=deployed.env,
    )
    units = [
        h.run("test", "-e", "/etc/systemd/system/etcd.service", check=False) for h in deployed.hosts
    ]
    assert any(u.returncode != 0 for u in units)  # really midway: some host has no unit yet
    rerun = deployed.cli("apply")
    assert rerun.code == 0, rerun.stderr
    assert all(r["healthy"] for r in statuses(deployed))
    again = deployed.cli("apply")
    assert "nothing changed, nothing restarted" in again.stdout, again.stderr


def test_reset_removes_what_apply_installed(deployed: Deployed) -> None:
    kept = deployed.cli("reset")
    assert kept.code == 0, kept.stderr
    for host in deployed.hosts:
        assert host.run("test", "-d", "/var/lib/etcd/member", check=False).returncode == 0
    result = deployed.cli("reset", "--purge-data", "--yes")
    assert result.code == 0, result.stderr
    for host in deployed.hosts:
        left = host.run(
            "sh", "-c",
            "ls -d /etc/etcd /opt/etcd /var/lib/etcd /etc/systemd/system/etcd.service "
            "/usr/local/bin/etcd /usr/local/bin/etcdctl 2>/dev/null; pgrep -x etcd",
            check=False,
        ).stdout  # fmt: skip
        assert left == ""
    assert not (deployed.state / "cluster.json").exists()
    assert (deployed.state / "pki" / "ca.key").exists()  # the CA stays on the admin machine
    status = deployed.cli("status")
    assert status.code == 1 and "run `etcdforge up` first" in status.stderr
