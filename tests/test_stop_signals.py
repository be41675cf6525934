"""SIGTERM and Ctrl-C stop a changing command at a safe point, for real (signals to the CLI).

The command finishes the step it is in, stops before the next one (or in a health wait), prints
one line naming where it stopped and that a rerun continues, and exits 128 + the signal (143 for
SIGTERM, 130 for SIGINT); the rerun then completes. A second signal stops at once.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcdforge.interrupt import (
    Stopped,
    before_step,
    checkpoint,
    stop_at_safe_points,
    stop_requested,
)
from etcdforge.ops.target import Selection, record_for
from etcdforge.services.local import LocalRuntime
from etcdforge.tls import TLSFiles
from tests.conftest import start_cluster, stop_cluster
from tests.helpers import LocalCluster, run_cli
from tests.killsweep_run import Outcome, Send, signal_at
from tests.killsweep_targets import LocalTarget
from tests.load import WriteLoad
from tests.test_kubeadm_cluster import fill, registry, start_stacked

VERSION = "3.5.30"
STOPPED = re.compile(
    r"^stopped by (SIGTERM|SIGINT) (before step '.+' \(the steps before it are complete\)|while .+)"
    r"; rerun the same command to continue$"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    started = start_cluster(tmp_path_factory.mktemp("signals"), "signals", 3, VERSION)
    try:
        yield started
    finally:
        stop_cluster(started)


def _stopped_line(outcome: Outcome) -> str:
    """The one line the CLI printed about where it stopped (checked against its format)."""
    lines = [line.strip() for line in outcome.stderr.splitlines() if line.startswith("stopped by")]
    assert len(lines) == 1, outcome.stderr
    assert STOPPED.match(lines[0]), lines[0]
    return lines[0]


@pytest.mark.slow
def test_sigterm_stops_a_ca_rotation_between_steps(cluster: LocalCluster) -> None:
    target = LocalTarget(cluster)
    args = ["certs", "rotate-ca", *cluster.args]
    with WriteLoad(target.endpoints, target.admin_files(), "term", reload=True) as load:
        # Inside m1's step (its health gate, hand-off, restart or the wait after it): the
        # signal must never leave m1 stopped between the two halves of its restart.
        stopped = signal_at(
            args, lambda line: "on m1 (restart)" in line, Send(signal.SIGTERM), delay=0.3
        )
        assert stopped.code == 143, stopped.stderr
        assert "SIGTERM received: stopping at the next safe point" in stopped.stderr
        line = _stopped_line(stopped)
        waits = ("while waiting for every member to be healthy", "before step 'trust the old")
        assert line.split(" ", 3)[3].startswith(waits), line
        assert sorted(target.member_pids().values()) == ["m1", "m2", "m3"]  # none left down
        record = record_for(Selection(file=cluster.spec_path, state_dir=cluster.state_dir))
        files = record.layout.member("m1")
        restarted = LocalRuntime(record).started_after(
            "m1", files.trusted_ca, files.peer_trusted_ca
        )
        resumed = run_cli(*args, timeout=300)
        assert resumed.code == 0, resumed.stderr
        # A step finished before the stop is not redone; one stopped in its gate is.
        assert ("trust the old and new CAs on m1" in resumed.stderr) != restarted
    assert target.unhealthy() == []
    assert set(load.missing(target.endpoints).values()) == {0}


def test_a_second_signal_stops_at_once() -> None:
    """In-process: the first SIGTERM only asks, the second raises wherever the code is."""
    heard: list[str] = []
    with pytest.raises(Stopped) as stopped, stop_at_safe_points(heard.append):
        os.kill(os.getpid(), signal.SIGTERM)  # handled before the next line runs
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # never finishes: the second signal raises
    assert stopped.value.exit_code == 143
    assert "at once" in str(stopped.value)
    assert heard == [
        "SIGTERM received: stopping at the next safe point (between steps); "
        "send it again to stop at once"
    ]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def test_a_checkpoint_after_one_signal_names_where() -> None:
    with pytest.raises(Stopped) as stopped, stop_at_safe_points(lambda _: None):
        checkpoint("while testing")  # nothing requested yet: no-op
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        before_step("restart m2", "m2")
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == (
        "stopped by SIGINT before step 'restart m2' on m2 (the steps before it are complete); "
        "rerun the same command to continue"
    )
    assert stop_requested() is None  # cleared for the next command in this process


@pytest.mark.slow
def test_ctrl_c_to_the_process_group_lets_the_snapshot_finish(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """Ctrl-C reaches every process of the terminal's group: the snapshot tool must not die."""
    source = start_stacked(tmp_path / "stacked", VERSION)
    try:
        expected = fill(source, 200)
        args = ["kubeadm", "migrate", *cluster.args, "--from", source.url]
        args += ["--from-pki", str(source.pki_dir), "--replace"]
        ctrl_c = Send(signal.SIGINT, group=True)
        at_snapshot = lambda line: "snapshot the stacked etcd" in line  # noqa: E731
        stopped = signal_at(args, at_snapshot, ctrl_c, delay=0.05)
        assert stopped.code == 130, stopped.stderr
        assert "before step 'stop etcd on m1'" in _stopped_line(stopped)
        assert (cluster.state_dir / "migrate" / "progress.json").exists()  # the snapshot is kept
        resumed = run_cli(*args, timeout=300)
        assert resumed.code == 0, resumed.stderr
        assert "snapshot the stacked etcd" not in resumed.stderr  # the same snapshot, resumed
        target = LocalTarget(cluster)
        for endpoint in target.endpoints:
            assert registry(endpoint, TLSFiles(*target.admin_files())) == expected
    finally:
        source.stop()
