"""`etcdforge restore`: the whole cluster back to one backup.

Everything that can refuse does so before the first change, with one line:

- the file must be a backup whose sidecars agree with it (size, sha256) and that etcd can read
  (`snapshot status`); a file without etcdforge's metadata, or of another cluster (another name,
  or a cluster ID this cluster never had), only with `--other-cluster`;
- its etcd release must not be newer (by minor) than the cluster's;
- every data dir's filesystem (every host's, for hosts) must have room for the restored copy,
  since the old data is kept aside until the new cluster is verified.

Then `ops.rebuild` does the rest: new token, stop, restore, start, verify, finish. Revisions are
bumped by a billion and older ones marked compacted where the restore tool can
(`--bump-revision`/`--mark-compacted`, etcd 3.5.10+/3.4.27+), so no client ever sees a revision go
backwards and every watch from before the restore ends with "compacted" and starts again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from etcdforge import backups, snapshot
from etcdforge.backups import BackupError, BackupMeta
from etcdforge.binaries import format_version, parse_version
from etcdforge.fsutil import file_sha256
from etcdforge.ops import rebuild
from etcdforge.ops.backup import snapshot_tools
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.target import Selection, deployed_spec, record_to_change
from etcdforge.record import ClusterRecord, new_token


@dataclass(frozen=True)
class Restored:
    """A restore or a recovery, done (or, with dry_run, only decided)."""

    cluster: str
    state: rebuild.RebuildState
    result: rebuild.RebuildResult | None
    warnings: tuple[str, ...]


def check_identity(record: ClusterRecord, meta: BackupMeta, live_id: str, where: str) -> None:
    """A backup of this cluster: its name, and an ID this cluster has had (when any is known)."""
    if meta.cluster != record.name:
        raise BackupError(
            f"{where}: a backup of cluster {meta.cluster}, not {record.name}; pass "
            "--other-cluster to restore it anyway (nothing was changed)"
        )
    known = backups.known_cluster_ids(record.layout.root) | ({live_id} if live_id else set())
    if known and meta.cluster_id not in known:
        raise BackupError(
            f"{where}: a backup of another cluster named {meta.cluster} (cluster ID "
            f"{meta.cluster_id}; this one has had {', '.join(sorted(known))}); pass "
            "--other-cluster to restore it anyway (nothing was changed)"
        )


def check_release(record: ClusterRecord, version: str, where: str) -> None:
    found, running = parse_version(version), parse_version(record.version)
    if found[:2] > running[:2]:
        raise BackupError(
            f"{where}: taken with etcd {version}, newer than the cluster's "
            f"{format_version(running)}; etcd cannot load a newer minor's data: upgrade first"
        )


def read_source(
    tools: snapshot.SnapshotTools, file: Path, other_cluster: bool
) -> tuple[BackupMeta | None, snapshot.SnapshotInfo, str]:
    """The backup verified (or, with `other_cluster` and no metadata, etcd's status alone)."""
    where = str(file)
    if not file.is_file():
        raise BackupError(f"{where}: no such file")
    try:
        meta = backups.read_meta(file)
    except BackupError:
        if not other_cluster:
            raise BackupError(
                f"{where}: no etcdforge metadata beside it ({file.name}.json), so its cluster "
                "is unknown; pass --other-cluster to restore it anyway (nothing was changed)"
            ) from None
        meta = None
    if meta is not None:
        backups.verify_local(tools, file)
        recorded = snapshot.SnapshotInfo(0, meta.revision, meta.total_keys, meta.size)
        return meta, recorded, meta.sha256
    digest, found = backups.hash_and_status(tools, file)
    if isinstance(found, snapshot.SnapshotError):
        raise BackupError(f"{where}: etcd cannot read it ({found}); nothing was changed")
    return None, found, digest


def bump_for(tools: snapshot.SnapshotTools, bump: bool, warnings: list[str]) -> int:
    """A billion where the tool can (the cluster's release, as on every member), else 0."""
    if not bump:
        return 0
    if snapshot.restore_features(tools).can_bump:
        return snapshot.DEFAULT_BUMP
    warnings.append(
        f"etcd {format_version(tools.version)}'s restore has no --bump-revision/--mark-compacted "
        "(3.5.10+/3.4.27+): revisions restart from the snapshot's, so restart every client "
        "that watches (kube-apiserver) after the restore"
    )
    return 0


def check_space(selection: Selection, record: ClusterRecord, state: rebuild.RebuildState) -> None:
    size = Path(state.snapshot).stat().st_size
    if deployed_spec(record).on_hosts:
        rebuild.check_host_space(selection, state, size)
    else:
        rebuild.check_local_space(record, size)


def restore_cluster(
    selection: Selection,
    file: Path,
    other_cluster: bool = False,
    bump: bool = True,
    dry_run: bool = False,
    progress: Progress = SILENT,
) -> Restored:
    """Check the backup, then rebuild every member from it; a rerun resumes a killed restore."""
    record = record_to_change(selection, "restore")
    rebuild.require_spec_file(selection, record)
    work = rebuild.Work(record)
    source = str(file.absolute())
    warnings: list[str] = []
    state = rebuild.in_progress(work, "restore", source)
    if state is None:
        progress.phase("preflight")
        progress.step("admin", f"verify {file.name}")
        state = _decide(selection, record, file.absolute(), other_cluster, bump, warnings)
        check_space(selection, record, state)
        if dry_run:
            return Restored(record.name, state, None, tuple(warnings))
        work.write(state)
    elif dry_run:
        return Restored(record.name, state, None, tuple(warnings))
    result = rebuild.rebuild(selection, record, state, progress)
    return Restored(record.name, state, result, tuple(warnings))


def _decide(
    selection: Selection,
    record: ClusterRecord,
    file: Path,
    other_cluster: bool,
    bump: bool,
    warnings: list[str],
) -> rebuild.RebuildState:
    tools = snapshot_tools(selection, record)
    meta, info, digest = read_source(tools, file, other_cluster)
    live_id = rebuild.live_cluster_id(record)
    if meta is not None:
        check_release(record, meta.etcd_version, str(file))
        if not other_cluster:
            check_identity(record, meta, live_id, str(file))
    return rebuild.RebuildState(
        kind="restore",
        source=str(file),
        snapshot=str(file),
        sha256=digest or file_sha256(file),
        revision=info.revision,
        old_token=record.token,
        new_token=new_token(record.name),
        old_cluster_id=live_id,
        bump_by=bump_for(tools, bump, warnings),
        skip_hash_check=False,
    )
