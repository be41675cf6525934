"""A backup on disk: the snapshot, its sha256 sidecar and its metadata, and how to check them.

Each backup is three files side by side, named after the cluster, the time and the revision:

```
dev-20300102T030405Z-r1234.db          the snapshot (`etcdctl snapshot save`), 0600
dev-20300102T030405Z-r1234.db.sha256   `sha256sum` format, so `sha256sum -c` checks it too
dev-20300102T030405Z-r1234.db.json     cluster name and ID, members, revision, etcd version,
                                       time, size, sha256, the member it came from
```

The sidecars are written before the snapshot takes its name, so a snapshot with a name always
has them; a listing ignores sidecars whose snapshot never arrived. Verifying a backup checks the
size, the sha256 (against both sidecars) and then etcd's own `snapshot status`, whose revision
must be the one recorded.

The state dir also remembers every cluster ID the cluster has had (a restore gives it a new one),
so a snapshot of another cluster that happens to share the name is still recognised.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from etcdforge import snapshot
from etcdforge.errors import EtcdforgeError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, file_sha256
from etcdforge.tls import TLSFiles

FORMAT = 1
SNAPSHOT_SUFFIX = ".db"
META_SUFFIX = ".json"
SHA_SUFFIX = ".sha256"
TIME_FORMAT = "%Y%m%dT%H%M%SZ"
LINEAGE_FILE = "cluster-ids"
TAIL_POLL = 0.005
TAIL_BLOCK = 1 << 20


class BackupError(EtcdforgeError):
    """A backup could not be taken, stored, found or verified."""


@dataclass(frozen=True)
class BackupMember:
    name: str
    id: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...]


@dataclass(frozen=True)
class BackupMeta:
    """What a backup holds and where it came from; written as `<snapshot>.json`."""

    file: str
    cluster: str
    cluster_id: str
    members: tuple[BackupMember, ...]
    revision: int
    etcd_version: str
    taken_at: str  # ISO 8601, UTC
    size: int
    sha256: str
    source: str  # the member the snapshot streamed from
    total_keys: int

    @property
    def time(self) -> dt.datetime:
        return dt.datetime.fromisoformat(self.taken_at)

    def to_json(self) -> bytes:
        payload = {"format": FORMAT, **asdict(self)}
        return (json.dumps(payload, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> BackupMeta:
        try:
            payload = json.loads(data)
            if payload.pop("format", None) != FORMAT:
                raise ValueError("unknown format")
            members = tuple(
                BackupMember(m["name"], m["id"], tuple(m["peer_urls"]), tuple(m["client_urls"]))
                for m in payload.pop("members")
            )
            meta = cls(members=members, **payload)
            meta.time  # noqa: B018 -- a malformed time fails here, with the file's name
            return meta
        except (ValueError, KeyError, TypeError) as exc:
            raise BackupError(
                f"{where}: not etcdforge backup metadata ({exc}); it is ignored, remove it"
            ) from None


def backup_name(cluster: str, taken: dt.datetime, revision: int) -> str:
    return f"{cluster}-{taken.astimezone(dt.UTC).strftime(TIME_FORMAT)}-r{revision}.db"


def backup_name_pattern(cluster: str) -> re.Pattern[str]:
    """The names `backup_name` gives this cluster's snapshots (and no other cluster's, even
    one whose name starts with this one's)."""
    return re.compile(rf"{re.escape(cluster)}-\d{{8}}T\d{{6}}Z-r\d+\.db")


def meta_path(snapshot_file: Path) -> Path:
    return snapshot_file.with_name(snapshot_file.name + META_SUFFIX)


def sha_path(snapshot_file: Path) -> Path:
    return snapshot_file.with_name(snapshot_file.name + SHA_SUFFIX)


def sha256_line(digest: str, name: str) -> bytes:
    """`sha256sum`'s own format: `sha256sum -c NAME.sha256` checks the file by hand."""
    return f"{digest}  {name}\n".encode()


def parse_sha256_line(text: str, where: str) -> str:
    digest = text.strip().split(maxsplit=1)[0] if text.strip() else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise BackupError(f"{where}: not a sha256 line; the backup cannot be trusted")
    return digest


def read_meta(snapshot_file: Path) -> BackupMeta:
    path = meta_path(snapshot_file)
    try:
        return BackupMeta.from_json(path.read_bytes(), str(path))
    except FileNotFoundError:
        raise BackupError(
            f"{snapshot_file}: no metadata beside it ({path.name}); it was not taken by "
            "`etcdforge backup`"
        ) from None


def list_local(directory: Path, cluster: str | None = None) -> list[BackupMeta]:
    """Backups in `directory` whose snapshot exists, oldest first; another cluster's are left
    out when `cluster` is given."""
    if not directory.is_dir():
        return []
    found = []
    for path in directory.glob(f"*{SNAPSHOT_SUFFIX}{META_SUFFIX}"):
        snapshot_file = path.with_name(path.name.removesuffix(META_SUFFIX))
        if not snapshot_file.is_file():
            continue
        try:
            meta = BackupMeta.from_json(path.read_bytes(), str(path))
        except (BackupError, OSError):
            continue
        if cluster is None or meta.cluster == cluster:
            found.append(meta)
    return sorted(found, key=lambda m: (m.time, m.revision))


