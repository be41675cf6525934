"""Where backups go: a directory on the admin machine, or one on another host over SSH.

Both take the snapshot the same way: it is streamed to a staging file, synced and verified on
this machine, and only then stored. A local directory stages inside itself, so storing is one
rename. An SSH destination (`ssh://user@host[:port]/path`) stages under the state dir and
uploads: the sidecars first, then the snapshot, each to a temp file beside its final name whose
sha256 is checked on arrival before it is renamed in (`Host.write_file`), so the host never holds
half a backup under a backup's name. Retention lists and deletes on the destination itself.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import urlsplit

from etcdforge import backups
from etcdforge.backups import META_SUFFIX, SHA_SUFFIX, BackupError, BackupMeta
from etcdforge.errors import HostError
from etcdforge.fsutil import PRIVATE_FILE, TEMP_TAIL, alive, ensure_dir
from etcdforge.hosts import Host, SSHHost, SSHTarget, last_line
from etcdforge.snapshot import SnapshotTools

SSH_SCHEME = "ssh://"
UPLOAD_TIMEOUT = 3600.0


class Destination(Protocol):
    label: str

    def staging(self, cluster: str) -> Path:
        """Where the snapshot is streamed to first (a stale one is removed)."""
        ...

    def free_bytes(self) -> int: ...

    def store(self, staged: Path, meta: BackupMeta) -> str:
        """Move the verified, synced snapshot and its sidecars in; returns where it is now."""
        ...

    def entries(self, cluster: str) -> list[BackupMeta]: ...

    def remove(self, meta: BackupMeta) -> None: ...

    def check(self, tools: SnapshotTools, meta: BackupMeta) -> None:
        """Raise BackupError unless the backup is whole (and, where it can be run, readable
        by etcd)."""
        ...

    def location(self, meta: BackupMeta) -> str: ...

    def close(self) -> None: ...


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _clear_staging(directory: Path, cluster: str) -> Path:
    """One staging name per cluster; what an interrupted backup left (etcdctl's own `.part`
    included) is removed first: the cluster's lock proves nobody else is writing it."""
    staged = directory / f".{cluster}.backup-staging"
    for leftover in directory.glob(f"{staged.name}*"):
        leftover.unlink(missing_ok=True)
    _clear_interrupted_stores(directory, cluster)
    return staged


def _clear_interrupted_stores(directory: Path, cluster: str) -> None:
    """A store or a retention removal cut short leaves sidecars without their snapshot, or a
    sidecar's temp file: never a backup, so removed (the sidecars go in before the snapshot's
    rename, and out after its removal). Only this cluster's: the lock covers no other."""
    ours = backups.backup_name_pattern(cluster)
    for path in directory.glob(f".{glob.escape(cluster)}-*"):
        tail = TEMP_TAIL.search(path.name)
        snapshot = path.name[1 : tail.start()] if tail else ""
        for suffix in (META_SUFFIX, SHA_SUFFIX):
            snapshot = snapshot.removesuffix(suffix)
        if tail and ours.fullmatch(snapshot) and not alive(int(tail.group(1))):
            path.unlink(missing_ok=True)
    for suffix in (META_SUFFIX, SHA_SUFFIX):
        for sidecar in directory.glob(f"{glob.escape(cluster)}-*{suffix}"):
            snapshot = sidecar.name.removesuffix(suffix)
            if ours.fullmatch(snapshot) and not (directory / snapshot).exists():
                sidecar.unlink(missing_ok=True)


