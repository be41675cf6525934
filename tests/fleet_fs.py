"""Files, mounts and locks on the admin side of the test fleet.

Why a module of its own: the fleet writes into trees it does not trust (a host's root, where a
symlink could point anywhere on this machine), deletes trees that may still have something
mounted inside (an interrupted debootstrap leaves /proc, /sys, /dev), and serialises whole
processes with flocks that the kernel drops when the holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fleet_proc import FleetError, run_command

log = logging.getLogger("etcdforge.tests.fleet")


@contextlib.contextmanager
def flock_path(path: Path, timeout: float, what: str) -> Iterator[int]:
    """Hold an exclusive flock on path; the kernel drops it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        flock_fd(fd, timeout, what)
        yield fd
    finally:
        os.close(fd)


def flock_fd(fd: int, timeout: float, what: str) -> None:
    """Take an exclusive flock on fd, polling for up to timeout seconds; FleetError if not."""
    deadline = time.monotonic() + timeout
    for attempt in range(int(timeout / 0.5) + 2):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == 0:
                log.warning(
                    "waiting up to %.0f s for the %s (another process holds it)", timeout, what
                )
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    raise FleetError(
        f"gave up after {timeout:.0f} s waiting for the {what}; another process holds it"
    )


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts() -> list[str]:
    """Every mount point of this process's mount namespace, octal escapes decoded."""
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [_unescape_mount(line.split()[1]) for line in lines if len(line.split()) > 1]


def _mounts_under(path: Path) -> list[str]:
    top = os.path.realpath(path)
    found = [m for m in mounts() if m == top or m.startswith(top + "/")]
    return sorted(set(found), key=len, reverse=True)


def umount(mountpoint: str, attempts: int = 10) -> None:
    """Unmount, retrying while busy (a container's last process may still be exiting).

    Falls back to a lazy unmount so teardown never hangs.
    """
    for _ in range(attempts):
        if mountpoint not in mounts():
            return
        if run_command(["umount", mountpoint], check=False, timeout=30).returncode == 0:
            return
        time.sleep(0.2)
    run_command(["umount", "--lazy", mountpoint], check=False, timeout=30)


def safe_rmtree(path: Path) -> None:
    """rmtree that first unmounts everything below path and refuses if anything stays mounted.

    An interrupted debootstrap can leave /proc, /sys or a bind-mounted /dev inside its target;
    a plain rmtree would walk into them.
    """
    if not os.path.lexists(path):
        return
    for mountpoint in _mounts_under(path):
        umount(mountpoint)
    if left := _mounts_under(path):
        raise FleetError(f"refusing to delete {path}: still mounted: {', '.join(left)}")
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def write_file(
    root: Path, rel: str, content: str, mode: int = 0o644, uid: int = 0, gid: int = 0
) -> None:
    """Write root/rel without following symlinks: a symlink in the image must never make us
    write outside the host's tree (e.g. /etc/resolv.conf -> /run/... on this machine)."""
    parts = Path(rel).parts
    current = root
    for part in parts[:-1]:
        current = current / part
        st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise FleetError(f"{current} is not a real directory")
    target = current / parts[-1]
    if os.path.lexists(target) and (target.is_symlink() or not target.is_file()):
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, content.encode())
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def mkdir_owned(root: Path, rel: str, mode: int, uid: int, gid: int) -> None:
    """Make root/rel (if missing) with this owner and mode; refuses a symlink."""
    path = root / rel
    if path.is_symlink():
        raise FleetError(f"{path} is a symlink")
    path.mkdir(mode=mode, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def read_passwd(root: Path) -> dict[str, tuple[int, int, str]]:
    """uid, gid and home of every user in root/etc/passwd, by name."""
    users = {}
    for line in (root / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if len(f) >= 7:
            users[f[0]] = (int(f[2]), int(f[3]), f[5])
    return users
