"""A minimal supervisor for local members: detached processes with pid and log files.

Members outlive the CLI. Signals only ever go to a PID we recorded, and only after
/proc/PID/cmdline shows it is still the etcd we started with that member's data dir, so a
recycled PID is never killed. The member's flags live in a file beside the pid file, so what a
running member was started with can be compared with what the spec wants now.

Each start appends a marker line to the member's log, so a diagnosis reads only the latest start's
lines, never an earlier run's shutdown. A stop leaves a `etcd.stopping` note (the PID) until the
process is gone, so a command that finds a member mid-stop (the previous command was killed while
stopping it) waits for it to finish instead of mistaking it for a failed start. A start killed
between launching etcd and writing the pid file leaves a member without one: it is found by its
data dir, and `settle` records its PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from etcdforge.errors import ServiceError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, drop_stale_temps
from etcdforge.layout import MemberLayout
from etcdforge.record import ClusterRecord
from etcdforge.services.runtime import RunningMember

STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
START_MARK = "### etcdforge: start "


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def etcd_environ(pid: int) -> dict[str, str]:
    """The `ETCD_*` variables a process started with (etcd reads settings from them too)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    pairs = (part.decode(errors="replace").partition("=") for part in raw.split(b"\0"))
    return {key: value for key, sep, value in pairs if sep and key.startswith("ETCD_")}


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
    argv = command_line(pid)
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
    """The member's etcd PID: the recorded one if it is still our etcd, else any etcd running
    on this data dir (a command killed between launching etcd and writing the pid file leaves
    one behind: it is found, not orphaned), else None."""
    pid = read_pid(pid_file)
    if pid is not None:
        _reap(pid)
        if is_our_etcd(pid, data_dir):
            return pid
    return find_etcd_on(data_dir)


