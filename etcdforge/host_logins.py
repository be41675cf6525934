"""Logging in to a cluster's hosts: each member's `ssh` section as a connected `Host`.

Kept beside `hosts` rather than in an operation: `apply`, `reset`, restores, the member runtime and
the kubeadm hand-off all log in the same way, and all close every connection they opened.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from etcdforge.errors import EtcdforgeError, SpecError
from etcdforge.hosts import Host, SSHHost, SSHTarget, fan_out

if TYPE_CHECKING:
    from etcdforge.spec import ClusterSpec, MemberSpec, SSHSpec


def ssh_target(label: str, host: str, ssh: SSHSpec) -> SSHTarget:
    """An `ssh` section (a member's, or a control plane's from the command line) as a login."""
    return SSHTarget(
        label=label,
        host=host,
        port=ssh.port,
        user=ssh.user,
        identity_file=ssh.identity_file.expanduser() if ssh.identity_file else None,
        known_hosts=ssh.known_hosts.expanduser() if ssh.known_hosts else None,
        sudo=ssh.sudo,
        connect_timeout=ssh.connect_timeout,
    )


def target_for(member: MemberSpec) -> SSHTarget:
    ssh = member.ssh
    if ssh is None:
        raise SpecError(f"member {member.name} has no ssh section; `apply` deploys to hosts")
    host = ssh.host or member.address
    return ssh_target(f"{member.name} ({host})", host, ssh)


async def connect_all(spec: ClusterSpec) -> dict[str, Host]:
    """Log in to every host in parallel; on any failure, close the others and raise."""
    hosts: dict[str, Host] = {}

    async def one(member: MemberSpec) -> None:
        hosts[member.name] = await SSHHost.connect(target_for(member))

    try:
        await fan_out(spec.members, lambda m: target_for(m).label, one)
    except BaseException:
        await close_all(hosts)
        raise
    return {m.name: hosts[m.name] for m in spec.members}


async def close_all(hosts: dict[str, Host]) -> None:
    await asyncio.gather(*(h.close() for h in hosts.values()), return_exceptions=True)


async def connect_each(spec: ClusterSpec) -> tuple[dict[str, Host], dict[str, str]]:
    """Log in to every host in parallel, keeping going past failures: a read-only audit reports
    an unreachable host as a finding instead of stopping. Returns (hosts, member -> error)."""

    async def one(member: MemberSpec) -> Host:
        return await SSHHost.connect(target_for(member))

    results = await asyncio.gather(*(one(m) for m in spec.members), return_exceptions=True)
    pairs = list(zip(spec.members, results, strict=True))
    hosts = {m.name: r for m, r in pairs if isinstance(r, Host)}
    unexpected = [r for _, r in pairs if isinstance(r, BaseException)]
    unexpected = [r for r in unexpected if not isinstance(r, EtcdforgeError)]
    if unexpected:
        await close_all(hosts)
        raise unexpected[0]
    errors = {m.name: str(r) for m, r in pairs if isinstance(r, EtcdforgeError)}
    return hosts, errors
