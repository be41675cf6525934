"""`adopt`, `plan`, `apply` on the seed runbook's cluster, built literally on three test hosts
(tests/runbook.py), under a writer that uses the runbook's client.pem; then `certs rotate-ca`
and `upgrade` off its known-bad release. A fourth host serves the bad inputs.

The tests run in file order on one cluster: each one starts where the previous one left it.
"""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.apply_helpers import ReleaseServer
from tests.fleet import Host
from tests.helpers import CLIResult, kill_cli_at, run_cli
from tests.load import WriteLoad, tls_context
from tests.runbook import DATA_DIR, SSL_DIR, RunbookCluster, build, plain_http

pytestmark = pytest.mark.slow
UNIT = "etcd-member.service"


@dataclass
class Adopting:
    cluster: RunbookCluster
    spare: Host
    work: Path
    release_server: ReleaseServer

    @property
    def spec(self) -> Path:
        return self.work / "cluster.yaml"

    @property
    def state(self) -> Path:
        return self.work / "state"

    @property
    def env(self) -> dict[str, str]:
        return {"ETCDFORGE_CACHE_DIR": str(self.work / "cache")}

    def adopt(self, hosts: list[Host], *extra: str, output: Path | None = None) -> CLIResult:
        first = hosts[0]
        args = [a for h in hosts for a in ("--host", f"root@{h.address}")]
        return run_cli(
            "adopt", *args, "--ssh-key", str(first.key_path), "--known-hosts",
            str(first.known_hosts), "-o", str(output or self.spec), "--state-dir",
            str(self.state), "--release", self.release_server.url("3.5.1"), *extra,
            env=self.env, timeout=120,
        )  # fmt: skip

    def cli(self, *args: str, timeout: float = 600) -> CLIResult:
        return run_cli(*args, "-f", str(self.spec), env=self.env, timeout=timeout)


@pytest.fixture(scope="module")
def adopting(
    fleet_factory: object, release_server: ReleaseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Adopting]:
    hosts = fleet_factory(4)  # type: ignore[operator]
    work = tmp_path_factory.mktemp("adopt")
    cluster = build(hosts[:3], work / "runbook")
    yield Adopting(cluster, hosts[3], work, release_server)


def _stat(host: Host, *paths: str) -> list[str]:
    return host.run("stat", "-c", "%i %U", *paths).stdout.split("\n")[: len(paths)]


def _peer_port_accepts(cluster: RunbookCluster, host: Host) -> bool:
    """The runbook's client.pem (the kube-apiserver's) talking to the peer port."""
    context = tls_context(*cluster.client_files)
    try:
        return httpx.get(
            f"https://{host.address}:2380/members", verify=context, timeout=5
        ).is_success
    except httpx.HTTPError:
        return False


def _main_pids(hosts: list[Host], unit: str = UNIT) -> list[str]:
    return [
        h.run("systemctl", "show", "-p", "MainPID", "--value", unit).stdout.strip() for h in hosts
    ]


def test_the_runbook_cluster_has_the_runbooks_defects(adopting: Adopting) -> None:
    cluster = adopting.cluster
    for host in cluster.hosts:
        put = plain_http(host, "put", f"no-auth/{host.name}", "anyone")  # no certificate at all
        assert put.returncode == 0, put.stderr
        assert _peer_port_accepts(cluster, host)
        assert host.run("test", "-f", f"{SSL_DIR}/ca-key.pem", check=False).returncode == 0
    unit = cluster.hosts[1].run("cat", "/usr/lib/systemd/system/etcd.service").stdout
    assert "After=neCNork.target" in unit
    assert (
        f"--listen-client-urls=https://{cluster.hosts[1].address}:2379,http://127.0.0.1:2379"
        in unit
    )


def _refused(adopting: Adopting, result: CLIResult, expected: str) -> None:
    assert result.code == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert expected in lines[-1], result.stderr
    assert lines[-1].startswith("error: ") and "\n" not in lines[-1]
    assert not adopting.spec.exists() and not adopting.state.exists(), "nothing written"


def test_adopt_refuses_what_it_cannot_understand(adopting: Adopting) -> None:
    hosts, spare = adopting.cluster.hosts, adopting.spare
    _refused(adopting, adopting.adopt([*hosts, spare]), f"{spare.address}: not an etcd member")
    _refused(
        adopting, adopting.adopt(hosts[:2]),
        "the cluster's member list has 3 members but 2 hosts were given; no --host runs kubernetes-master3",
    )  # fmt: skip
    moved = f"{SSL_DIR}/peer.pem"
    hosts[1].run("mv", moved, f"{moved}.away")
    try:
        _refused(
            adopting,
            adopting.adopt(hosts),
            f"{moved} (--peer-cert-file of the running etcd) is missing",
        )
    finally:
        hosts[1].run("mv", f"{moved}.away", moved)
    unreachable = run_cli(
        "adopt", "--host", "root@10.254.0.250", "--ssh-timeout", "2", "-o", str(adopting.spec),
        env=adopting.env,
    )  # fmt: skip
    _refused(adopting, unreachable, "unreachable")
    other = build([spare], adopting.work / "other")  # a second runbook cluster, of one member
    try:
        _refused(adopting, adopting.adopt([*hosts, spare]), "the hosts belong to 2 clusters")
    finally:
        spare.run("systemctl", "disable", "--now", "etcd.service")
    assert other.names == ["kubernetes-master1"]


