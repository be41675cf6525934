"""One changing command per cluster: the state dir's file lock and the lease-backed lock key."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from etcdforge import lock, snapshot
from etcdforge.cli.common import parse_duration
from etcdforge.client import EtcdClient, run
from etcdforge.record import ClusterRecord, read_record
from tests.conftest import ClusterFactory
from tests.helpers import (
    LocalCluster,
    etcd_pids_under,
    kill_cli_at,
    require_binary,
    run_cli,
    spec_data,
    write_spec,
)

HOLDER = lock.Holder(
    host="admin-2",
    pid=4242,
    command="etcdforge apply -f prod.yaml",
    since="2030-01-02T03:04:05Z",
    state_dir="/home/ops/state",
    machine="abc",
)

# --- no etcd needed ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90.0), ("30s", 30.0), ("2m", 120.0), ("1h30m", 5400.0), ("500ms", 0.5), ("0", 0.0)],
)
def test_durations_parse_like_go(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "5x", "m", "30 s", "-1s", "1.5.5s", "2m soon"])
def test_malformed_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_malformed_wait_lock_is_a_usage_error() -> None:
    result = run_cli("down", "--wait-lock", "soon")
    assert result.code == 2
    assert "--wait-lock" in result.stderr and "not a duration" in result.stderr


def test_holder_messages_say_who_and_what_to_do() -> None:
    for message in (
        lock.file_held_message(Path("/home/ops/state"), HOLDER, 0),
        lock.cluster_held_message("prod", HOLDER, 30),
    ):
        assert "\n" not in message
        assert (
            "pid 4242 on admin-2 (`etcdforge apply -f prod.yaml`, since 2030-01-02T03:04:05Z)"
            in (message)
        )
        assert "--wait-lock DURATION" in message
    cluster = lock.cluster_held_message("prod", HOLDER, 30)
    assert cluster.startswith("cluster prod is locked by pid 4242")
    assert "from state dir /home/ops/state after waiting 30 s" in cluster
    assert f"releases it within {lock.LEASE_TTL} s" in cluster
    assert lock.Holder.from_json(HOLDER.to_json()) == HOLDER
    assert lock.Holder.from_json(b"").describe() == "an unknown holder"
    assert (
        lock.command_summary(["up", "-f", "my cluster.yaml"]) == "etcdforge up -f 'my cluster.yaml'"
    )


def test_file_lock_refuses_then_waits_for_its_holder(tmp_path: Path) -> None:
    state = tmp_path / "fresh" / "state"
    with lock.hold(state, "etcdforge up") as held:
        assert held.cluster is None  # nothing deployed: the file lock alone
        assert oct(state.stat().st_mode & 0o777) == "0o700"
        with pytest.raises(lock.LockHeldError) as refused, lock.hold(state, "etcdforge down"):
            pass
        assert refused.value.holder.pid == os.getpid()
        assert f"is locked by pid {os.getpid()}" in str(refused.value)
        assert "`etcdforge up`" in str(refused.value)
    # Held by a thread for 0.5 s: a waiter gets it once it is released, not before.
    gate = threading.Event()

    def holder() -> None:
        with lock.hold(state, "etcdforge apply"):
            gate.set()
            time.sleep(0.5)

    thread = threading.Thread(target=holder)
    thread.start()
    assert gate.wait(5)
    started = time.monotonic()
    seen: list[str] = []
    with lock.hold(state, "etcdforge down", wait=10, notify=seen.append):
        assert 0.2 < time.monotonic() - started < 5
    thread.join(5)
    assert len(seen) == 1 and "`etcdforge apply`" in seen[0]


def test_file_lock_survives_its_state_dir_being_purged(tmp_path: Path) -> None:
    """`down --purge` deletes the lock file: a waiter must not lock the deleted file."""
    state = tmp_path / "state"
    got_it, done = threading.Event(), threading.Event()

    def waiter() -> None:
        with lock.hold(state, "etcdforge up", wait=10):
            got_it.set()
            done.wait(10)

    with lock.hold(state, "etcdforge down --purge"):
        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
        shutil.rmtree(state)
    assert got_it.wait(5)
    with pytest.raises(lock.LockHeldError, match="`etcdforge up`"), lock.hold(state, "up"):
        pass
    done.set()
    thread.join(5)


# --- real clusters ---------------------------------------------------------------------------


def cluster_ids(record: ClusterRecord) -> set[str]:
    """The cluster ID each member reports: one ID means one cluster."""

    async def ids() -> set[str]:
        async with EtcdClient(record.endpoints, record.admin_tls) as client:
            return {
                (await client.call(e, "/v3/maintenance/status"))["header"]["cluster_id"]
                for e in record.endpoints
            }

    return run(ids())


def start_ups(spec: Path, state: Path, *extra: str) -> list[subprocess.Popen[str]]:
    argv = [sys.executable, "-m", "etcdforge", "up", "-f", str(spec), "--state-dir", str(state)]
    return [
        subprocess.Popen([*argv, *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A spec never deployed, and its state dir; purged (every etcd stopped) afterwards."""
    spec = write_spec(tmp_path, spec_data("race", 3, require_binary("3.5.1")))
    state = tmp_path / "state"
    yield spec, state
    if (state / "cluster.json").exists():
        run_cli("down", "--purge", "-f", str(spec), "--state-dir", str(state))
    assert etcd_pids_under(state) == []


