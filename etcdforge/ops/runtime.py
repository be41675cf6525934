"""Pick the member runtime once, from the deployed record: local processes or systemd hosts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from etcdforge.host_logins import close_all, connect_all
from etcdforge.hosts import Host
from etcdforge.ops.target import deployed_spec
from etcdforge.record import ClusterRecord
from etcdforge.services.local import LocalRuntime
from etcdforge.services.runtime import MemberRuntime
from etcdforge.services.systemd import SystemdRuntime, unit_name

SETTLE_TIMEOUT = 30.0


@asynccontextmanager
async def open_runtime(
    record: ClusterRecord, hosts: Mapping[str, Host] | None = None
) -> AsyncIterator[MemberRuntime]:
    """The cluster's runtime; on hosts, over `hosts` if given, else over fresh logins."""
    if not record.on_hosts:
        yield LocalRuntime(record)
        return
    spec = deployed_spec(record)
    unit = unit_name(spec.host_paths)
    if hosts is not None:
        yield SystemdRuntime(hosts, unit)
        return
    connected = await connect_all(spec)
    try:
        yield SystemdRuntime(connected, unit)
    finally:
        await close_all(connected)


async def settle_all(
    record: ClusterRecord, runtime: MemberRuntime, timeout: float = SETTLE_TIMEOUT
) -> None:
    """Let every member finish a start or stop an interrupted command began, before judging."""
    await asyncio.gather(*(runtime.settle(m.name, timeout) for m in record.members))
