"""Rebuild a whole cluster from one database file: what `restore` and `recover` share.

Every member is restored from the same verified file with the cluster's member list and a **new
initial-cluster token**. The token decides the cluster and member IDs a restore computes, so a
new one gives the rebuilt cluster IDs no old member shares: a member that was missed (a host
that comes back with its old data) is refused by the rebuilt cluster ("cluster ID mismatch")
instead of joining it with a raft log that no longer fits. The token lives in the cluster record
and in each member's settings (its flags file, or `ETCD_INITIAL_CLUSTER_TOKEN` in the host's
environment file), which name whose data a data dir holds (`ops.preflight.data_dir_owner`); both
are rewritten to the new token before the members start on their restored data. etcd reads the
token only when it creates a data dir, so a member left running on old data is not affected by
its new settings.

The phases, each checking live state first, with their progress in `<state>/rebuild/`:

1. **files** (hosts): every host logged in to and checked (whether its environment file names
   the old token or, after an interrupted run, the new one), with room for the restore; then the
   release, certificates and the settings with the new token installed (`apply`'s file phase);
2. **restore**: the record takes the new token; every member is stopped, then each data dir is
   restored from the file (`ops.restore`: the old data dir is kept aside, a marker per member
   lets a rerun skip the members already done);
3. **start**: `up` (local) or `apply` (hosts) start every member together and wait for health;
4. **verify**: every member at or past the expected revision, and etcd's own hash of the
   keyspace (`HashKV`, 3.5+) and the key count equal on every member at one revision;
5. **finish**: the old data kept aside is removed; the old and new cluster IDs are remembered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from etcdforge import backups
from etcdforge import release as releases
from etcdforge.client import EtcdClient, run
from etcdforge.errors import EtcdClientError, EtcdforgeError, SpecError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, ensure_dir
from etcdforge.host_logins import close_all, connect_all
from etcdforge.hosts import Host, fan_out
from etcdforge.maintenance import human_size
from etcdforge.ops import preflight, restore
from etcdforge.ops.admin_state import record_step
from etcdforge.ops.apply import Apply, apply, load_host_spec
from etcdforge.ops.plan import Progress, StepsOnly, execute
from etcdforge.ops.restore import RestoreTarget
from etcdforge.ops.target import Selection, deployed_spec
from etcdforge.ops.up import up
from etcdforge.record import ClusterRecord
from etcdforge.services import systemd
from etcdforge.spec import ClusterSpec

#: A restored member also writes a WAL (64 MiB preallocated, and a second segment made ready).
WAL_ROOM = 128 << 20
VERIFY_TIMEOUT = 120.0


class RebuildError(EtcdforgeError):
    """A cluster could not be rebuilt from its database file."""


@dataclass(frozen=True)
class RebuildState:
    """What a rebuild decided before changing anything; a rerun continues with exactly this."""

    kind: str  # "restore" or "recover": which command started it
    source: str  # what the file is, for messages: a backup's path, "member m1's database"
    snapshot: str  # the file on this machine
    sha256: str
    revision: int  # the file's own revision (before any bump)
    old_token: str
    new_token: str
    old_cluster_id: str
    bump_by: int
    skip_hash_check: bool

    @property
    def expected_revision(self) -> int:
        return self.revision + self.bump_by


@dataclass(frozen=True)
class RebuildResult:
    cluster: str
    revision: int  # the members' revision once verified
    keys: int
    cluster_id: str
    state: RebuildState


class Work:
    """`<state>/rebuild/`: the decided state, copied files, the per-member restore markers."""

    def __init__(self, record: ClusterRecord) -> None:
        self.root = record.layout.root / "rebuild"
        self.state_file = self.root / "state.json"
        self.last = self.root / "last.json"

    def read(self) -> RebuildState | None:
        try:
            return RebuildState(**json.loads(self.state_file.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise RebuildError(
                f"{self.state_file}: unreadable ({exc}); remove {self.root} to start over"
            ) from None

    def write(self, state: RebuildState) -> None:
        ensure_dir(self.root)
        atomic_write(self.state_file, json.dumps(asdict(state), indent=2).encode(), PRIVATE_FILE)

    def close(self) -> None:
        """Done: the state becomes `last.json`, copied databases go."""
        self.state_file.replace(self.last)
        for leftover in self.root.glob("*.db"):
            leftover.unlink()


def in_progress(work: Work, kind: str, source: str) -> RebuildState | None:
    """The interrupted rebuild to resume, if it is this one; refuse to start another."""
    state = work.read()
    if state is not None and (state.kind, state.source) != (kind, source):
        raise RebuildError(
            f"a {state.kind} from {state.source} is in progress ({work.root}); rerun that "
            f"command to finish it (the cluster is down until it does)"
        )
    return state


def require_spec_file(selection: Selection, record: ClusterRecord) -> None:
    """Hosts are rebuilt with `apply`'s machinery, which needs the cluster YAML."""
    if selection.file is None and deployed_spec(record).on_hosts:
        raise SpecError(
            f"cluster {record.name} runs on hosts: pass its spec with -f cluster.yaml, as for "
            "`apply` (nothing was changed)"
        )


