"""A minimal supervisor for local members: detached processes with pid and log files.

Members outlive the CLI. Signals only ever go to a PID we recorded, and only after
/proc/PID/cmdline shows it is still the etcd we started with that member's data dir, so a
recycled PID is never killed. The member's flags live in a file beside the pid file, so what a
running member was started with can be compared with what the spec wants now.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from etcdforge.errors import ServiceError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write

STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def _reap(pid: int) -> None:
    """Collect our own exited child so it does not linger as a zombie in long-lived callers."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _identity(data_dir: Path) -> str:
    return f"--data-dir={data_dir}"


def is_our_etcd(pid: int, data_dir: Path) -> bool:
    argv = _cmdline(pid)
    return (
        len(argv) >= 2
        and Path(argv[0]).name.startswith("etcd")
        and _identity(data_dir) in argv
        and not _is_zombie(pid)
    )


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def running_pid(pid_file: Path, data_dir: Path) -> int | None:
    """The recorded PID if that process is still our etcd, else None."""
    pid = read_pid(pid_file)
    if pid is None:
        return None
    _reap(pid)
    return pid if is_our_etcd(pid, data_dir) else None


def start(binary: Path, flags: list[str], pid_file: Path, log_file: Path) -> int:
    """Launch etcd detached from our session; its output goes to the log file."""
    if not any(flag.startswith("--data-dir=") for flag in flags):
        raise ServiceError("internal: a local member needs --data-dir to be recognised later")
    with open(log_file, "ab") as log:
        os.chmod(log_file, PRIVATE_FILE)
        try:
            process = subprocess.Popen(
                [str(binary), *flags],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise ServiceError(f"{binary}: cannot start etcd ({exc.strerror})") from None
    atomic_write(pid_file, f"{process.pid}\n".encode(), PRIVATE_FILE)
    return process.pid


def stop(pid_file: Path, data_dir: Path, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; returns True if a process was stopped."""
    pid = running_pid(pid_file, data_dir)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    if not _wait_gone(pid, data_dir, timeout):
        if is_our_etcd(pid, data_dir):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, data_dir, 5.0):
            raise ServiceError(f"etcd PID {pid} did not exit after SIGKILL; check it by hand")
    pid_file.unlink(missing_ok=True)
    return True


def _wait_gone(pid: int, data_dir: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_our_etcd(pid, data_dir):
            return True
        time.sleep(POLL_INTERVAL)
    return False


def log_tail(log_file: Path, lines: int = 5) -> str:
    try:
        text = log_file.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
