"""`etcdforge recover`: a cluster whose quorum is lost for good, rebuilt to the spec's size.

When a majority of members is gone for good (hosts destroyed, data dirs lost), no member can
make progress and no membership change can be committed. Recovery starts from one database:

- `--from SNAPSHOT`: a backup, checked as `restore` checks it;
- `--from-member NAME`: a surviving member's own database (`member/snap/db`, copied once the
  member is stopped, and restored with `--skip-hash-check`, since a file copied from a data dir
  has no integrity hash appended); it holds everything that member had applied;
- neither: the newest backup at the spec's backup destination that verifies.

`--dry-run` prints the plan: each member's state and revision, the source's revision, and what
will be lost (the writes past the source's revision that some member had applied, or that no
member answered to tell).

**Growing back.** Every member of the spec is restored from that one database, with the member
list of the spec and a new token, and they start together (`ops.rebuild`), which is what etcd's
disaster-recovery guide prescribes. The other way, a one-member cluster grown back member by
member (add as learner, start empty, promote), ends in the same place, member data included,
since each new member copies the same data from the first; it needs one membership change per
member and a start that waits for each learner to catch up, where the restore needs none: every
member starts from identical data at once. Both need every host of the spec reachable, so the
restore is used here; it also leaves membership to the one module that owns it.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from etcdforge import backups, snapshot
from etcdforge.backups import BackupError, BackupMeta
from etcdforge.client import EtcdClient, run
from etcdforge.errors import UnsafeOperationError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, ensure_dir, file_sha256
from etcdforge.host_logins import target_for
from etcdforge.hosts import SSHHost
from etcdforge.ops import rebuild
from etcdforge.ops.backup import cluster_spec, open_dest, snapshot_tools
from etcdforge.ops.backup_dest import LocalDestination
from etcdforge.ops.cluster_restore import (
    Restored,
    bump_for,
    check_identity,
    check_release,
    check_space,
    read_source,
)
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.target import Selection, deployed_spec, record_for, record_to_change
from etcdforge.record import ClusterRecord, new_token
from etcdforge.services.local import LocalRuntime
from etcdforge.services.systemd import SystemdRuntime, unit_name

NEWEST_BACKUP = "the newest backup"


class RecoveryError(UnsafeOperationError):
    """A recovery was refused: quorum is not lost, or no usable database was found."""


@dataclass(frozen=True)
class MemberState:
    name: str
    answers: bool
    revision: int | None
    leader: str | None
    error: str | None


@dataclass(frozen=True)
class RecoveryPlan:
    cluster: str
    members: tuple[MemberState, ...]
    source: str
    source_revision: int | None  # None: read once the member is stopped and its file copied
    newest_seen: int | None

    @property
    def loss(self) -> str:
        if self.source_revision is None:
            return (
                "whatever the other members applied past the source member's last write "
                "(it does not answer: its revision is read from its file)"
            )
        if self.newest_seen is None:
            return (
                f"every write after revision {self.source_revision}; no member answers to tell "
                "how many there were"
            )
        lost = self.newest_seen - self.source_revision
        if lost <= 0:
            return "nothing the answering members hold (they are not past the source)"
        return (
            f"{lost} revision(s): {self.source_revision + 1} to {self.newest_seen}, which "
            "answering members had applied"
        )


async def _survey(record: ClusterRecord) -> list[MemberState]:
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=3.0) as client:
        statuses = await client.statuses()
    return [
        MemberState(
            record.name_of(s.endpoint),
            s.version is not None,
            s.revision if s.version is not None else None,
            s.leader if s.leader not in (None, "0") else None,
            s.error,
        )
        for s in statuses
    ]


def require_lost_quorum(record: ClusterRecord, members: list[MemberState]) -> None:
    """Refuse while a majority follows one leader: then the cluster can still heal itself."""
    leaders = [m.leader for m in members if m.answers and m.leader]
    top = max((leaders.count(leader) for leader in set(leaders)), default=0)
    if top > len(record.members) // 2:
        raise RecoveryError(
            f"cluster {record.name} has quorum ({top} of {len(record.members)} members follow "
            "one leader): recovery would throw away data for nothing; replace the failed "
            "members, or use `etcdforge restore` to go back to a backup"
        )


def newest_backup(selection: Selection, record: ClusterRecord) -> Path:
    """The newest backup at the spec's (local) destination that verifies."""
    settings = cluster_spec(selection, record).backup
    destination = open_dest(record, settings, None)
    tools = snapshot_tools(selection, record)
    try:
        if not isinstance(destination, LocalDestination):
            raise RecoveryError(
                f"backups are on {destination.label}: copy the one to use here and pass --from FILE"
            )
        for meta in reversed(destination.entries(record.name)):
            try:
                backups.verify_local(tools, destination.directory / meta.file)
            except BackupError:
                continue
            return destination.directory / meta.file
    finally:
        destination.close()
    raise RecoveryError(
        f"no verified backup of cluster {record.name} in {destination.label}; pass --from "
        "FILE or --from-member NAME"
    )


