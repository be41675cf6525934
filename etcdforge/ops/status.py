"""`etcdforge status`: one row per member from the live cluster, queried concurrently."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from etcdforge import advisories
from etcdforge.binaries import Version, parse_version
from etcdforge.client import EtcdClient, run
from etcdforge.errors import BinaryError
from etcdforge.maintenance import alarms_in, configured_quota, fragmentation
from etcdforge.ops.member_plan import catch_up
from etcdforge.ops.target import Selection, record_for
from etcdforge.record import ClusterRecord


@dataclass(frozen=True)
class MemberStatus:
    name: str
    endpoint: str
    version: str | None
    is_leader: bool
    healthy: bool
    db_size: int | None
    raft_term: int | None
    raft_index: int | None
    error: str | None
    is_learner: bool = False
    catch_up: float | None = None  # a learner's raft index as a fraction of the leader's
    db_in_use: int | None = None
    fragmentation: float | None = None  # percent of db_size a defrag would give back
    quota: int | None = None
    alarms: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def query_status(record: ClusterRecord) -> list[MemberStatus]:
    quota = configured_quota(record.spec)

    async def gather() -> list[MemberStatus]:
        async with EtcdClient(record.endpoints, record.admin_tls, timeout=3.0) as client:
            statuses = await client.statuses()
        leader = next((s.raft_index for s in statuses if s.is_leader), None)
        return [
            MemberStatus(
                name=record.name_of(s.endpoint),
                endpoint=s.endpoint,
                version=s.version,
                is_leader=s.is_leader,
                healthy=s.healthy,
                db_size=s.db_size,
                raft_term=s.raft_term,
                raft_index=s.raft_index,
                error=s.error,
                is_learner=s.is_learner,
                catch_up=catch_up(s.raft_index, leader) if s.is_learner else None,
                db_in_use=s.db_size_in_use,
                fragmentation=_rounded(fragmentation(s.db_size, s.db_size_in_use)),
                quota=s.db_size_quota or (quota if s.version else None),
                alarms=alarms_in(s.errors),
            )
            for s in statuses
        ]

    return run(gather())


def _rounded(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


def status(selection: Selection) -> tuple[ClusterRecord, list[MemberStatus]]:
    record = record_for(selection)
    return record, query_status(record)


def version_advisories(rows: list[MemberStatus]) -> list[str]:
    """What etcd's advisories say about the versions the members run (`advisories`)."""
    versions: list[Version] = []
    for row in rows:
        try:
            versions.append(parse_version(row.version or ""))
        except BinaryError:
            continue
    return advisories.notes(versions)