def save_hashed(tools: snapshot.SnapshotTools, endpoint: str, tls: TLSFiles, staged: Path) -> str:
    """`snapshot.save` into `staged`, hashing the file as etcdctl writes it, so verifying
    afterwards costs only `snapshot status`; returns the sha256 of the saved file."""
    finished = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        tail = pool.submit(_tail_sha256, snapshot.streaming_path(staged), finished)
        try:
            snapshot.save(tools, endpoint, tls, staged)
        finally:
            finished.set()
        digest, hashed = tail.result()
    if hashed != staged.stat().st_size:  # renamed before the tail could open it: hash it whole
        return file_sha256(staged)
    return digest


def _tail_sha256(path: Path, finished: threading.Event) -> tuple[str, int]:
    """sha256 and length of a file another process appends to, until `finished` is set."""
    digest = hashlib.sha256()
    handle = None
    while handle is None and not finished.is_set():
        try:
            handle = open(path, "rb")  # noqa: SIM115 -- kept open across the renames
        except FileNotFoundError:
            time.sleep(TAIL_POLL)
    if handle is None:
        return "", -1
    hashed = 0
    with handle:
        while True:
            block = handle.read(TAIL_BLOCK)
            if block:
                digest.update(block)
                hashed += len(block)
            elif finished.is_set():
                rest = handle.read()  # written between the last read and the end
                if not rest:
                    return digest.hexdigest(), hashed
                digest.update(rest)
                hashed += len(rest)
            else:
                time.sleep(TAIL_POLL)


def hash_and_status(
    tools: snapshot.SnapshotTools, path: Path
) -> tuple[str, snapshot.SnapshotInfo | snapshot.SnapshotError]:
    """sha256 and `snapshot status` of one file at once (both read it whole, from the cache);
    a file etcd cannot read gives its error in place of the status, so the caller can judge
    the sha256 first."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        status = pool.submit(_status_or_error, tools, path)
        digest = file_sha256(path)
        return digest, status.result()


def _status_or_error(
    tools: snapshot.SnapshotTools, path: Path
) -> snapshot.SnapshotInfo | snapshot.SnapshotError:
    try:
        return snapshot.status(tools, path)
    except snapshot.SnapshotError as exc:
        return exc


def verify_local(tools: snapshot.SnapshotTools, snapshot_file: Path) -> BackupMeta:
    """The backup is whole and etcd can read it: size, both sha256s, `snapshot status`."""
    if not snapshot_file.is_file():
        raise BackupError(f"{snapshot_file}: no such backup")
    meta = read_meta(snapshot_file)
    where = str(snapshot_file)
    size = snapshot_file.stat().st_size
    if size != meta.size:
        raise BackupError(
            f"{where}: {size} bytes but the metadata says {meta.size}: truncated or replaced; "
            "use another backup"
        )
    try:
        recorded = parse_sha256_line(sha_path(snapshot_file).read_text(), where + SHA_SUFFIX)
    except FileNotFoundError:
        raise BackupError(
            f"{where}: no {SHA_SUFFIX} sidecar; the backup cannot be trusted"
        ) from None
    digest, info = hash_and_status(tools, snapshot_file)
    if digest != recorded or digest != meta.sha256:
        raise BackupError(
            f"{where}: sha256 {digest[:16]}… does not match its sidecar ({recorded[:16]}…): "
            "the file is corrupt; use another backup"
        )
    if isinstance(info, snapshot.SnapshotError):
        raise BackupError(f"{where}: etcd cannot read it ({info}); use another backup")
    if info.revision != meta.revision:
        raise BackupError(
            f"{where}: etcd reads revision {info.revision} but the metadata says "
            f"{meta.revision}; use another backup"
        )
    return meta


def write_sidecars(directory: Path, meta: BackupMeta) -> None:
    """Metadata and sha256 first (atomically, 0600): the snapshot is renamed in after them."""
    target = directory / meta.file
    atomic_write(meta_path(target), meta.to_json(), PRIVATE_FILE)
    atomic_write(sha_path(target), sha256_line(meta.sha256, meta.file), PRIVATE_FILE)


def sidecar_names(file: str) -> tuple[str, str, str]:
    """The three files of one backup: snapshot, metadata, sha256."""
    return file, file + META_SUFFIX, file + SHA_SUFFIX


# --- which clusters a snapshot may come from -------------------------------------------------


def known_cluster_ids(state_dir: Path) -> set[str]:
    try:
        text = (state_dir / LINEAGE_FILE).read_text()
    except FileNotFoundError:
        return set()
    return {line.strip() for line in text.splitlines() if line.strip()}


def remember_cluster_ids(state_dir: Path, ids: Sequence[str]) -> None:
    """Add IDs this cluster has had (backups taken, restores done), keeping the older ones."""
    known = known_cluster_ids(state_dir)
    new = [i for i in dict.fromkeys(ids) if i and i not in known]
    if not new:
        return
    lines = sorted(known) + new
    atomic_write(state_dir / LINEAGE_FILE, "".join(f"{i}\n" for i in lines).encode())


def metadata_summary(meta: BackupMeta) -> dict[str, Any]:
    """The fields `backup list -o json` prints for one backup."""
    return {
        "file": meta.file,
        "taken_at": meta.taken_at,
        "revision": meta.revision,
        "size": meta.size,
        "etcd_version": meta.etcd_version,
        "source": meta.source,
        "cluster": meta.cluster,
        "cluster_id": meta.cluster_id,
        "sha256": meta.sha256,
    }
