"""`etcdforge defrag`: give fragmented members' free pages back, one member at a time.

A defragmentation rewrites a member's database file without its free pages and blocks that
member while it runs, so it goes through the one rolling policy (`ops.rolling`) with a
defragment action instead of a restart: a health gate before each member, followers first, the
leader last and only after leadership has been handed to a caught-up follower, and the next
member only once every member is healthy again. Only members whose fragmentation is at or above
the threshold are touched (`--all`: every member), so a rerun after an interruption continues
with the members still fragmented.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from etcdforge.client import EndpointStatus, EtcdClient
from etcdforge.errors import UnsafeOperationError
from etcdforge.maintenance import NOSPACE, alarms_in, fragmentation, human_size
from etcdforge.ops.health import HEALTH_TIMEOUT, require_healthy
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.rolling import MemberAction, rolling_restart
from etcdforge.ops.runtime import open_runtime
from etcdforge.ops.target import Selection, record_to_change
from etcdforge.record import ClusterRecord

DEFAULT_THRESHOLD = 30.0
MIN_RECLAIM = 1 << 20
#: A defrag copies the whole database; etcd answers only when it is done.
DEFRAG_TIMEOUT = 900.0


@dataclass(frozen=True)
class MemberDb:
    name: str
    size: int | None
    in_use: int | None

    @property
    def fragmentation(self) -> float | None:
        return fragmentation(self.size, self.in_use)


@dataclass(frozen=True)
class DefragResult:
    cluster: str
    order: tuple[str, ...]  # the members defragmented, in order
    before: tuple[MemberDb, ...]
    after: tuple[MemberDb, ...]
    dry_run: bool


async def member_dbs(record: ClusterRecord) -> list[MemberDb]:
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=5.0) as client:
        statuses = await client.statuses()
    return [_db(record, s) for s in statuses]


def _db(record: ClusterRecord, status: EndpointStatus) -> MemberDb:
    return MemberDb(record.name_of(status.endpoint), status.db_size, status.db_size_in_use)


async def _refuse_under_nospace(record: ClusterRecord) -> None:
    """A raised NOSPACE alarm makes every member unhealthy: say what fixes it, at once."""
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=5.0) as client:
        statuses = await client.statuses()
    if any(NOSPACE in alarms_in(s.errors) for s in statuses):
        raise UnsafeOperationError(
            f"not defragmenting: cluster {record.name} raised the NOSPACE alarm (its database "
            "reached the quota); run `etcdforge defrag --recover-nospace`"
        )


def to_defragment(dbs: list[MemberDb], threshold: float, everything: bool) -> dict[str, str]:
    """Member -> why, for the members to defragment: at or above the threshold, and with at
    least MIN_RECLAIM to give back (a small database is mostly free pages after a few writes:
    rewriting it would gain nothing), or every member with `everything`."""
    chosen = {}
    for db in dbs:
        frag = db.fragmentation
        if frag is None:
            continue
        free = (db.size or 0) - (db.in_use or 0)
        if everything or (frag >= threshold and free >= MIN_RECLAIM):
            chosen[db.name] = f"{frag:.0f}% fragmented, {human_size(free)} to give back"
    return chosen


def defragment_action(record: ClusterRecord, timeout: float = DEFRAG_TIMEOUT) -> MemberAction:
    """The rolling policy's per-member action: defragment that one member."""

    async def defragment(name: str) -> None:
        endpoint = record.member(name).client_url
        async with EtcdClient([endpoint], record.admin_tls, timeout=10.0) as client:
            await client.defragment(endpoint, timeout)

    return defragment


def defrag(
    selection: Selection,
    threshold: float = DEFAULT_THRESHOLD,
    everything: bool = False,
    dry_run: bool = False,
    progress: Progress = SILENT,
    timeout: float = HEALTH_TIMEOUT,
) -> DefragResult:
    record = record_to_change(selection, "defrag")
    return asyncio.run(_defrag(record, threshold, everything, dry_run, progress, timeout))


async def _defrag(
    record: ClusterRecord,
    threshold: float,
    everything: bool,
    dry_run: bool,
    progress: Progress,
    timeout: float,
) -> DefragResult:
    async with open_runtime(record) as runtime:
        progress.phase("health")
        await _refuse_under_nospace(record)
        progress.step("cluster", "wait for every member to be healthy")
        await require_healthy(record, runtime, "defragmenting", timeout)
        before = await member_dbs(record)
        reasons = to_defragment(before, threshold, everything)
        if dry_run or not reasons:
            return DefragResult(record.name, tuple(reasons), tuple(before), (), dry_run)
        progress.phase("defragment")
        order = await rolling_restart(
            record,
            runtime,
            reasons,
            progress,
            timeout,
            action=defragment_action(record),
            verb="defragment",
        )
    after = await member_dbs(record)
    return DefragResult(record.name, tuple(order), tuple(before), tuple(after), dry_run)