def paused_at_first_step(proc: subprocess.Popen[str]) -> list[str]:
    """SIGSTOP `proc` once it prints its first step (from then on it holds the cluster's lock),
    so a second command surely meets the lock however slow this machine is; returns the list
    its stderr lines keep arriving into."""
    lines: list[str] = []
    stepped = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "→" in line:
                stepped.set()

    threading.Thread(target=read, daemon=True).start()
    assert stepped.wait(timeout=120), "".join(lines)
    os.kill(proc.pid, signal.SIGSTOP)
    return lines


@pytest.mark.slow
def test_a_second_up_is_refused_while_one_runs(fresh: tuple[Path, Path]) -> None:
    spec, state = fresh
    argv = [sys.executable, "-m", "etcdforge", "up", "-f", str(spec), "--state-dir", str(state)]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_err = paused_at_first_step(first)
        second = run_cli("up", "-f", str(spec), "--state-dir", str(state))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.code == 1, second.stderr
    error = second.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert f"is locked by pid {first.pid} on " in error and "--wait-lock" in error
    assert first.wait(timeout=120) == 0, "".join(first_err)
    record = read_record(state)
    assert record is not None and len(cluster_ids(record)) == 1
    assert len(etcd_pids_under(state)) == 3


@pytest.mark.slow
def test_two_ups_at_once_build_one_cluster(fresh: tuple[Path, Path]) -> None:
    spec, state = fresh
    procs = start_ups(spec, state, "--wait-lock", "2m")
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sum("nothing changed" in out for out, _ in outputs) == 1
    record = read_record(state)
    assert record is not None
    assert len(cluster_ids(record)) == 1
    pids = etcd_pids_under(state)
    assert len(pids) == 3

    down = run_cli("down", "--purge", "-f", str(spec), "--state-dir", str(state))
    assert down.code == 0, down.stderr
    assert not set(pids) & set(etcd_pids_under(state))  # gone, or a zombie awaiting its reaper


