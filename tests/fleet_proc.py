"""Processes of the test fleet: commands with bounded runtimes, and the containers' processes.

Why a module of its own: every other fleet module runs commands (``ip``, ``mount``,
``debootstrap``, ``nsenter``, ``ssh``) and must never leave one running past its timeout, and
teardown must only ever signal processes the fleet started, told apart from reused PIDs by their
start time. Also the cgroups each container's systemd gets.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("etcdforge.tests.fleet")

# PATH for commands run in a host or its image: this process's own PATH may point elsewhere.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Every host's cgroup lives under <hierarchy>/etcdforge-fleet/<runid>/<host>.
CGROUP_DIR = "etcdforge-fleet"


class FleetError(RuntimeError):
    """Something about the fleet itself failed; the message says what and where to look."""


class CommandError(subprocess.CalledProcessError):
    """A command exited non-zero; unlike CalledProcessError, str() shows its output."""

    def __str__(self) -> str:
        def tail(text: str | bytes | None) -> str:
            if not text:
                return ""
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            return text.strip()[-2000:]

        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(map(str, self.cmd))
        parts = [f"command exited {self.returncode}: {cmd}"]
        if out := tail(self.stdout):
            parts.append(f"stdout: {out}")
        if err := tail(self.stderr):
            parts.append(f"stderr: {err}")
        return "\n".join(parts)


def run_command(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run in a process group of its own, so a timeout also kills grandchildren.

    ``nsenter --pid`` and ``ssh`` fork; killing only the direct child would leave the command
    running inside the host and the pipes open.
    """
    args = [str(a) for a in argv]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a daemon outside our group holds the pipes
            out, err = "", ""
        raise subprocess.TimeoutExpired(args, timeout, out, err) from None
    except BaseException:  # Ctrl-C, pytest-timeout: never leave the command running
        _kill_group(proc)
        raise
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, args, out, err)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group that run_command created for proc (ours alone), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of pid, to tell it apart from a reused PID."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has done all it will ever do
    return int(fields[19])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("PPid:"):
                    if int(line.split()[1]) == pid:
                        found.append(int(entry.name))
                    break
    return found


def container_leader(nspawn_pid: int) -> int | None:
    """The container's PID 1 (as seen from here): the child of nspawn that is 1 in its pid ns."""
    for child in _children(nspawn_pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    if len(ids) >= 2 and ids[-1] == "1":
                        return child
    return None


def cgroup_roots() -> list[Path]:
    """Hierarchies in which systemd inside a container needs a cgroup of its own."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():  # pure cgroup v2
        return [base]
    return [p for p in (base / "systemd", base / "unified") if (p / "cgroup.procs").exists()]


def rmdir_cgroup_tree(path: Path) -> bool:
    """Remove an (empty of processes) cgroup subtree bottom-up; True if it is gone."""
    if not path.exists():
        return True
    for dirpath, _dirnames, _files in os.walk(path, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
    return not path.exists()


def kill_orphaned_init(name: str, pid: int, starttime: int) -> list[str]:
    """SIGKILL a container init that outlived its nspawn (only happens after nspawn's SIGKILL).

    It is a process we started (through nspawn); the start time check makes sure a reused PID
    is never hit.
    """
    if proc_starttime(pid) != starttime:
        return []
    log.warning("%s: container init %d outlived systemd-nspawn; SIGKILL", name, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if proc_starttime(pid) != starttime:
            return []
        time.sleep(0.1)
    return [f"{name}: container init {pid} survived SIGKILL"]
