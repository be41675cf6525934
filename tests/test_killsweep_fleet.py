"""Kill-point sweeps on three real hosts (systemd + sshd, tests/fleet.py), etcd 3.5.30.

`apply` (from a reset: files gone, data kept), `certs rotate-ca` (rolling restarts through
`apply`) and `reset --purge-data`, each SIGKILLed at 4 points over its run plus planted places
(an upload or a remote command in flight), rerun at once each time; see tests/killsweep.py.
The module's cluster is taken apart at the end: the hosts are shared with other modules.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

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
from tests.test_apply import Deployed

pytestmark = pytest.mark.slow

VERSION = "3.5.30"
POINTS = 4
#: A command on a host still running when the CLI dies (`SSHHost._exec` is every remote call).
REMOTE = "etcdforge.hosts:SSHHost._exec"


def _ok(deployed: Deployed, *args: str) -> None:
    result = deployed.cli(*args, timeout=600)
    assert result.code == 0, result.stderr


def _args(deployed: Deployed) -> list[str]:
    return ["-f", str(deployed.spec)]


def _target(deployed: Deployed, running: bool = True) -> HostsTarget:
    return HostsTarget(deployed.hosts, deployed.state, running)


@pytest.fixture(scope="module")
def deployed(
    fleet3: list[Host], release_server: ReleaseServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deployed]:
    require_tarball(VERSION)
    work = tmp_path_factory.mktemp("sweep3")
    data = host_spec("sweep3", fleet3, release_server.url(VERSION), state_dir=str(work / "state"))
    spec = write_yaml(work / "cluster.yaml", data)
    env = {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
    first = run_cli("apply", "-f", str(spec), env=env, timeout=600)
    deployed = Deployed(fleet3, spec, work / "state", env, first)
    try:
        assert first.code == 0, first.stderr
        yield deployed
    finally:
        deployed.cli("reset", "--purge-data", "--yes", timeout=600)


def _load(deployed: Deployed, prefix: str) -> WriteLoad:
    target = _target(deployed)
    return WriteLoad(target.endpoints, target.admin_files(), prefix, reload=True)


def _passed(report: SweepReport) -> None:
    print(report.summary())
    assert report.ok, report.details()


def test_apply_after_a_reset(deployed: Deployed) -> None:
    def reset() -> None:
        _ok(deployed, "reset")

    def check() -> None:
        for host in deployed.hosts:
            assert host.run("readlink", "/opt/etcd/current").stdout.strip() == f"v{VERSION}"

    planted = [
        Inside(REMOTE, "during", "mktemp", nth=4, delay=0.01),  # a file upload in flight
        Inside(REMOTE, "during", ".unpack", delay=0.05),  # the release being unpacked
        Inside(REMOTE, "during", "--no-block", delay=0.01),  # members being started
    ]
    target = _target(deployed)
    args = ["apply", *_args(deployed)]
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
    target = _target(deployed)
    args = ["certs", "rotate-ca", *_args(deployed)]
    with _load(deployed, "rotate") as load:
        _passed(sweep(Sweep(args, target, POINTS, load=load, check=check, planted=planted)))


def test_sigterm_stops_apply_between_host_steps(deployed: Deployed) -> None:
    """Hosts work in parallel: each finishes the step it is in, none starts another."""
    _ok(deployed, "reset")
    term = Send(signal.SIGTERM)
    stopped = signal_at(
        ["apply", *_args(deployed)], lambda line: "write /etc/etcd/pki/ca.crt" in line, term,
        env=deployed.env,
    )  # fmt: skip
    assert stopped.code == 143, stopped.stderr
    line = next(x for x in stopped.stderr.splitlines() if x.startswith("stopped by SIGTERM"))
    assert "(the steps before it are complete); rerun the same command to continue" in line
    assert _target(deployed).leftovers() == []  # no upload left half-done on any host
    _ok(deployed, "apply")
    assert _target(deployed).unhealthy() == []


def test_reset_purge_data(deployed: Deployed) -> None:
    def deploy() -> None:
        _ok(deployed, "apply")

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
    args = ["reset", "--purge-data", "--yes", *_args(deployed)]
    spec = Sweep(
        args,
        _target(deployed, running=False),
        POINTS,
        prepare=deploy,
        check=check,
        healthy_after=False,
        planted=planted,
    )
    _passed(sweep(spec))
