"""Kill-point sweeps on three real hosts (systemd + sshd, tests/fleet.py), etcd 3.5.30.

`apply` (from a reset: files gone, data kept), `certs rotate-ca` (rolling restarts through
`apply`) and `reset --purge-data`, each SIGKILLed at 4 points over its run plus planted places
(an upload or a remote command in flight), rerun at once each time; see tests/killsweep.py.
The module's cluster is taken apart at the end: the hosts are shared with other modules.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from etcdforge import pki
from tests.apply_helpers import ReleaseServer, host_spec, write_yaml
from tests.fleet import Host
from tests.helpers import require_tarball, run_cli
from tests.kill_inside import Inside
from tests.killsweep import Sweep, SweepReport, sweep
from tests.killsweep_run import Send, signal_at
from tests.killsweep_targets import HostsTarget
from tests.load import WriteLoad

pytestmark = pytest.mark.slow

VERSION = "3.5.30"
POINTS = 4
#: A command on a host still running when the CLI dies (`SSHHost._exec` is every remote call).
REMOTE = "etcdforge.hosts:SSHHost._exec"


@dataclass
class Deployed:
    hosts: list[Host]
    spec: Path
    state: Path
    env: dict[str, str]

    @property
    def args(self) -> list[str]:
        return ["-f", str(self.spec)]

    def cli(self, *args: str) -> None:
        result = run_cli(*args, *self.args, env=self.env, timeout=600)
        assert result.code == 0, result.stderr

    def target(self, running: bool = True) -> HostsTarget:
        return HostsTarget(self.hosts, self.state, running)


@pytest.fixture(scope="module")
def deployed(
    fleet3: list[Host], release_server: ReleaseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    require_tarball(VERSION)
    work = tmp_path_factory.mktemp("sweep3")
    data = host_spec("sweep3", fleet3, release_server.url(VERSION), state_dir=str(work / "state"))
    spec = write_yaml(work / "cluster.yaml", data)
    deployed = Deployed(fleet3, spec, work / "state", {"ETCDFORGE_CACHE_DIR": str(work / "cache")})
    try:
        deployed.cli("apply")
        yield deployed
    finally:
        run_cli("reset", "--purge-data", "--yes", *deployed.args, env=deployed.env, timeout=600)


def _load(deployed: Deployed, prefix: str) -> WriteLoad:
    target = deployed.target()
    return WriteLoad(target.endpoints, target.admin_files(), prefix, reload=True)


def _passed(report: SweepReport) -> None:
    print(report.summary())
    assert report.ok, report.details()


def test_apply_after_a_reset(deployed: Deployed) -> None:
    def reset() -> None:
        deployed.cli("reset")

    def check() -> None:
        for host in deployed.hosts:
            assert host.run("readlink", "/opt/etcd/current").stdout.strip() == f"v{VERSION}"

    planted = [
        Inside(REMOTE, "during", "mktemp", nth=4, delay=0.01),  # a file upload in flight
        Inside(REMOTE, "during", ".unpack", delay=0.05),  # the release being unpacked
        Inside(REMOTE, "during", "--no-block", delay=0.01),  # members being started
    ]
    target = deployed.target()
    args = ["apply", *deployed.args]
    with _load(deployed, "apply") as load:
        spec = Sweep(args, target, POINTS, load=load, prepare=reset, check=check, planted=planted)
        _passed(sweep(spec))


def test_certs_rotate_ca(deployed: Deployed) -> None:
    def check() -> None:
        assert not (deployed.state / "pki" / "rotation").exists()
        bundle = pki.load_certs(deployed.state / "pki" / "ca.crt")
        assert len(bundle) == 1
        for host in deployed.hosts:
            assert host.run("cat", "/etc/etcd/pki/ca.crt").stdout.encode() == pki.cert_to_pem(
                bundle[0]
            )

    planted = [
        Inside(REMOTE, "during", "systemctl restart", delay=0.2)
    ]  # systemctl restart in flight
    target = deployed.target()
    args = ["certs", "rotate-ca", *deployed.args]
    with _load(deployed, "rotate") as load:
        _passed(sweep(Sweep(args, target, POINTS, load=load, check=check, planted=planted)))


def test_sigterm_stops_apply_between_host_steps(deployed: Deployed) -> None:
    """Hosts work in parallel: each finishes the step it is in, none starts another."""
    deployed.cli("reset")
    term = Send(signal.SIGTERM)
    stopped = signal_at(
        ["apply", *deployed.args], lambda line: "write /etc/etcd/pki/ca.crt" in line, term,
        env=deployed.env,
    )  # fmt: skip
    assert stopped.code == 143, stopped.stderr
    line = next(x for x in stopped.stderr.splitlines() if x.startswith("stopped by SIGTERM"))
    assert "(the steps before it are complete); rerun the same command to continue" in line
    assert deployed.target().leftovers() == []  # no upload left half-done on any host
    deployed.cli("apply")
    assert deployed.target().unhealthy() == []


def test_reset_purge_data(deployed: Deployed) -> None:
    def deploy() -> None:
        deployed.cli("apply")

    def check() -> None:
        assert not (deployed.state / "cluster.json").exists()
        for host in deployed.hosts:
            left = host.run(
                "sh", "-c",
                "ls -d /etc/etcd /opt/etcd /var/lib/etcd /etc/systemd/system/etcd.service "
                "/usr/local/bin/etcd 2>/dev/null; exit 0",
            ).stdout  # fmt: skip
            assert left == "", f"{host.name}: {left}"

    planted = [Inside(REMOTE, "during", "rm -rf", delay=0.01)]
    args = ["reset", "--purge-data", "--yes", *deployed.args]
    spec = Sweep(
        args,
        deployed.target(running=False),
        POINTS,
        prepare=deploy,
        check=check,
        healthy_after=False,
        planted=planted,
    )
    _passed(sweep(spec))
