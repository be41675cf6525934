"""Members of a host cluster joining and leaving: their host's files and unit.

A joining host gets exactly what `apply` installs on any member (`ops.host_steps`: user, release,
directories, its own keys, the environment file, the unit), except that its environment file
says initial-cluster-state existing and lists the live members; `apply`'s files phase later
rewrites every member's environment file to name the final member list, which needs no restart
(etcd reads those settings only when a member bootstraps or joins).

A host that leaves has its unit stopped and disabled and its data dir renamed aside
(`/var/lib/etcd.removed-<time>`), or deleted with `--purge-data` (only if its environment file
carries this cluster's token). A host that cannot be reached is skipped with a warning: etcd
refuses a removed member's ID, so it cannot rejoin by itself.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

from etcdforge import release as releases
from etcdforge.errors import EtcdforgeError
from etcdforge.host_logins import target_for
from etcdforge.hosts import Host, SSHHost, last_line
from etcdforge.layout import StateLayout
from etcdforge.ops.certs import member_pki_steps
from etcdforge.ops.desired import desired
from etcdforge.ops.host_steps import host_steps
from etcdforge.ops.plan import SILENT, Progress, execute, execute_async
from etcdforge.ops.preflight import HostFacts
from etcdforge.ops.target import deployed_spec
from etcdforge.record import ClusterRecord, MemberRecord
from etcdforge.services import systemd
from etcdforge.spec import ClusterSpec, HostPathsSpec

_SET_ASIDE = r"""
dir=$1 stamp=$2 purge=$3 env=$4 token=$5
[ -e "$dir" ] || exit 0
if [ "$purge" = yes ]; then
  found=$(sed -n 's/^ETCD_INITIAL_CLUSTER_TOKEN=//p' "$env" 2>/dev/null)
  if [ "$found" != "$token" ]; then
    echo "$dir is not this cluster's data (token ${found:-none}); not deleting it" >&2
    exit 3
  fi
  rm -rf -- "$dir"
else
  mv -- "$dir" "$dir.removed-$stamp"
fi
"""


@dataclass
class HostProvisioner:
    """`ops.membership.Provisioner` for members on hosts. `hosts` are the spec's members'
    logins; `leaving` the logins of recorded members the spec moved or dropped (by name)."""

    spec: ClusterSpec
    layout: StateLayout
    release: releases.Release
    token: str
    hosts: Mapping[str, Host]
    facts: Mapping[str, HostFacts]
    leaving: Mapping[str, tuple[Host, HostPathsSpec]]
    progress: Progress = SILENT

    def data_dir(self, name: str) -> str:
        return str(self.spec.host_paths.data_dir)

    async def has_data(self, name: str) -> bool:
        member_dir = f"{self.spec.host_paths.data_dir}/member"
        return (await self.hosts[name].run(["test", "-d", member_dir], check=False)).code == 0

    async def provision(self, name: str, token: str, initial_cluster: str) -> None:
        member = self.spec.member(name)
        host = self.hosts[name]
        execute(member_pki_steps(self.spec, self.layout, member), self.progress, where="admin")
        want = desired(
            self.spec,
            self.layout,
            member,
            token,
            "existing",
            initial_cluster=initial_cluster,
            version=self.release.version,  # the settings apply renders: no restart after joining
        )
        steps = host_steps(self.spec, host, self.facts[name], self.release, want)
        await execute_async(steps, self.progress, where=host.label)

    async def retire(self, member: MemberRecord, purge_data: bool) -> str | None:
        found = self._home(member)
        if found is None:
            return (
                f"member {member.name} ({member.peer_url}) left the cluster, but its host could "
                "not be reached: its etcd was not stopped and its data stays (etcd refuses a "
                "removed member, so it cannot rejoin); switch it off by hand"
            )
        host, paths = found
        # Rebuilt in place (`member replace` on the same host): stopped, not disabled, since the
        # new member starts there at once; a member that leaves for good is disabled too.
        await systemd.switch_off(host, systemd.unit_name(paths), disable=not self._rebuilt(member))
        args = [str(paths.data_dir), time.strftime("%Y%m%dT%H%M%S")]
        args += ["yes" if purge_data else "no", str(systemd.env_file(paths)), self.token]
        result = await host.run(["sh", "-c", _SET_ASIDE, "sh", *args], check=False)
        if result.code != 0:
            return f"{host.label}: {last_line(result.err) or 'could not set the data dir aside'}"
        return None

    def _rebuilt(self, member: MemberRecord) -> bool:
        wanted = next((m for m in self.spec.members if m.name == member.name), None)
        return wanted is not None and wanted.peer_url == member.peer_url

    def _home(self, member: MemberRecord) -> tuple[Host, HostPathsSpec] | None:
        """The host a recorded member ran on: the spec's, unless the spec moved or dropped it."""
        if self._rebuilt(member):
            return self.hosts[member.name], self.spec.host_paths
        return self.leaving.get(member.name)


def leaving_members(spec: ClusterSpec, record: ClusterRecord) -> list[str]:
    """Recorded members the spec no longer has at the same address (dropped, or rebuilt)."""
    wanted = {(m.name, m.peer_url) for m in spec.members}
    return [m.name for m in record.members if (m.name, m.peer_url) not in wanted]


async def connect_leaving(
    spec: ClusterSpec, record: ClusterRecord
) -> tuple[dict[str, tuple[Host, HostPathsSpec]], list[str]]:
    """Log in to the hosts of members on their way out, as deployed; unreachable ones are
    skipped with a warning (a lost host is the usual reason to replace a member)."""
    names = leaving_members(spec, record)
    if not names:
        return {}, []
    deployed = deployed_spec(record)
    found: dict[str, tuple[Host, HostPathsSpec]] = {}
    warnings = []
    for name in names:
        target = target_for(deployed.member(name))
        try:
            found[name] = (await SSHHost.connect(target), deployed.host_paths)
        except EtcdforgeError as exc:
            warnings.append(f"{target.label} is not reachable ({exc}); skipping it")
    return found, warnings
