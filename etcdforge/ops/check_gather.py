"""Gathering the facts `check` judges: the side effects of the audit, all read-only.

Per member, concurrently: what its process runs with (the member runtime's `running_with`: the
command line, and the `ETCD_*` environment on hosts) and what its machine holds (one probe). From
the cluster: statuses at the start and at the end (a term that moved means an election happened
while we looked), the member list, alarms, and every member's HashKV at one revision. A host that
cannot be logged in to, or a member that does not answer, becomes a fact, never an error: the
audit always reports, which is what a cron job needs.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from etcdforge.binaries import EtcdBinary, Version, parse_version
from etcdforge.client import Alarm, EndpointStatus, EtcdClient, HashKV, Member
from etcdforge.errors import EtcdforgeError
from etcdforge.host_logins import close_all, connect_each
from etcdforge.hosts import Host
from etcdforge.ops.cert_check import CertRow, check_entry, state_entries
from etcdforge.ops.certs import DEFAULT_WARN_WITHIN, utcnow
from etcdforge.ops.check_model import Facts, MemberFacts
from etcdforge.ops.check_probe import (
    data_dir_of,
    invoking_owner,
    member_facts,
    probe_host,
    probe_local,
    running_settings,
)
from etcdforge.ops.check_sources import newest_backup
from etcdforge.ops.runtime import open_runtime
from etcdforge.record import ClusterRecord
from etcdforge.services.runtime import MemberRuntime
from etcdforge.spec import ClusterSpec
from etcdforge.tls import TLSFiles

T = TypeVar("T")
CLIENT_TIMEOUT = 5.0
ETCDCTL_TIMEOUT = 30.0
#: The JSON gateway serves HashKV from 3.5.10 (etcd #16490); older members are hashed with
#: `etcdctl endpoint hashkv` (gRPC) from this machine.
HASHKV_GATEWAY_SINCE: Version = (3, 5, 10)


@dataclass(frozen=True)
class ClusterReads:
    """What the cluster itself answered, read while the hosts are logged in to."""

    start: dict[str, EndpointStatus]
    member_list: tuple[Member, ...] | None
    alarms: tuple[Alarm, ...] | None
    revision: int | None
    hashes: dict[str, HashKV]
    hash_errors: dict[str, str]
    errors: dict[str, str]


async def gather(record: ClusterRecord, spec: ClusterSpec) -> Facts:
    """Every fact the checks judge; the cluster's answers and the members' machines are read
    concurrently (the cluster's while the SSH logins are under way)."""
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=CLIENT_TIMEOUT) as client:
        reads = asyncio.create_task(_cluster_reads(record, client))
        try:
            members = await _members(record, spec)
        finally:
            cluster = await reads
        end = await client.statuses()
    now = utcnow()
    certificates, cert_error = _certificates(record, now)
    backup_taken, backup_error = _newest_backup(record, spec)
    errors = {
        **cluster.errors,
        **({"certificates": cert_error} if cert_error else {}),
        **({"backups": backup_error} if backup_error else {}),
    }
    return Facts(
        cluster=record.name,
        on_hosts=spec.on_hosts,
        allow_unsafe_version=spec.etcd.allow_unsafe_version,
        version=record.version,
        now=now,
        members=tuple(members),
        status_start=cluster.start,
        status_end={record.name_of(s.endpoint): s for s in end},
        member_list=cluster.member_list,
        alarms=cluster.alarms,
        hash_revision=cluster.revision,
        hashes=cluster.hashes,
        hash_errors=cluster.hash_errors,
        certificates=tuple(certificates),
        newest_backup=backup_taken,
        errors=errors,
    )


def _newest_backup(
    record: ClusterRecord, spec: ClusterSpec
) -> tuple[dt.datetime | None, str | None]:
    try:
        return newest_backup(record, spec.backup), None
    except EtcdforgeError as exc:
        return None, str(exc)


async def _cluster_reads(record: ClusterRecord, client: EtcdClient) -> ClusterReads:
    listed, alarms, statuses = await asyncio.gather(
        _attempt(client.member_list()), _attempt(client.alarms()), client.statuses()
    )
    start = {record.name_of(s.endpoint): s for s in statuses}
    revision, hashes, hash_errors = await _hashes(record, client, start)
    found = {"member_list": listed[1], "alarms": alarms[1]}
    if revision is None:
        found["hashkv"] = "no member answered a status request"
    return ClusterReads(
        start=start,
        member_list=tuple(listed[0]) if listed[0] is not None else None,
        alarms=tuple(alarms[0]) if alarms[0] is not None else None,
        revision=revision,
        hashes=hashes,
        hash_errors=hash_errors,
        errors={k: v for k, v in found.items() if v},
    )


