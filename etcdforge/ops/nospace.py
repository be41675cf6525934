"""`etcdforge defrag --recover-nospace`: a cluster that hit its quota takes writes again.

Once a member's database reaches `--quota-backend-bytes`, the cluster raises the NOSPACE alarm
and refuses every write until the alarm is disarmed; disarming alone does not help, because the
file is still full. etcd's own procedure, as phases:

1. **compact** the keyspace's history up to the current revision (physically, so the pages are
   free when it returns);
2. **defragment** every member, one at a time, followers first, so the file shrinks to what is
   in use (the members are "unhealthy" while the alarm is raised, so the gate here is that every
   member answers, not the health check);
3. **check** that what is in use now fits the quota with room to spare: if live keys fill it,
   compaction cannot help, and disarming would only let the alarm fire again;
4. **disarm** every NOSPACE alarm, then wait until every member is healthy.

Each phase is safe to repeat, so a rerun after an interruption completes the recovery.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from etcdforge.client import EtcdClient, EtcdReplyError
from etcdforge.errors import EtcdClientError, UnsafeOperationError
from etcdforge.maintenance import NOSPACE, alarms_in, configured_quota, human_size
from etcdforge.ops.defrag import DEFRAG_TIMEOUT, MemberDb, member_dbs
from etcdforge.ops.health import HEALTH_TIMEOUT, wait_healthy
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.rolling import followers_first
from etcdforge.ops.runtime import open_runtime
from etcdforge.ops.target import Selection, record_to_change
from etcdforge.record import ClusterRecord

GRPC_OUT_OF_RANGE = 11  # "required revision has been compacted": already compacted that far
#: Disarm only when the data in use leaves this share of the quota free.
HEADROOM = 0.9


class NoSpaceError(UnsafeOperationError):
    """The database is full of live data: compaction and defragmentation cannot free it."""


@dataclass(frozen=True)
class NoSpaceResult:
    cluster: str
    had_alarm: bool
    compacted_at: int
    before: tuple[MemberDb, ...]
    after: tuple[MemberDb, ...]


def recover_nospace(
    selection: Selection, progress: Progress = SILENT, timeout: float = HEALTH_TIMEOUT
) -> NoSpaceResult:
    record = record_to_change(selection, "defrag --recover-nospace")
    return asyncio.run(_recover(record, progress, timeout))


async def _recover(record: ClusterRecord, progress: Progress, timeout: float) -> NoSpaceResult:
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=10.0) as client:
        statuses = await client.statuses()
        down = [s for s in statuses if s.version is None]
        if down:
            raise EtcdClientError(
                f"not recovering from NOSPACE: {record.name_of(down[0].endpoint)} does not answer "
                f"({down[0].error}); start it first (`etcdforge up` / `apply`)"
            )
        before = tuple(await member_dbs(record))
        if NOSPACE not in {a for s in statuses for a in alarms_in(s.errors)}:
            return NoSpaceResult(record.name, False, 0, before, before)
        revision = max(s.revision or 0 for s in statuses)
        progress.phase("compact")
        progress.step("cluster", f"compact the history up to revision {revision}")
        await _compact(client, revision)
        progress.phase("defragment")
        leader = next((record.name_of(s.endpoint) for s in statuses if s.is_leader), None)
        for name in followers_first([m.name for m in record.members], leader):
            progress.step(name, "defragment")
            await client.defragment(record.member(name).client_url, DEFRAG_TIMEOUT)
        after = tuple(await member_dbs(record))
        progress.phase("check")
        _check_room(record, after)
        progress.phase("disarm")
        for alarm in await client.alarms():
            if alarm.alarm == NOSPACE:
                progress.step("cluster", f"disarm NOSPACE of member {alarm.member_id}")
                await client.disarm(alarm)
    progress.phase("health")
    async with open_runtime(record) as runtime:
        await wait_healthy(record, runtime, timeout)
    return NoSpaceResult(record.name, True, revision, before, after)


async def _compact(client: EtcdClient, revision: int) -> None:
    try:
        await client.compact(revision, DEFRAG_TIMEOUT)
    except EtcdReplyError as exc:
        if exc.code != GRPC_OUT_OF_RANGE:  # a rerun: compacted that far already
            raise


def _check_room(record: ClusterRecord, after: tuple[MemberDb, ...]) -> None:
    quota = configured_quota(record.spec)
    fullest = max(after, key=lambda db: db.in_use or 0)
    if (fullest.in_use or 0) >= quota * HEADROOM:
        raise NoSpaceError(
            f"member {fullest.name} still uses {human_size(fullest.in_use)} of its "
            f"{human_size(quota)} quota after compaction and defragmentation: live data fills "
            "it; delete keys (deletes are allowed) or raise storage.quota_backend_bytes and "
            "apply it, then rerun; the alarm stays raised"
        )
