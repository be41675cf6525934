"""What a live cluster runs: each member's etcd version, the cluster version, whether auth is on.

Versions come from each member's `/version`, which answers outside the gRPC gateway (even where
etcd auth turns the gateway away). A member that does not answer is judged by the binary it
would start with, so a cluster whose upgrade was cut short, one member stopped, is still
recognised as mixed and the upgrade resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from etcdforge.binaries import Version, parse_version
from etcdforge.client import EtcdClient
from etcdforge.errors import BinaryError, EtcdClientError
from etcdforge.record import ClusterRecord
from etcdforge.upgrade_path import UpgradePath, check_path, needs_auth_check

VERSION_TIMEOUT = 3.0
#: For a member that does not answer: the version it would start with, if known.
Fallback = Callable[[str], Awaitable[Version | None]]


async def _versions(client: EtcdClient, endpoint: str) -> tuple[str, str] | None:
    try:
        return await client.versions(endpoint)
    except EtcdClientError:
        return None


async def live_versions(record: ClusterRecord) -> dict[str, tuple[str, str] | None]:
    """Member name -> (its etcd version, the cluster version it reports), None if silent."""
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=VERSION_TIMEOUT) as client:
        found = await asyncio.gather(*(_versions(client, e) for e in record.endpoints))
    return {m.name: v for m, v in zip(record.members, found, strict=True)}


async def member_versions(record: ClusterRecord, fallback: Fallback) -> dict[str, Version]:
    """Member name -> the etcd version it runs (or would start with); unknown ones left out."""
    running: dict[str, Version] = {}
    for name, found in (await live_versions(record)).items():
        version: Version | None = None
        if found is not None:
            try:
                version = parse_version(found[0])
            except BinaryError:
                version = None
        running_version = version if version is not None else await fallback(name)
        if running_version is not None:
            running[name] = running_version
    return running


async def auth_enabled(record: ClusterRecord) -> bool:
    """Whether etcd auth is on, from the first member that answers."""
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=VERSION_TIMEOUT) as client:
        return await client.first_ok(client.auth_enabled)


async def live_path(
    record: ClusterRecord, target: Version, allow_unsafe: bool, fallback: Fallback
) -> UpgradePath | None:
    """The checked path from what the members run to `target`; None when none runs anything
    (a cluster being deployed). Refusals are `upgrade_path.UpgradeRefused`."""
    running = await member_versions(record, fallback)
    if not running:
        return None
    auth = await auth_enabled(record) if needs_auth_check(running, target) else None
    return check_path(running, target, allow_unsafe=allow_unsafe, auth_enabled=auth)