async def _members(record: ClusterRecord, spec: ClusterSpec) -> list[MemberFacts]:
    """Each member's process and machine: over SSH for hosts (one login each), else here."""
    hosts: dict[str, Host] = {}
    failed: dict[str, str] = {}  # member -> why its host could not be logged in to
    if spec.on_hosts:
        hosts, failed = await connect_each(spec)
    owner = f"{spec.host_paths.user}:{spec.host_paths.user}" if spec.on_hosts else invoking_owner()
    try:
        async with open_runtime(record, hosts if spec.on_hosts else None) as runtime:
            work = [
                _member(record, m.name, runtime, hosts.get(m.name), failed.get(m.name), owner)
                for m in record.members
            ]
            return list(await asyncio.gather(*work))
    finally:
        await close_all(hosts)


async def _attempt(work: Awaitable[T]) -> tuple[T | None, str | None]:
    """A cluster-wide read that may fail: (result, None) or (None, why)."""
    try:
        return await work, None
    except EtcdforgeError as exc:
        return None, str(exc)


async def _member(
    record: ClusterRecord,
    name: str,
    runtime: MemberRuntime,
    host: Host | None,
    login_error: str | None,
    owner: str,
) -> MemberFacts:
    deployed = record.member(name).data_dir
    if login_error is not None:
        return member_facts(name, name, None, None, owner, deployed, error=login_error)
    label = runtime.label(name)
    try:
        running = await runtime.running_with(name)
        settings = running_settings(running) if running is not None else {}
        data_dir = data_dir_of(settings, deployed)
        if host is not None:
            probe = await probe_host(host, settings, data_dir)
        else:
            probe = await asyncio.to_thread(probe_local, settings, data_dir)
    except EtcdforgeError as exc:
        return member_facts(name, label, None, None, owner, deployed, error=str(exc))
    return member_facts(name, label, running, probe, owner, data_dir)


async def _hashes(
    record: ClusterRecord, client: EtcdClient, statuses: Mapping[str, EndpointStatus]
) -> tuple[int | None, dict[str, HashKV], dict[str, str]]:
    """Every answering member's HashKV at the lowest current revision among them (one that
    every member has applied), so equal data gives equal hashes."""
    answering = {n: s for n, s in statuses.items() if s.member_id is not None and s.revision}
    if not answering:
        return None, {}, {}
    revision = min(s.revision or 0 for s in answering.values())
    etcdctl = EtcdBinary(Path(record.binary), parse_version(record.version)).etcdctl

    async def one(name: str, status: EndpointStatus) -> HashKV:
        version = parse_version(status.version) if status.version else (0, 0, 0)
        if version >= HASHKV_GATEWAY_SINCE:
            found = await client.hash_kv(status.endpoint, revision)
            if found is not None:
                return found
        if etcdctl is None:
            raise EtcdforgeError(
                f"etcd {status.version} serves no HashKV on its JSON gateway (3.5.10+) and no "
                "etcdctl was found on this machine; install etcdctl or upgrade"
            )
        return await asyncio.to_thread(
            hashkv_with_etcdctl, etcdctl, status.endpoint, record.admin_tls, revision
        )

    names = list(answering)
    results = await asyncio.gather(*(one(n, answering[n]) for n in names), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, EtcdforgeError):
            raise result
    pairs = list(zip(names, results, strict=True))
    hashes = {n: r for n, r in pairs if isinstance(r, HashKV)}
    errors = {n: str(r) for n, r in pairs if isinstance(r, EtcdforgeError)}
    return revision, hashes, errors


def hashkv_with_etcdctl(etcdctl: Path, endpoint: str, tls: TLSFiles, revision: int) -> HashKV:
    """HashKV over gRPC with etcdctl, for members whose gateway does not serve it."""
    argv = [
        str(etcdctl),
        f"--endpoints={endpoint}",
        f"--cacert={tls.ca}",
        f"--cert={tls.cert}",
        f"--key={tls.key}",
        "--command-timeout=20s",
        "endpoint",
        "hashkv",
        f"--rev={revision}",
        "-w",
        "json",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ETCDCTL_")}
    env["ETCDCTL_API"] = "3"
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=ETCDCTL_TIMEOUT, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EtcdforgeError(f"{endpoint}: etcdctl endpoint hashkv failed ({exc})") from None
    try:
        payload = json.loads(result.stdout)[0]["HashKV"]
        return HashKV(int(payload["hash"]), int(payload.get("compact_revision", 0)), revision)
    except (ValueError, KeyError, IndexError, TypeError):
        reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise EtcdforgeError(f"{endpoint}: etcdctl endpoint hashkv: {reason[0]}") from None


def _certificates(record: ClusterRecord, now: dt.datetime) -> tuple[list[CertRow], str | None]:
    try:
        entries = state_entries(record)
    except EtcdforgeError as exc:
        return [], str(exc)
    return [check_entry(e, DEFAULT_WARN_WITHIN, now) for e in entries], None