def find_etcd_on(data_dir: Path) -> int | None:
    """The etcd process started with `--data-dir=<data_dir>`, if any (one per data dir)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and is_our_etcd(int(entry.name), data_dir):
            return int(entry.name)
    return None


def start(binary: Path, flags: list[str], pid_file: Path, log_file: Path) -> int:
    """Launch etcd detached from our session; its output goes to the log file."""
    if not any(flag.startswith("--data-dir=") for flag in flags):
        raise ServiceError("internal: a local member needs --data-dir to be recognised later")
    with open(log_file, "ab") as log:
        os.chmod(log_file, PRIVATE_FILE)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        log.write(f"{START_MARK}{stamp} {binary}\n".encode())
        log.flush()
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


def stopping_file(pid_file: Path) -> Path:
    return pid_file.with_name("etcd.stopping")


def stop(pid_file: Path, data_dir: Path, timeout: float = STOP_TIMEOUT) -> bool:
    """SIGTERM, then SIGKILL after `timeout`; returns True if a process was stopped."""
    pid = running_pid(pid_file, data_dir)
    note = stopping_file(pid_file)
    if pid is None:
        pid_file.unlink(missing_ok=True)
        note.unlink(missing_ok=True)
        return False
    atomic_write(note, f"{pid}\n".encode(), PRIVATE_FILE)
    os.kill(pid, signal.SIGTERM)
    _finish_stop(pid, data_dir, timeout)
    pid_file.unlink(missing_ok=True)
    note.unlink(missing_ok=True)
    return True


def _finish_stop(pid: int, data_dir: Path, timeout: float) -> None:
    if not _wait_gone(pid, data_dir, timeout):
        if is_our_etcd(pid, data_dir):
            os.kill(pid, signal.SIGKILL)
        if not _wait_gone(pid, data_dir, 5.0):
            raise ServiceError(f"etcd PID {pid} did not exit after SIGKILL; check it by hand")


def settle(pid_file: Path, data_dir: Path, timeout: float = STOP_TIMEOUT) -> None:
    """Finish what an earlier, interrupted command began: a stop (see the module docstring), or
    a start killed between launching etcd and writing its pid file (the pid is recorded now).
    A write of the pid file or the stop note cut short left a temp file: removed here, since
    the next write of that file may be long in coming."""
    for path in (pid_file, stopping_file(pid_file)):
        drop_stale_temps(path)
    _finish_interrupted_stop(pid_file, data_dir, timeout)
    recorded = read_pid(pid_file)
    if recorded is not None and is_our_etcd(recorded, data_dir):
        return
    found = find_etcd_on(data_dir)
    if found is not None:
        atomic_write(pid_file, f"{found}\n".encode(), PRIVATE_FILE)


def _finish_interrupted_stop(pid_file: Path, data_dir: Path, timeout: float) -> None:
    note = stopping_file(pid_file)
    pid = read_pid(note)
    if pid is None:
        note.unlink(missing_ok=True)
        return
    if pid == read_pid(pid_file):
        if is_our_etcd(pid, data_dir):
            _finish_stop(pid, data_dir, timeout)
        # Stopped on purpose, even if the process was gone already: not a failed start.
        pid_file.unlink(missing_ok=True)
    note.unlink(missing_ok=True)


def kill(pid_file: Path, data_dir: Path) -> bool:
    """SIGKILL, as a crash would; the pid file stays, as it would after a crash."""
    pid = running_pid(pid_file, data_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, data_dir, 5.0):
        raise ServiceError(f"etcd PID {pid} did not exit after SIGKILL; check it by hand")
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
    """The last lines the member logged since its latest start (never an earlier run's)."""
    try:
        text = log_file.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    current = text.rpartition(START_MARK)[2].partition("\n")[2] if START_MARK in text else text
    return "\n".join(current.splitlines()[-lines:])


def started_at(pid: int) -> float | None:
    """When a process started, as a Unix time (10 ms resolution), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    ticks = int(fields[19])  # field 22, counted after the "(comm)" part
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def stored_flags(files: MemberLayout) -> list[str]:
    """The flags `up` wrote for the member: what it starts with."""
    try:
        text = files.flags_file.read_text()
    except FileNotFoundError:
        raise ServiceError(
            f"{files.flags_file}: missing; run `etcdforge up` to write the member's flags"
        ) from None
    return [line for line in text.splitlines() if line.strip()]


def member_binary(files: MemberLayout) -> Path | None:
    """The etcd this member was switched to by an upgrade in progress, if any."""
    try:
        text = files.binary_file.read_text().strip()
    except FileNotFoundError:
        return None
    return Path(text) if text else None


def set_member_binary(files: MemberLayout, binary: Path | None) -> None:
    """Switch one member to `binary` for its next start (None: back to the cluster's own)."""
    if binary is None:
        files.binary_file.unlink(missing_ok=True)
    else:
        atomic_write(files.binary_file, f"{binary}\n".encode(), PRIVATE_FILE)


def log_message(line: str) -> str:
    """etcd logs JSON lines; surface just the message and error fields."""
    try:
        entry = json.loads(line)
    except ValueError:
        return line.strip()
    if not isinstance(entry, dict):
        return line.strip()
    parts = [str(entry.get("msg", ""))]
    if entry.get("error"):
        parts.append(str(entry["error"]))
    return ": ".join(p for p in parts if p)


class LocalRuntime:
    """Members of a cluster started by `up`, as detached processes of this machine."""

    def __init__(self, record: ClusterRecord) -> None:
        self.record = record
        self.layout = record.layout

    def files(self, name: str) -> MemberLayout:
        return self.layout.member(name)

    def label(self, name: str) -> str:
        return name

    def service_name(self, name: str) -> str:
        return "etcd"

    def pid(self, name: str) -> int | None:
        files = self.files(name)
        return running_pid(files.pid_file, files.data_dir)

    def binary(self, name: str) -> Path:
        """What the member starts with: its own etcd while an upgrade rolls, else the cluster's."""
        return member_binary(self.files(name)) or Path(self.record.binary)

    async def start(self, name: str) -> None:
        files = self.files(name)
        if self.pid(name) is None:
            start(self.binary(name), stored_flags(files), files.pid_file, files.log_file)

    async def stop(self, name: str) -> None:
        files = self.files(name)
        await asyncio.to_thread(stop, files.pid_file, files.data_dir)

    async def restart(self, name: str) -> None:
        await self.stop(name)
        await self.start(name)

    async def kill(self, name: str) -> None:
        files = self.files(name)
        await asyncio.to_thread(kill, files.pid_file, files.data_dir)

    async def is_running(self, name: str) -> bool:
        return self.pid(name) is not None

    def started_after(self, name: str, *paths: Path) -> bool:
        """True when the member runs on what `paths` hold now (started after they last changed),
        or is not running: etcd reads its trusted CA files only at start-up."""
        pid = self.pid(name)
        start = started_at(pid) if pid is not None else None
        if start is None:
            return True
        newest = max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)
        return start >= newest

    async def settle(self, name: str, timeout: float) -> None:
        files = self.files(name)
        await asyncio.to_thread(settle, files.pid_file, files.data_dir, timeout)

    async def running_with(self, name: str) -> RunningMember | None:
        pid = self.pid(name)
        if pid is None:
            return None
        argv = command_line(pid)
        settings = dict(
            arg[2:].split("=", 1) for arg in argv[1:] if arg.startswith("--") and "=" in arg
        )
        return RunningMember(
            pid, settings, argv[0] if argv else "", argv=tuple(argv), env=etcd_environ(pid)
        )

    async def down_reason(self, name: str) -> str | None:
        files = self.files(name)
        if self.pid(name) is not None:
            return None
        if read_pid(files.pid_file) is None:  # stopped on purpose: stop removes the pid file
            return f"member {name} is not running; start it with `etcdforge up`"
        reason = log_message(log_tail(files.log_file, 1)) or "no log output"
        return f"member {name} exited during start-up: {reason}; see {files.log_file}"

    async def log_tail(self, name: str, lines: int = 5) -> str:
        return log_tail(self.files(name).log_file, lines)

    def log_hint(self, name: str) -> str:
        return f"see {self.files(name).log_file}"
