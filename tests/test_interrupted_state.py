"""What a killed command leaves, read back right: temp files of cut-short writes, a member launched
without its pid file, a stop whose process was already gone (the sweeps hit these by chance and by
planting; here each is set up exactly)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from etcdforge.fsutil import atomic_write
from etcdforge.services import local
from tests.helpers import loopback_addresses, require_binary


def test_a_write_clears_the_temp_files_dead_writers_left(tmp_path: Path) -> None:
    dead = tmp_path / ".ca.crt.99999999.abcdefgh"  # above pid_max: never alive
    alive = tmp_path / f".ca.crt.{os.getpid()}.abcdefgh"  # a writer still at work
    other = tmp_path / ".ca.crt.5.99999999.abcdefgh"  # a temp of the file `ca.crt.5`
    for path in (dead, alive, other):
        path.write_text("half")
    assert atomic_write(tmp_path / "ca.crt", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ca.crt", alive.name, other.name])


@pytest.fixture
def member(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    (address,) = loopback_addresses(1)
    data_dir = tmp_path / "data"
    flags = [
        "--name=m1",
        f"--data-dir={data_dir}",
        f"--listen-client-urls=http://{address}:2379",
        f"--advertise-client-urls=http://{address}:2379",
        f"--listen-peer-urls=http://{address}:2380",
        f"--initial-advertise-peer-urls=http://{address}:2380",
        f"--initial-cluster=m1=http://{address}:2380",
    ]
    return tmp_path / "etcd.pid", data_dir, flags


@pytest.mark.slow
def test_settle_records_a_member_launched_without_its_pid_file(
    member: tuple[Path, Path, list[str]],
) -> None:
    pid_file, data_dir, flags = member
    pid = local.start(require_binary("3.5.30"), flags, pid_file, pid_file.with_name("etcd.log"))
    try:
        pid_file.unlink()  # as if killed between launching etcd and writing the pid file
        local.settle(pid_file, data_dir)
        assert local.read_pid(pid_file) == pid
    finally:
        assert local.stop(pid_file, data_dir)
    assert not pid_file.exists()


def test_a_stop_whose_process_was_gone_is_a_stop_not_a_failed_start(tmp_path: Path) -> None:
    """Killed after the member exited but before its pid file was removed."""
    pid_file, data_dir = tmp_path / "etcd.pid", tmp_path / "data"
    gone = 99_999_999  # above pid_max: never a live process
    pid_file.write_text(f"{gone}\n")
    local.stopping_file(pid_file).write_text(f"{gone}\n")
    half = tmp_path / ".etcd.stopping.99999999.abcdefgh"  # the note's write cut short too
    half.write_text("half")
    local.settle(pid_file, data_dir)
    assert not pid_file.exists()  # down_reason: "not running", never "exited during start-up"
    assert not local.stopping_file(pid_file).exists()
    assert not half.exists()  # cleared now: the next stop of this member may be long in coming


def test_a_crashed_member_keeps_its_pid_file(tmp_path: Path) -> None:
    """No stop note: a crash, whose log is worth reading, stays a crash."""
    pid_file, data_dir = tmp_path / "etcd.pid", tmp_path / "data"
    pid_file.write_text("99999999\n")
    local.settle(pid_file, data_dir)
    assert local.read_pid(pid_file) == 99_999_999