def test_adopt_then_plan_changes_nothing(adopting: Adopting) -> None:
    hosts = adopting.cluster.hosts
    before = _main_pids(hosts, "etcd.service")
    result = adopting.adopt(hosts)
    assert result.code == 0, result.stderr
    assert "adopted 3 member(s) of cluster" in result.stdout
    assert "nothing on the hosts was changed" in result.stdout
    data = yaml.safe_load(adopting.spec.read_text())
    assert [m["name"] for m in data["members"]] == adopting.cluster.names
    assert data["host_paths"] == {"data_dir": DATA_DIR, "unit": f"/etc/systemd/system/{UNIT}"}
    pki_dir = adopting.state / "pki"
    assert (pki_dir / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (pki_dir / "ca.key").read_bytes() == (adopting.cluster.ssl / "ca-key.pem").read_bytes()
    assert (pki_dir / "admin.crt").read_bytes() == (
        adopting.cluster.ssl / "client.pem"
    ).read_bytes()
    record = json.loads((adopting.state / "adopted.json").read_text())
    assert record["found"]["token"] == "etcd-cluster" and not record["converted"]
    again = adopting.adopt(hosts)  # a rerun writes the same files
    assert again.code == 0, again.stderr
    plan = adopting.cli("plan")
    assert plan.code == 0, plan.stderr
    assert "adopted cluster: not converted yet" in plan.stdout
    assert "findings (7):" in plan.stdout
    steps = [line for line in plan.stdout.splitlines() if re.match(r"  \d\. ", line)]
    assert len(steps) == 3 and ", the leader: take over from the runbook's" in steps[-1], steps
    assert all("take over from the runbook's etcd.service" in step for step in steps)
    assert "then, all converted and healthy: delete the CA key (" in plan.stdout
    assert plan.stdout.count("): none") == 3  # nobody on the plain-http listeners yet
    for command in (
        ["upgrade", "--to", "3.5.30"],
        ["certs", "rotate-ca"],
        ["certs", "renew"],
        ["defrag"],
        ["member", "replace", adopting.cluster.names[1], "--yes"],
    ):  # each would work on etcdforge's units, which the runbook's members do not run yet
        refused = adopting.cli(*command)
        assert refused.code == 1, (command, refused.stderr)
        assert "was adopted and is not converted yet" in refused.stderr, command
        assert "convert it first with `etcdforge apply -f FILE`" in refused.stderr, command
    assert _main_pids(hosts, "etcd.service") == before


def test_apply_asks_before_dropping_the_plain_http_listener(adopting: Adopting) -> None:
    host = adopting.cluster.hosts[0]
    host.run(
        "systemd-run", "--unit=plain-http-client", "/usr/local/bin/etcdctl",
        "--endpoints=http://127.0.0.1:2379", "watch", "anything",
    )  # fmt: skip
    before = _main_pids(adopting.cluster.hosts, "etcd.service")
    refused = subprocess.run(
        [sys.executable, "-m", "etcdforge", "apply", "-f", str(adopting.spec)],
        input="n\n", capture_output=True, text=True, timeout=300,
        env={**os.environ, **adopting.env},
    )  # fmt: skip
    assert refused.returncode == 1, refused.stderr
    assert f"{host.address}): etcdctl (pid" in refused.stderr
    assert "drop the plain-http listener (1 client(s) listed above)?" in refused.stderr
    assert _main_pids(adopting.cluster.hosts, "etcd.service") == before


def test_apply_converts_under_load_killed_midway_and_rerun(adopting: Adopting) -> None:
    cluster = adopting.cluster
    hosts = cluster.hosts
    data_dirs = [_stat(h, DATA_DIR)[0].split()[0] for h in hosts]
    ids = json.loads((adopting.state / "adopted.json").read_text())["found"]["members"]
    handed = 0

    def second_member_stopped(line: str) -> bool:
        """Killed once the second member's runbook unit is off and ours not started yet."""
        nonlocal handed
        handed += "(kept in place)" in line
        return handed == 2

    started = time.monotonic()
    with WriteLoad(cluster.endpoints, cluster.client_files, "adopt", reload=True) as load:
        killed = kill_cli_at(
            ["apply", "-f", str(adopting.spec), "--yes"], second_member_stopped, env=adopting.env
        )
        assert "take over from the runbook's etcd.service" in killed
        rerun = adopting.cli("apply", "--yes")
        assert rerun.code == 0, rerun.stderr
        finished = rerun.stderr.index("finish the conversion: etcd.service is stopped")
        assert finished < rerun.stderr.index(f"restart {UNIT}")  # the half-converted one first
        took = time.monotonic() - started
        acked = len(load.acked)
        deadline = time.monotonic() + 30
        while len(load.acked) <= acked + 20 and time.monotonic() < deadline:
            time.sleep(0.1)
    print(f"apply (killed + rerun) {took:.1f} s, longest write stall {load.longest_stall():.2f} s, "
          f"{len(load.acked)} writes acked, {len(load.failures)} retried")  # fmt: skip
    assert load.missing(cluster.endpoints) == dict.fromkeys(cluster.endpoints, 0)
    assert len(load.acked) > acked
    lines = [line for line in (killed + rerun.stderr).splitlines() if f"restart {UNIT}" in line]
    print("\n".join(s for s in rerun.stderr.splitlines() if "→" in s and "kubernetes" in s))
    assert "leadership handed to a caught-up follower first" in lines[-1], lines
    assert "delete the CA key /etc/etcd/ssl/ca-key.pem" in rerun.stderr
    # Secure now, and still the same cluster: names, IDs and data dirs.
    client_pem = httpx.Client(verify=tls_context(*cluster.client_files), timeout=5)
    ca_only = ssl.create_default_context(cafile=str(cluster.ssl / "ca.pem"))
    for host, data_dir in zip(hosts, data_dirs, strict=True):
        assert plain_http(host, "get", "x").returncode != 0
        assert not _peer_port_accepts(cluster, host)
        assert host.run("test", "-e", f"{SSL_DIR}/ca-key.pem", check=False).returncode != 0
        assert _stat(host, DATA_DIR)[0] == f"{data_dir} etcd"
        assert (
            host.run("systemctl", "is-enabled", "etcd.service", check=False).stdout.strip()
            == "masked"
        )
        url = f"https://{host.address}:2379/v3/kv/range"
        with pytest.raises(httpx.HTTPError):  # no client certificate: refused
            httpx.post(url, json={"key": "eA=="}, verify=ca_only, timeout=5)
        assert client_pem.post(url, json={"key": "eA=="}).status_code == 200  # kube-apiserver's
    listed = client_pem.post(f"{cluster.endpoints[0]}/v3/cluster/member/list").json()["members"]
    assert {(m["name"], int(m["ID"])) for m in listed} == {
        (m["name"], int(m["id"], 16)) for m in ids
    }
    assert all(row["healthy"] for row in json.loads(adopting.cli("status", "-o", "json").stdout))
    assert json.loads((adopting.state / "adopted.json").read_text())["converted"]
    pids = _main_pids(hosts)
    again = adopting.cli("apply")
    assert "nothing changed, nothing restarted" in again.stdout, again.stderr
    assert _main_pids(hosts) == pids
    hosts[0].run("systemctl", "stop", "plain-http-client", check=False)


def test_plan_after_the_conversion_lists_what_is_left(adopting: Adopting) -> None:
    plan = adopting.cli("plan")
    assert plan.code == 0, plan.stderr
    assert "adopted cluster: converted" in plan.stdout
    assert "  - certificates outlive their CA" in plan.stdout
    assert "  - a known-bad etcd release runs" in plan.stdout
    assert "plain-http" not in plan.stdout and "CA private key" not in plan.stdout


def test_rotate_ca_on_the_adopted_cluster(adopting: Adopting) -> None:
    rotated = adopting.cli("certs", "rotate-ca")
    assert rotated.code == 0, rotated.stderr
    assert "CA rotation complete" in rotated.stdout
    check = adopting.cli("certs", "check")
    assert check.code == 0, check.stdout + check.stderr
    pki_dir = adopting.state / "pki"
    assert (pki_dir / "ca.crt").read_bytes() != (adopting.cluster.ssl / "ca.pem").read_bytes()
    assert (pki_dir / "ca.crt").read_bytes() != (pki_dir / "peer-ca.crt").read_bytes()
    assert all(r["healthy"] for r in json.loads(adopting.cli("status", "-o", "json").stdout))
    plan = adopting.cli("plan")
    assert "certificates outlive their CA" not in plan.stdout, plan.stdout


def test_upgrade_takes_the_adopted_cluster_off_its_known_bad_release(adopting: Adopting) -> None:
    url = adopting.release_server.url("3.5.30")
    result = adopting.cli("upgrade", "--to", "3.5.30", "--release", url)
    assert result.code == 0, result.stderr
    rows = json.loads(adopting.cli("status", "-o", "json").stdout)
    assert {r["version"] for r in rows} == {"3.5.30"} and all(r["healthy"] for r in rows)
    assert "etcd.release" in result.stdout  # the spec line to change, so apply keeps 3.5.30
    data = yaml.safe_load(adopting.spec.read_text())
    data["etcd"] = {"release": url}
    adopting.spec.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = adopting.cli("plan")
    assert "findings: none" in plan.stdout, plan.stdout
    again = adopting.cli("apply")  # the record takes the spec's new release line; hosts: nothing
    assert again.code == 0 and again.stdout.count("no file change") == 3, again.stdout
    assert "restart" not in again.stderr, again.stderr
