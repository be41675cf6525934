"""Restart one member at a time and wait for the whole cluster to be healthy again.

What etcd reads only at start-up (its trusted CA files, its binary) changes through rolling
restarts: never more than one member down, never while another is unhealthy, and never the
leader without handing leadership to a healthy follower first, so writers see at most a retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from etcdforge.client import EtcdClient
from etcdforge.errors import EtcdClientError, ServiceError
from etcdforge.layout import MemberLayout
from etcdforge.ops.up import HEALTH_TIMEOUT, wait_healthy
from etcdforge.record import ClusterRecord
from etcdforge.services import local

LEADER_MOVE_TIMEOUT = 10.0


def started_at(pid: int) -> float | None:
    """When a process started, as a Unix time (10 ms resolution), or None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    ticks = int(fields[19])  # field 22, counted after the "(comm)" part
    boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def loaded(files: MemberLayout, *paths: Path) -> bool:
    """True when the running member started after `paths` last changed (or is not running)."""
    pid = local.running_pid(files.pid_file, files.data_dir)
    if pid is None:
        return True
    start = started_at(pid)
    if start is None:
        return True
    newest = max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)
    return start >= newest


def member_flags(files: MemberLayout) -> list[str]:
    try:
        text = files.flags_file.read_text()
    except FileNotFoundError:
        raise ServiceError(
            f"{files.flags_file}: missing; run `etcdforge up` to write the member's flags"
        ) from None
    return [line for line in text.splitlines() if line.strip()]


def _member_id(record: ClusterRecord, name: str) -> tuple[str | None, str | None]:
    """(this member's ID, the leader's ID) from the member's own status."""
    member = next(m for m in record.members if m.name == name)

    async def ask() -> tuple[str | None, str | None]:
        async with EtcdClient(record.endpoints, record.admin_tls, timeout=3.0) as client:
            status = await client.status(member.client_url)
        return status.member_id, status.leader

    return asyncio.run(ask())


def move_leader_away(
    record: ClusterRecord, name: str, timeout: float = LEADER_MOVE_TIMEOUT
) -> bool:
    """If `name` leads, hand leadership to another healthy member; True if it moved."""
    member_id, leader = _member_id(record, name)
    if member_id is None or member_id != leader:
        return False
    me = next(m for m in record.members if m.name == name)

    async def transfer() -> None:
        async with EtcdClient(record.endpoints, record.admin_tls, timeout=5.0) as client:
            others = [
                s for s in await client.statuses() if s.endpoint != me.client_url and s.healthy
            ]
            if not others:
                raise ServiceError(f"member {name} leads and no other member is healthy")
            target = others[0].member_id
            await client.call(
                me.client_url, "/v3/maintenance/transfer-leadership", {"targetID": target}
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                status = await client.status(me.client_url)
                if status.leader and status.leader != member_id:
                    return
                await asyncio.sleep(0.05)
            raise ServiceError(f"leadership did not move away from {name} in {timeout:.0f} s")

    asyncio.run(transfer())
    return True


def start_member(record: ClusterRecord, name: str) -> None:
    """Start a stopped local member with the flags it last ran with."""
    files = record.layout.member(name)
    local.start(Path(record.binary), member_flags(files), files.pid_file, files.log_file)


def restart_member(record: ClusterRecord, name: str, timeout: float = HEALTH_TIMEOUT) -> None:
    """Stop one local member and start it again with its stored flags; wait until all healthy.

    Refuses to start while any member is unhealthy: restarting then could lose quorum.
    """
    files = record.layout.member(name)
    flags = member_flags(files)
    try:
        wait_healthy(record, timeout)
    except ServiceError as exc:
        raise ServiceError(f"not restarting {name}: the cluster is not healthy ({exc})") from None
    with contextlib.suppress(EtcdClientError):  # else an election follows the stop
        move_leader_away(record, name)
    local.stop(files.pid_file, files.data_dir)
    local.start(Path(record.binary), flags, files.pid_file, files.log_file)
    wait_healthy(record, timeout)