@pytest.mark.slow
def test_a_killed_holder_blocks_nothing(fresh: tuple[Path, Path]) -> None:
    spec, state = fresh
    args = ["-f", str(spec), "--state-dir", str(state)]
    # Killed once every member is started (killed inside a start, an etcd could be left without
    # its pid file, which is another matter than locking).
    kill_cli_at(["up", *args], lambda line: "wait for every member" in line)
    started = time.monotonic()
    rerun = run_cli("up", *args)
    assert rerun.code == 0, rerun.stderr
    assert "locked" not in rerun.stderr and time.monotonic() - started < 30
    record = read_record(state)
    assert record is not None and len(cluster_ids(record)) == 1
    assert lock.read_holder(record) is None  # released with its lease

    # A changing command holding the cluster's key, killed: the key outlives it by its TTL.
    renew = ["certs", "renew", "--all", *args]
    kill_cli_at(renew, lambda line: "→ renew" in line)
    holder = lock.read_holder(record)
    assert holder is not None and holder.command.startswith("etcdforge certs renew --all")
    killed_at = time.monotonic()
    for _ in range(int(lock.LEASE_TTL / 0.2) + 25):  # bounded: TTL plus 5 s
        if lock.read_holder(record) is None:
            break
        time.sleep(0.2)
    assert lock.read_holder(record) is None
    assert time.monotonic() - killed_at <= lock.LEASE_TTL + 5

    # Killed again: the next command from this state dir does not wait for the TTL (the file
    # lock proves the key's holder is gone).
    kill_cli_at(renew, lambda line: "→ renew" in line)
    assert lock.read_holder(record) is not None
    started = time.monotonic()
    again = run_cli(*renew)
    assert again.code == 0, again.stderr
    assert time.monotonic() - started < lock.LEASE_TTL
    assert lock.read_holder(record) is None

    # `down` cannot revoke its key once the members are stopped; the next `up` drops it.
    assert run_cli("down", *args).code == 0
    assert run_cli("up", *args).code == 0
    assert lock.read_holder(record) is None


@pytest.fixture(scope="module")
def shared(cluster_factory: ClusterFactory) -> LocalCluster:
    return cluster_factory("locked", count=3)


def copy_of_state(cluster: LocalCluster, where: Path) -> Path:
    """Another admin machine's copy of the state dir (the members' data stays behind)."""
    shutil.copytree(cluster.state_dir, where, ignore=shutil.ignore_patterns("members", "lock"))
    return where


@pytest.mark.slow
def test_a_lock_from_another_state_dir_refuses_then_lets_waiters_in(
    shared: LocalCluster, tmp_path: Path
) -> None:
    copy = copy_of_state(shared, tmp_path / "other-admin")
    admin_cert = shared.state_dir / "pki" / "admin.crt"
    before = admin_cert.read_bytes()
    with lock.hold(copy, "etcdforge certs rotate-ca -f prod.yaml") as held:
        assert held.cluster is not None
        for command in (["certs", "renew", "--all"], ["down"], ["up"]):
            refused = run_cli(*command, *shared.args)
            assert refused.code == 1, refused.stderr
            assert refused.stderr.startswith(
                f"error: cluster locked is locked by pid {os.getpid()} on "
            ), refused.stderr
            assert f"from state dir {copy.resolve()}; wait for it with --wait-lock" in (
                refused.stderr
            )
        assert admin_cert.read_bytes() == before
        assert shared.cli("status").code == 0  # `down` stopped nothing

        renew = ["certs", "renew", "--all", "--wait-lock", "1m", *shared.args]
        waiter = subprocess.Popen(
            [sys.executable, "-m", "etcdforge", *renew],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(3)
        assert waiter.poll() is None, waiter.communicate()
        assert admin_cert.read_bytes() == before
    _, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    assert "waiting up to 60 s for the lock held by pid" in err
    assert admin_cert.read_bytes() != before
    record = read_record(shared.state_dir)
    assert record is not None and lock.read_holder(record) is None


@pytest.mark.slow
def test_read_only_commands_run_while_the_lock_is_held(shared: LocalCluster) -> None:
    record = read_record(shared.state_dir)
    assert record is not None

    async def count() -> int:
        async with EtcdClient(record.endpoints, record.admin_tls) as client:
            return await snapshot.count_keys(client)

    unlocked = run(count())
    with lock.hold(shared.state_dir, "etcdforge apply"):
        holder = lock.read_holder(record)
        assert holder is not None and holder.pid == os.getpid()
        assert run(count()) == unlocked  # the lock key never makes a cluster look non-empty
        for command in (
            ["status"],
            ["env"],
            ["certs", "check"],
            ["kubeadm", "config"],
            ["kubeadm", "apiserver-flags"],
            ["up", "--dry-run"],
            ["certs", "renew", "--all", "--dry-run"],
            ["certs", "rotate-ca", "--dry-run"],
        ):
            result = run_cli(*command, *shared.args)
            assert result.code == 0, (command, result.stderr)
            assert "locked" not in result.stderr