def rebuilt_record(record: ClusterRecord, state: RebuildState) -> ClusterRecord:
    return replace(record, token=state.new_token)


# --- local clusters --------------------------------------------------------------------------


def check_local_space(record: ClusterRecord, size: int) -> None:
    """Every data dir's filesystem holds a restored copy per member on it (old data stays)."""
    needs: dict[int, tuple[Path, int]] = {}
    for member in record.members:
        path = Path(member.data_dir)
        existing = next(p for p in (path, *path.parents) if p.exists())
        device = existing.stat().st_dev
        where, need = needs.get(device, (existing, 0))
        needs[device] = (where, need + size + WAL_ROOM)
    for where, need in needs.values():
        free = shutil.disk_usage(where).free
        if free < need:
            raise RebuildError(
                f"{where}: only {human_size(free)} free, restoring every member there needs "
                f"{human_size(need)}; free some space and rerun (nothing was restored)"
            )


def _restore_local(
    selection: Selection, record: ClusterRecord, state: RebuildState, progress: Progress
) -> None:
    work = Work(record)
    new = rebuilt_record(record, state)
    target = restore.LocalTarget(selection, new, work.root)
    snap = restore.Snapshot(
        Path(state.snapshot), state.sha256, state.bump_by, state.skip_hash_check
    )
    progress.phase("restore")
    execute([record_step(new.layout, new), *target.steps(snap)], progress)
    progress.phase("start")
    up(Selection(selection.file, new.layout.root), progress=StepsOnly(progress))


# --- clusters on hosts -----------------------------------------------------------------------


async def _probe(
    spec: ClusterSpec, hosts: dict[str, Host], state: RebuildState, size: int
) -> dict[str, preflight.HostFacts]:
    """apply's preflight, with the old or the new token as the owner of each host's data (a
    rerun finds some hosts switched), and room for the upload and the restored copy."""
    facts: dict[str, preflight.HostFacts] = {}
    paths = spec.host_paths

    async def one(name: str) -> None:
        host = hosts[name]
        found = await preflight.probe(host, paths)
        token = state.new_token if found.env_token == state.new_token else state.old_token
        preflight.check(host, spec.member(name), paths, found, token)
        need = 2 * size + WAL_ROOM
        if found.free_data < need:
            raise RebuildError(
                f"{host.label}: only {human_size(found.free_data)} free for {paths.data_dir}, "
                f"the restore needs {human_size(need)}; free some space and rerun (nothing "
                "was restored)"
            )
        facts[name] = found

    names = [m.name for m in spec.members]
    await fan_out(names, lambda n: hosts[n].label, one)
    return facts


async def _host_files(
    selection: Selection, state: RebuildState, size: int, progress: Progress
) -> None:
    spec, layout, _ = load_host_spec(selection, allow_even=True)
    assert selection.file is not None
    release = releases.resolve(spec.etcd, selection.file.parent)
    hosts = await connect_all(spec)
    try:
        facts = await _probe(spec, hosts, state, size)
        run_ = Apply(spec, layout, release, False, StepsOnly(progress), 120.0)
        await run_.files(hosts, facts, run_.wants(state.new_token))
        # A host whose files were lost may still remember the unit as failed (and as a unit
        # without a file): reload and clear that, so the start below is not refused.
        unit = systemd.unit_name(spec.host_paths)
        every = list(hosts.values())
        await fan_out(every, lambda h: h.label, lambda h: systemd.forget_unit(h, unit))
    finally:
        await close_all(hosts)


def check_host_space(selection: Selection, state: RebuildState, size: int) -> None:
    """Only the preflight of the files phase: log in, probe, refuse; nothing is written."""

    async def probe() -> None:
        spec, _, _ = load_host_spec(selection, allow_even=True)
        hosts = await connect_all(spec)
        try:
            await _probe(spec, hosts, state, size)
        finally:
            await close_all(hosts)

    asyncio.run(probe())


