"""`etcdforge backup`: a verified snapshot of the live cluster, with metadata, and retention.

The phases, in order:

1. **source**: the follower furthest ahead among those that answer with a leader (the leader is
   spared the extra I/O; a one-member cluster snapshots its only member);
2. **preflight**: room for the database at the destination, before anything is written;
3. **snapshot**: `etcdctl snapshot save` of the cluster's own release, into a staging file that
   is then fsync-ed; its sha256 is computed as the bytes arrive;
4. **verify**: etcd's `snapshot status` (etcdutl; etcdctl on 3.4) of the whole file;
5. **store**: the sha256 sidecar and the metadata, then the snapshot renamed in (uploaded, for an
   ssh:// destination), 0600;
6. **retention**: the spec's `backup` rules applied to this cluster's backups at the destination.

The command holds the cluster's lock, so a backup never races a restore or a defrag.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path

from etcdforge import backups, retention, snapshot
from etcdforge import release as releases
from etcdforge.backups import BackupError, BackupMember, BackupMeta
from etcdforge.binaries import EtcdBinary, parse_version
from etcdforge.client import EndpointStatus, EtcdClient, Member, run
from etcdforge.errors import EtcdClientError
from etcdforge.maintenance import human_size
from etcdforge.ops.backup_dest import Destination, open_destination, sync_file
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.target import Selection, deployed_spec, record_for
from etcdforge.record import ClusterRecord
from etcdforge.spec import BackupSpec, ClusterSpec, load_spec

#: Room left beyond the database itself: etcd's own `.part` file and the sidecars.
SPACE_MARGIN = 16 << 20
STATUS_TIMEOUT = 5.0


@dataclass(frozen=True)
class BackupResult:
    cluster: str
    location: str
    meta: BackupMeta
    removed: tuple[str, ...]
    seconds: float


def cluster_spec(selection: Selection, record: ClusterRecord) -> ClusterSpec:
    """The spec file when given (backup settings may change after deploying), else the record."""
    if selection.file is not None:
        return load_spec(selection.file, allow_even=True)
    return deployed_spec(record)


def snapshot_tools(selection: Selection, record: ClusterRecord) -> snapshot.SnapshotTools:
    """etcdctl/etcdutl of the cluster's release on this machine (snapshot formats change)."""
    spec = deployed_spec(record)
    if not spec.on_hosts:
        return snapshot.find_tools(EtcdBinary(Path(record.binary), parse_version(record.version)))
    base = selection.file.parent if selection.file is not None else Path.cwd()
    release = releases.resolve(spec.etcd, base)
    return snapshot.find_tools(EtcdBinary(releases.admin_tools(release) / "etcd", release.version))


def default_dest(record: ClusterRecord, settings: BackupSpec) -> str:
    return settings.dest or str(record.layout.root / "backups")


def open_dest(record: ClusterRecord, settings: BackupSpec, dest: str | None) -> Destination:
    staging = record.layout.root / "backup-staging"
    chosen = dest or default_dest(record, settings)
    return open_destination(chosen, staging, settings.identity_file, settings.known_hosts)


def pick_source(statuses: list[EndpointStatus]) -> EndpointStatus | None:
    """The voting follower furthest ahead that answers with a leader; the leader only alone.

    A raised alarm does not disqualify a member: a backup before fixing NOSPACE is wise.
    """
    usable = [
        s
        for s in statuses
        if s.version is not None and s.leader not in (None, "0") and not s.is_learner
    ]
    followers = [s for s in usable if not s.is_leader]
    pool = followers or usable
    return max(pool, key=lambda s: s.raft_applied_index or s.raft_index or 0, default=None)


async def _cluster_view(record: ClusterRecord) -> tuple[list[EndpointStatus], list[Member]]:
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=STATUS_TIMEOUT) as client:
        statuses = await client.statuses()
        try:
            members = await client.member_list()
        except EtcdClientError:
            members = []
        return statuses, members


def _source(record: ClusterRecord) -> tuple[EndpointStatus, list[Member]]:
    statuses, members = run(_cluster_view(record))
    source = pick_source(statuses)
    if source is None:
        errors = "; ".join(s.error or "no leader" for s in statuses)
        raise BackupError(
            f"cluster {record.name}: no member answers with a leader to take a snapshot from "
            f"({errors}); if quorum is lost for good, see `etcdforge recover`"
        )
    return source, members


def _check_space(destination: Destination, source: EndpointStatus) -> None:
    need = (source.db_size or 0) + SPACE_MARGIN
    free = destination.free_bytes()
    if free < need:
        raise BackupError(
            f"{destination.label}: only {human_size(free)} free, the snapshot needs about "
            f"{human_size(need)}; free some space or pass --dest elsewhere"
        )


