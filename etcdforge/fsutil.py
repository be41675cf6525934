"""Local file writes that never leave a half-written or world-readable file behind."""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644
#: The end of a temp file's name: `.PID.XXXXXXXX` (tempfile.mkstemp's 8).
TEMP_TAIL = re.compile(r"\.(\d{1,9})\.[a-z0-9_]{8}$")


def ensure_dir(path: Path, mode: int = PRIVATE_DIR) -> Path:
    """Create `path` (and parents) and force its mode: etcd refuses lax data-dir modes."""
    path.mkdir(parents=True, exist_ok=True, mode=mode)
    os.chmod(path, mode)
    return path


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE) -> bool:
    """Write via a temp file and rename; returns False when the content was already there.

    The temp file is created with the final mode, so a key is never readable by others, and the
    rename means a reader (etcd re-reading its certificate) sees either the old or the new file.
    """
    try:
        if path.read_bytes() == data and (path.stat().st_mode & 0o777) == mode:
            return False
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = write_temp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return True


def write_temp(path: Path, data: bytes, mode: int) -> Path:
    """A synced temp file beside `path` with its final mode, ready to be renamed over it.

    Its name carries our PID (`.NAME.PID.XXXXXXXX`): a command killed between creating it and the
    rename leaves it behind, and the next write of the same file removes it once that PID is gone.
    """
    drop_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def drop_stale_temps(path: Path) -> None:
    """Remove the temp files of `path` that a killed writer left (see `write_temp`)."""
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*"):
        found = TEMP_TAIL.fullmatch(stale.name.removeprefix(prefix[:-1]))
        if found and not alive(int(found.group(1))):
            stale.unlink(missing_ok=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (release tarballs, snapshots)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