def _restore_hosts(
    selection: Selection, record: ClusterRecord, state: RebuildState, progress: Progress
) -> None:
    work = Work(record)
    size = Path(state.snapshot).stat().st_size
    progress.phase("files")
    asyncio.run(_host_files(selection, state, size, progress))
    new = rebuilt_record(record, state)
    snap = restore.Snapshot(
        Path(state.snapshot), state.sha256, state.bump_by, state.skip_hash_check
    )
    progress.phase("restore")
    with restore.open_target(selection, new, work.root) as target:
        execute([record_step(new.layout, new), *target.steps(snap)], progress)
    progress.phase("start")
    apply(selection, progress=StepsOnly(progress), allow_even=True)


# --- both ------------------------------------------------------------------------------------


def rebuild(
    selection: Selection, record: ClusterRecord, state: RebuildState, progress: Progress
) -> RebuildResult:
    """Restore, start, verify, finish; see the module docstring."""
    require_spec_file(selection, record)
    on_hosts = deployed_spec(record).on_hosts
    (_restore_hosts if on_hosts else _restore_local)(selection, record, state, progress)
    new = rebuilt_record(record, state)
    progress.phase("verify")
    progress.step("cluster", "revision and etcd's keyspace hash on every member")
    revision, keys, cluster_id = run(verify_members(new, state.expected_revision))
    progress.phase("finish")
    finish(selection, new, state)
    return RebuildResult(new.name, revision, keys, cluster_id, state)


async def verify_members(record: ClusterRecord, expected: int) -> tuple[int, int, str]:
    """Every member at or past `expected`, and the same keyspace hash and key count on every
    member at one revision they all have; returns that revision, the count and the cluster ID."""
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=30.0) as client:
        statuses = await client.statuses()
        behind = [s for s in statuses if (s.revision or 0) < expected]
        if behind:
            found = behind[0]
            raise RebuildError(
                f"{record.name_of(found.endpoint)} is at revision {found.revision}, below the "
                f"{expected} the restore must give ({found.error or 'no error'}); the old data "
                f"is kept aside as *{restore.ASIDE}"
            )
        at = min(s.revision or 0 for s in statuses)
        hashes = await asyncio.gather(
            *(client.hash_kv(e, at, VERIFY_TIMEOUT) for e in record.endpoints)
        )
        counts = await asyncio.gather(
            *(client.range(b"\0", b"\0", count_only=True, revision=at, endpoint=e)
              for e in record.endpoints)
        )  # fmt: skip
    _same("keyspace hash", record, [h.hash if h is not None else None for h in hashes])
    _same("key count", record, [c.count for c in counts])
    return at, counts[0].count, statuses[0].cluster_id or ""


def _same(what: str, record: ClusterRecord, values: Sequence[object]) -> None:
    if len(set(values)) > 1:
        found = ", ".join(f"{m.name}={v}" for m, v in zip(record.members, values, strict=True))
        raise RebuildError(
            f"the members disagree on the {what} after the restore ({found}); the old data is "
            f"kept aside as *{restore.ASIDE}: inspect before anything else"
        )


def finish(selection: Selection, record: ClusterRecord, state: RebuildState) -> None:
    """Verified: drop the old data and markers, remember both cluster IDs, close the work dir."""
    work = Work(record)
    cluster_id = live_cluster_id(record)
    with _target(selection, record, work) as target:
        target.finish()
    backups.remember_cluster_ids(record.layout.root, [state.old_cluster_id, cluster_id])
    work.close()


@contextlib.contextmanager
def _target(selection: Selection, record: ClusterRecord, work: Work) -> Iterator[RestoreTarget]:
    if deployed_spec(record).on_hosts:
        with restore.open_target(selection, record, work.root) as target:
            yield target
    else:
        yield restore.LocalTarget(selection, record, work.root)


async def _live_cluster_id(record: ClusterRecord) -> str:
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=3.0) as client:
        statuses = await client.statuses()
    return next((s.cluster_id for s in statuses if s.cluster_id), "")


def live_cluster_id(record: ClusterRecord) -> str:
    """The running cluster's ID (any member that answers tells it), or "" when none does."""
    try:
        return run(_live_cluster_id(record))
    except EtcdClientError:
        return ""