def _meta(
    record: ClusterRecord,
    source: EndpointStatus,
    members: list[Member],
    info: snapshot.SnapshotInfo,
    digest: str,
    size: int,
    taken: dt.datetime,
) -> BackupMeta:
    return BackupMeta(
        file=backups.backup_name(record.name, taken, info.revision),
        cluster=record.name,
        cluster_id=source.cluster_id or "",
        members=tuple(BackupMember(m.name, m.id, m.peer_urls, m.client_urls) for m in members),
        revision=info.revision,
        etcd_version=source.version or record.version,
        taken_at=taken.isoformat(timespec="seconds"),
        size=size,
        sha256=digest,
        source=record.name_of(source.endpoint),
        total_keys=info.total_keys,
    )


def backup(
    selection: Selection, dest: str | None = None, progress: Progress = SILENT
) -> BackupResult:
    """Take one verified backup and apply retention; see the module docstring."""
    started = time.monotonic()
    record = record_for(selection)
    settings = cluster_spec(selection, record).backup
    tools = snapshot_tools(selection, record)
    destination = open_dest(record, settings, dest)
    try:
        progress.phase("source")
        source, members = _source(record)
        name = record.name_of(source.endpoint)
        progress.step(name, f"snapshot source: {name} (revision {source.revision})")
        progress.phase("preflight")
        staged = destination.staging(record.name)
        _check_space(destination, source)
        progress.phase("snapshot")
        progress.step(name, f"etcdctl snapshot save into {staged.parent}")
        taken = dt.datetime.now(dt.UTC).replace(microsecond=0)
        digest = backups.save_hashed(tools, source.endpoint, record.admin_tls, staged)
        sync_file(staged)
        progress.phase("verify")
        progress.step("admin", "snapshot status")
        try:
            info = snapshot.status(tools, staged)
        except snapshot.SnapshotError as exc:
            staged.unlink(missing_ok=True)
            raise BackupError(f"the snapshot of {name} does not verify ({exc}); retry") from None
        meta = _meta(record, source, members, info, digest, staged.stat().st_size, taken)
        progress.phase("store")
        progress.step("admin", f"store {meta.file} in {destination.label}")
        location = destination.store(staged, meta)
        backups.remember_cluster_ids(record.layout.root, [meta.cluster_id])
        progress.phase("retention")
        removed = apply_retention(destination, record.name, meta, settings, progress)
    finally:
        destination.close()
    return BackupResult(record.name, location, meta, removed, time.monotonic() - started)


def apply_retention(
    destination: Destination,
    cluster: str,
    newest: BackupMeta,
    settings: BackupSpec,
    progress: Progress,
) -> tuple[str, ...]:
    """Delete this cluster's backups no rule keeps; the one just taken is always kept."""
    entries = destination.entries(cluster)
    policy = retention.RetentionPolicy(
        settings.keep_last, settings.keep_daily_days, settings.keep_weekly_days
    )
    dated = [retention.Dated(m.file, m.time) for m in entries]
    doomed = set(retention.expired(dated, dt.datetime.now(dt.UTC), policy)) - {newest.file}
    removed = []
    for meta in entries:
        if meta.file in doomed:
            progress.step("admin", f"remove {meta.file} (retention)")
            destination.remove(meta)
            removed.append(meta.file)
    return tuple(removed)


# --- list and verify -------------------------------------------------------------------------


@dataclass(frozen=True)
class Checked:
    location: str
    meta: BackupMeta | None
    error: str | None


def list_backups(selection: Selection, dest: str | None = None) -> tuple[str, list[BackupMeta]]:
    record = record_for(selection)
    settings = cluster_spec(selection, record).backup
    destination = open_dest(record, settings, dest)
    try:
        return destination.label, destination.entries(record.name)
    finally:
        destination.close()


def verify_backups(
    selection: Selection, file: Path | None = None, dest: str | None = None
) -> list[Checked]:
    """One file, or every backup of the cluster at the destination; a local backup is checked
    fully, one on an ssh:// host by its size and sha256 there."""
    record = record_for(selection)
    tools = snapshot_tools(selection, record)
    if file is not None:
        try:
            return [Checked(str(file), backups.verify_local(tools, file), None)]
        except BackupError as exc:
            return [Checked(str(file), None, str(exc))]
    settings = cluster_spec(selection, record).backup
    destination = open_dest(record, settings, dest)
    try:
        entries = destination.entries(record.name)
        if not entries:
            raise BackupError(f"{destination.label}: no backups of cluster {record.name}")
        return [_checked(destination, tools, meta) for meta in entries]
    finally:
        destination.close()


def _checked(destination: Destination, tools: snapshot.SnapshotTools, meta: BackupMeta) -> Checked:
    try:
        destination.check(tools, meta)
    except BackupError as exc:
        return Checked(destination.location(meta), None, str(exc))
    return Checked(destination.location(meta), meta, None)
