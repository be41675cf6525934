"""Is the cluster healthy, and who leads it: the gates every change passes through.

One wait loop serves local and host clusters: it polls `/health` on every member with the admin
certificate and, once a short grace period has passed, asks the member runtime why a member that
does not answer is down, so a member that exited at start-up fails the wait at once with its own
log line instead of after the whole timeout.

Leadership is handed off before a leader is stopped (etcd's maintenance API, MoveLeader), to the
healthy voting follower with the highest applied raft index: writers then see one quick leader
change instead of an election timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from etcdforge.client import EndpointStatus, EtcdClient
from etcdforge.errors import EtcdClientError, ServiceError
from etcdforge.interrupt import checkpoint
from etcdforge.record import ClusterRecord
from etcdforge.services.runtime import MemberRuntime

HEALTH_TIMEOUT = 120.0
HEALTH_POLL = 0.1
DOWN_CHECK_GRACE = 2.0  # a member asked to start may not have a process yet
DOWN_CHECK_EVERY = 1.0
LEADER_MOVE_TIMEOUT = 10.0


async def unhealthy_members(client: EtcdClient, record: ClusterRecord) -> dict[str, str]:
    """Member name -> why it is not healthy; empty when every member answers healthy."""
    results = await asyncio.gather(*(client.health(e) for e in record.endpoints))
    return {
        record.name_of(endpoint): error or "unhealthy"
        for endpoint, (ok, error) in zip(record.endpoints, results, strict=True)
        if not ok
    }


async def wait_healthy(
    record: ClusterRecord,
    runtime: MemberRuntime,
    timeout: float = HEALTH_TIMEOUT,
    check_down: bool = True,
) -> None:
    """Every member healthy, or one line naming the member that is not and where to look."""
    started = time.monotonic()
    deadline = started + timeout
    next_down_check = started + DOWN_CHECK_GRACE
    unhealthy: dict[str, str] = {}
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=2.0) as client:
        for _ in range(int(timeout / HEALTH_POLL) + 10):
            checkpoint("while waiting for every member to be healthy")
            unhealthy = await unhealthy_members(client, record)
            now = time.monotonic()
            if not unhealthy or now > deadline:
                break
            if check_down and now >= next_down_check:
                next_down_check = now + DOWN_CHECK_EVERY
                await _raise_if_down(runtime, list(unhealthy))
            await asyncio.sleep(HEALTH_POLL)
    if unhealthy:
        name, error = next(iter(unhealthy.items()))
        log = await runtime.log_tail(name, 1)
        raise ServiceError(
            f"member {runtime.label(name)} not healthy after {timeout:.0f} s ({error})"
            + (f"; last log: {log[:300]}" if log else "")
            + f"; {runtime.log_hint(name)}"
        )


async def _raise_if_down(runtime: MemberRuntime, names: Sequence[str]) -> None:
    reasons = await asyncio.gather(*(runtime.down_reason(n) for n in names))
    for reason in reasons:
        if reason:
            raise ServiceError(reason)


async def require_healthy(
    record: ClusterRecord, runtime: MemberRuntime, before: str, timeout: float
) -> None:
    """The health gate before a change: refuse it (naming the change) on an unhealthy cluster."""
    try:
        await wait_healthy(record, runtime, timeout)
    except ServiceError as exc:
        raise ServiceError(f"not {before}: the cluster is not healthy ({exc})") from None


async def wait_caught_up(record: ClusterRecord, name: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """Until `name` has the raft index the leader had when the wait began: a member just
    restarted is healthy as soon as it has a leader, before it has replayed what it missed."""
    endpoint = record.member(name).client_url
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=2.0) as client:
        leader = next((s for s in await client.statuses() if s.is_leader), None)
        target = (leader.raft_index or 0) if leader is not None else 0
        deadline = time.monotonic() + timeout
        reached = 0
        for _ in range(int(timeout / HEALTH_POLL) + 10):
            reached = (await client.status(endpoint)).raft_index or 0
            if reached >= target or time.monotonic() > deadline:
                break
            await asyncio.sleep(HEALTH_POLL)
    if reached < target:
        raise ServiceError(
            f"member {name} did not catch up with the leader in {timeout:.0f} s (raft index "
            f"{reached} < {target}); check its disk and network, then rerun"
        )


async def leader_name(record: ClusterRecord) -> str | None:
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=3.0) as client:
        statuses = await client.statuses()
    return next((record.name_of(s.endpoint) for s in statuses if s.is_leader), None)


async def leader_or_none(record: ClusterRecord) -> str | None:
    """The leader's name, or None when no member answers (then there is nothing to hand off)."""
    try:
        return await leader_name(record)
    except EtcdClientError:
        return None


def successor(statuses: Sequence[EndpointStatus], leaving: str) -> EndpointStatus | None:
    """The healthy voting follower furthest ahead: the one that can lead at once."""
    candidates = [
        s
        for s in statuses
        if s.endpoint != leaving and s.healthy and not s.is_learner and s.member_id is not None
    ]
    return max(candidates, key=lambda s: s.raft_index or 0, default=None)


async def hand_off_leadership(
    record: ClusterRecord, name: str, timeout: float = LEADER_MOVE_TIMEOUT
) -> bool:
    """If `name` leads, move leadership to its best follower and wait for it; True if moved."""
    endpoint = record.member(name).client_url
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=5.0) as client:
        statuses = await client.statuses()
        mine = next((s for s in statuses if s.endpoint == endpoint), None)
        if mine is None or not mine.is_leader:
            return False
        target = successor(statuses, endpoint)
        if target is None:
            raise ServiceError(f"member {name} leads and no other member is healthy")
        await client.call(
            endpoint, "/v3/maintenance/transfer-leadership", {"targetID": target.member_id}
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (await client.status(target.endpoint)).is_leader:
                return True
            await asyncio.sleep(0.05)
    raise ServiceError(f"leadership did not move away from {name} in {timeout:.0f} s")