class LocalDestination:
    """A directory on this machine (created 0700)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.label = str(directory)

    def staging(self, cluster: str) -> Path:
        ensure_dir(self.directory)
        return _clear_staging(self.directory, cluster)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.directory).free

    def store(self, staged: Path, meta: BackupMeta) -> str:
        backups.write_sidecars(self.directory, meta)
        final = self.directory / meta.file
        os.chmod(staged, PRIVATE_FILE)
        os.replace(staged, final)
        _fsync_dir(self.directory)
        return str(final)

    def entries(self, cluster: str) -> list[BackupMeta]:
        return backups.list_local(self.directory, cluster)

    def remove(self, meta: BackupMeta) -> None:
        for name in backups.sidecar_names(meta.file):
            (self.directory / name).unlink(missing_ok=True)

    def check(self, tools: SnapshotTools, meta: BackupMeta) -> None:
        backups.verify_local(tools, self.directory / meta.file)

    def location(self, meta: BackupMeta) -> str:
        return str(self.directory / meta.file)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SSHLocation:
    user: str
    host: str
    port: int
    path: PurePosixPath

    @property
    def url(self) -> str:
        port = f":{self.port}" if self.port != 22 else ""
        return f"{SSH_SCHEME}{self.user}@{self.host}{port}{self.path}"


def parse_ssh_url(text: str) -> SSHLocation:
    """`ssh://user@host[:port]/absolute/path`; one line naming the mistake otherwise."""
    parts = urlsplit(text)
    try:
        port = parts.port or 22
    except ValueError:
        port = -1
    if (
        parts.scheme != "ssh"
        or not parts.hostname
        or not parts.username
        or not parts.path.startswith("/")
        or port < 1
        or parts.query
        or parts.fragment
    ):
        raise BackupError(
            f"backup destination {text!r}: use ssh://user@host[:port]/absolute/path or a "
            "local directory"
        )
    return SSHLocation(parts.username, parts.hostname, port, PurePosixPath(parts.path))


_LIST_SCRIPT = r"""
for f in "$1"/*.db.json; do
  [ -f "$f" ] && [ -f "${f%.json}" ] || continue
  printf '\n==> %s\n' "$f"; cat -- "$f"
done
"""


class SSHDestination:
    """A directory on another host; logged in once, as the URL's user, host key checked."""

    def __init__(
        self, location: SSHLocation, staging_dir: Path, host: Host, runner: asyncio.Runner
    ) -> None:
        self.where = location
        self.label = location.url
        self.staging_dir = staging_dir
        self.host = host
        self.runner = runner

    @classmethod
    def connect(
        cls,
        location: SSHLocation,
        staging_dir: Path,
        identity_file: Path | None,
        known_hosts: Path | None,
    ) -> SSHDestination:
        target = SSHTarget(
            label=f"backup host {location.host}",
            host=location.host,
            port=location.port,
            user=location.user,
            identity_file=identity_file.expanduser() if identity_file else None,
            known_hosts=known_hosts.expanduser() if known_hosts else None,
        )
        runner = asyncio.Runner()
        try:
            host = runner.run(SSHHost.connect(target))
        except BaseException:
            runner.close()
            raise
        return cls(location, staging_dir, host, runner)

    def _run(self, argv: list[str], timeout: float = 120.0) -> str:
        result = self.runner.run(self.host.run(argv, check=False, timeout=timeout))
        if result.code != 0:
            reason = last_line(result.err) or f"exit {result.code}"
            raise HostError(f"{self.label}: {reason}")
        return result.out

    def staging(self, cluster: str) -> Path:
        ensure_dir(self.staging_dir)
        self._run(["mkdir", "-p", "-m", "700", "--", str(self.where.path)])
        return _clear_staging(self.staging_dir, cluster)

    def free_bytes(self) -> int:
        local = shutil.disk_usage(self.staging_dir).free
        out = self._run(["df", "-Pk", "--", str(self.where.path)])
        try:
            remote = int(out.splitlines()[1].split()[3]) * 1024
        except (IndexError, ValueError):
            raise HostError(
                f"{self.label}: cannot read the free space (df printed {out!r})"
            ) from None
        return min(local, remote)

    def store(self, staged: Path, meta: BackupMeta) -> str:
        directory = self.where.path
        owner = self.where.user
        snapshot_name, meta_name, sha_name = backups.sidecar_names(meta.file)
        sidecars = [
            (meta_name, meta.to_json()),
            (sha_name, backups.sha256_line(meta.sha256, meta.file)),
        ]
        for name, data in sidecars:
            self.runner.run(self.host.write_file(directory / name, data, PRIVATE_FILE, owner))
        upload = self.host.write_file(
            directory / snapshot_name, staged.read_bytes(), PRIVATE_FILE, owner
        )
        self.runner.run(asyncio.wait_for(upload, UPLOAD_TIMEOUT))
        staged.unlink(missing_ok=True)
        return self.location(meta)

    def entries(self, cluster: str) -> list[BackupMeta]:
        out = self._run(["sh", "-c", _LIST_SCRIPT, "sh", str(self.where.path)])
        found = []
        for chunk in out.split("\n==> ")[1:]:
            where, _, text = chunk.partition("\n")
            try:
                meta = BackupMeta.from_json(text.encode(), f"{self.label}: {where}")
            except BackupError:
                continue
            if meta.cluster == cluster:
                found.append(meta)
        return sorted(found, key=lambda m: (m.time, m.revision))

    def check(self, tools: SnapshotTools, meta: BackupMeta) -> None:
        """Size and sha256 on the host itself: nothing is downloaded."""
        path = str(self.where.path / meta.file)
        out = self._run(["sh", "-c", 'stat -c %s -- "$1" && sha256sum -- "$1"', "sh", path], 600)
        lines = out.split()
        size, digest = (lines[0], lines[1]) if len(lines) >= 2 else ("", "")
        if size != str(meta.size) or digest != meta.sha256:
            raise BackupError(
                f"{self.location(meta)}: size or sha256 differs from its metadata: corrupt or "
                "truncated; use another backup"
            )

    def location(self, meta: BackupMeta) -> str:
        return f"{self.where.url.rstrip('/')}/{meta.file}"

    def remove(self, meta: BackupMeta) -> None:
        paths = [str(self.where.path / n) for n in backups.sidecar_names(meta.file)]
        self._run(["rm", "-f", "--", *paths])

    def close(self) -> None:
        try:
            self.runner.run(self.host.close())
        finally:
            self.runner.close()


def open_destination(
    dest: str, staging_dir: Path, identity_file: Path | None, known_hosts: Path | None
) -> Destination:
    if dest.startswith(SSH_SCHEME):
        return SSHDestination.connect(parse_ssh_url(dest), staging_dir, identity_file, known_hosts)
    if "://" in dest:
        raise BackupError(
            f"backup destination {dest!r}: only local directories and ssh:// are supported"
        )
    return LocalDestination(Path(dest).expanduser().absolute())