def plan(selection: Selection, from_file: Path | None, from_member: str | None) -> RecoveryPlan:
    record = record_for(selection)
    members = run(_survey(record))
    seen = [m.revision for m in members if m.revision is not None]
    newest = max(seen) if seen else None
    if from_member is not None:
        record.member(from_member)
        found = next(m for m in members if m.name == from_member)
        return RecoveryPlan(
            record.name, tuple(members), f"member {from_member}'s database", found.revision, newest
        )
    file = from_file or newest_backup(selection, record)
    meta = backups.read_meta(file) if backups.meta_path(file).is_file() else None
    revision = meta.revision if meta else None
    return RecoveryPlan(record.name, tuple(members), str(file), revision, newest)


# --- the source database ---------------------------------------------------------------------


def copy_member_db(record: ClusterRecord, name: str, dest: Path) -> None:
    """Stop the member (a database copied under a running etcd may be torn), copy its file."""
    data_dir = PurePosixPath(record.member(name).data_dir)
    db = data_dir / "member" / "snap" / "db"
    ensure_dir(dest.parent)
    if deployed_spec(record).on_hosts:
        asyncio.run(_copy_from_host(record, name, db, dest))
        return
    asyncio.run(LocalRuntime(record).stop(name))
    if not Path(db).is_file():
        raise RecoveryError(f"member {name} has no database at {db}; choose another source")
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(db, part)
    part.chmod(PRIVATE_FILE)
    part.replace(dest)


async def _copy_from_host(record: ClusterRecord, name: str, db: PurePosixPath, dest: Path) -> None:
    spec = deployed_spec(record)
    host = await SSHHost.connect(target_for(spec.member(name)))
    try:
        await SystemdRuntime({name: host}, unit_name(spec.host_paths)).stop(name)
        data = await host.read_file(db)
    finally:
        await host.close()
    if data is None:
        raise RecoveryError(f"{host.label}: no database at {db}; choose another source")
    atomic_write(dest, data, PRIVATE_FILE)


def _from_member(
    selection: Selection, record: ClusterRecord, name: str, work: rebuild.Work, progress: Progress
) -> tuple[Path, int]:
    dest = work.root / f"member-{name}.db"
    progress.step(name, "stop it and copy its database")
    copy_member_db(record, name, dest)
    try:
        revision = snapshot.status(snapshot_tools(selection, record), dest).revision
    except snapshot.SnapshotError as exc:
        raise RecoveryError(
            f"member {name}'s database is unreadable ({exc}); choose another source"
        ) from None
    return dest, revision


def _from_backup(
    selection: Selection, record: ClusterRecord, file: Path
) -> tuple[BackupMeta | None, int, str]:
    tools = snapshot_tools(selection, record)
    meta, info, digest = read_source(tools, file, other_cluster=False)
    if meta is not None:
        check_release(record, meta.etcd_version, str(file))
        check_identity(record, meta, "", str(file))
    return meta, info.revision, digest


# --- the command -----------------------------------------------------------------------------


def recover(
    selection: Selection,
    from_file: Path | None = None,
    from_member: str | None = None,
    progress: Progress = SILENT,
) -> Restored:
    """Refuse unless quorum is lost; then rebuild every member from the chosen database."""
    record = record_to_change(selection, "recover")
    rebuild.require_spec_file(selection, record)
    work = rebuild.Work(record)
    key = (
        f"member {from_member}'s database"
        if from_member
        else (str(from_file.absolute()) if from_file else NEWEST_BACKUP)
    )
    warnings: list[str] = []
    state = rebuild.in_progress(work, "recover", key)
    if state is None:
        progress.phase("preflight")
        require_lost_quorum(record, run(_survey(record)))
        state = _decide(selection, record, work, key, from_file, from_member, warnings, progress)
        work.write(state)
    result = rebuild.rebuild(selection, record, state, progress)
    return Restored(record.name, state, result, tuple(warnings))


def _decide(
    selection: Selection,
    record: ClusterRecord,
    work: rebuild.Work,
    key: str,
    from_file: Path | None,
    from_member: str | None,
    warnings: list[str],
    progress: Progress,
) -> rebuild.RebuildState:
    tools = snapshot_tools(selection, record)
    old_cluster_id = rebuild.live_cluster_id(record)  # before the source member is stopped
    if from_member is not None:
        record.member(from_member)
        path, revision = _from_member(selection, record, from_member, work, progress)
        digest = file_sha256(path)
    else:
        path = (from_file or newest_backup(selection, record)).absolute()
        progress.step("admin", f"verify {path.name}")
        _, revision, digest = _from_backup(selection, record, path)
    state = rebuild.RebuildState(
        kind="recover",
        source=key,
        snapshot=str(path),
        sha256=digest,
        revision=revision,
        old_token=record.token,
        new_token=new_token(record.name),
        old_cluster_id=old_cluster_id,
        bump_by=bump_for(tools, True, warnings),
        skip_hash_check=from_member is not None,
    )
    check_space(selection, record, state)
    return state
