"""Preflight: is every host fit for the change? Checked on all hosts before any host is touched.

One read-only probe per host (a single shell script, so a host costs one round trip after login)
gathers what the checks need; the checks themselves are pure functions of that probe, so each
refusal is one line naming the host and the fix. Time is compared with the admin machine's clock
around the probe, because certificates are issued here and backdated by only 5 minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum

from etcdforge.errors import PreflightError
from etcdforge.hosts import CommandResult, Host, last_line
from etcdforge.services.systemd import UnitState, env_file, parse_show, show_script
from etcdforge.spec import HostPathsSpec, MemberSpec

MAX_CLOCK_SKEW = 60.0
MIN_FREE_DATA = 1 << 30  # a fresh member preallocates ~123 MB of WAL; leave room to grow
MIN_FREE_RELEASES = 256 << 20  # one release unpacked is ~60 MB

_PROBE_TEMPLATE = r"""
data=$1 releases=$2 envfile=$3 unit=$4
echo "uid=$(id -u)"
echo "arch=$(uname -m)"
command -v systemctl >/dev/null && echo "systemd=yes" || echo "systemd=no"
echo "time=$(date +%s.%N)"
free() {
  d=$1; while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done
  df -Pk -- "$d" | awk 'NR==2 {print $4}'
}
echo "free_data=$(free "$data")"
echo "free_releases=$(free "$releases")"
[ -d "$data/member" ] && echo "data_member=yes" || echo "data_member=no"
if [ -f "$envfile" ]; then
  echo "env_token=$(sed -n 's/^ETCD_INITIAL_CLUSTER_TOKEN=//p' "$envfile")"
fi
{show_unit}
{show_distro}
echo "listeners<<"
ss -Htlnp 2>/dev/null
echo ">>"
"""
_PROBE = _PROBE_TEMPLATE.replace("{show_unit}", show_script('"$unit"', "unit_")).replace(
    "{show_distro}", show_script("etcd.service", "distro_")
)


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pid: int | None
    process: str


class DataDirOwner(Enum):
    NONE = "none"  # no member data: free to use
    THIS_CLUSTER = "this cluster"
    OTHER = "another cluster"


def data_dir_owner(has_member: bool, env_token: str | None, token: str | None) -> DataDirOwner:
    """Whose data is in a host's data dir: the one rule preflight and reset both apply.

    etcdforge's environment file beside the data names the cluster token it was created with; a
    data dir without it, or with another token, is never ours to start on or to delete.
    """
    if not has_member:
        return DataDirOwner.NONE
    if token is not None and env_token == token:
        return DataDirOwner.THIS_CLUSTER
    return DataDirOwner.OTHER


def foreign_data(label: str, data_dir: object, env_token: str | None, fix: str) -> PreflightError:
    whose = f"token {env_token}" if env_token else "no etcdforge configuration here"
    return PreflightError(
        f"{label}: {data_dir} already holds an etcd member of another cluster ({whose}); {fix}"
    )


@dataclass(frozen=True)
class HostFacts:
    """What the probe found on one host, parsed once; read by the checks and by `apply`'s plan."""

    uid: str
    arch: str
    has_systemd: bool
    free_data: int  # bytes
    free_releases: int
    has_member_data: bool
    env_token: str | None
    unit: UnitState
    distro: UnitState  # the distribution's etcd.service
    listeners: tuple[Listener, ...]
    skew: float

    def foreign_unit(self, paths: HostPathsSpec) -> bool:
        """A unit of our name loaded from another file (the distribution's etcd.service)."""
        return bool(self.unit.fragment) and self.unit.fragment != str(paths.unit)

    def data_owner(self, token: str | None) -> DataDirOwner:
        return data_dir_owner(self.has_member_data, self.env_token, token)


def parse_listeners(text: str) -> list[Listener]:
    """`ss -Htlnp` lines: State Recv-Q Send-Q Local:Port Peer:Port users:(("name",pid=N,...))."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        local = parts[3]
        address, _, port = local.rpartition(":")
        if not port.isdigit():
            continue
        users = " ".join(parts[5:])
        pid = None
        process = "unknown process"
        if "pid=" in users:
            process = users.split('"')[1] if '"' in users else process
            pid = int(users.split("pid=", 1)[1].split(",")[0].rstrip(")"))
        found.append(Listener(address.strip("[]").split("%")[0], int(port), pid, process))
    return found


def parse_probe(text: str, before: float, after: float) -> HostFacts:
    """The probe's output as facts; `before`/`after` bracket the probe on this machine's clock."""
    head, _, rest = text.partition("listeners<<\n")
    values = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
    try:
        skew = float(values.get("time", "nan")) - (before + after) / 2
    except ValueError:
        skew = float("nan")
    return HostFacts(
        uid=values.get("uid", ""),
        arch=values.get("arch", ""),
        has_systemd=values.get("systemd") == "yes",
        free_data=int(values.get("free_data", "0") or 0) * 1024,
        free_releases=int(values.get("free_releases", "0") or 0) * 1024,
        has_member_data=values.get("data_member") == "yes",
        env_token=values.get("env_token"),
        unit=parse_show(head, prefix="unit_"),
        distro=parse_show(head, prefix="distro_"),
        listeners=tuple(parse_listeners(rest.partition(">>")[0])),
        skew=skew,
    )


def probe_failure(host: Host, result: CommandResult) -> PreflightError:
    """Why a read-only probe failed; most often sudo asking for a password."""
    reason = last_line(result.err) or f"exit {result.code}"
    if "password" in reason or "sudoers" in reason or "sudo" in reason:
        return PreflightError(
            f"{host.label}: sudo does not work without a password ({reason}); allow "
            "passwordless sudo for the ssh user, or log in as root"
        )
    return PreflightError(f"{host.label}: cannot inspect the host ({reason})")


async def probe(host: Host, paths: HostPathsSpec) -> HostFacts:
    """Log in (sudo included) and read the host's state; raises if sudo does not work."""
    args = [str(paths.data_dir), str(paths.releases_dir), str(env_file(paths)), paths.unit.name]
    before = time.time()
    result = await host.run(["sh", "-c", _PROBE, "sh", *args], check=False)
    after = time.time()
    if result.code != 0:
        raise probe_failure(host, result)
    return parse_probe(result.out, before, after)


def check(
    host: Host,
    member: MemberSpec,
    paths: HostPathsSpec,
    facts: HostFacts,
    token: str | None,
    takeover_pid: int | None = None,
) -> None:
    """Refuse a host that would break or be broken by the change; the message names the fix.

    `takeover_pid`: an adopted member's etcd, still under its own unit, that the change takes
    over: the ports it holds and the data dir it runs on are this member's.
    """
    label = host.label
    if facts.uid != "0":
        raise PreflightError(
            f"{label}: commands do not run as root (uid {facts.uid}); set ssh.become: "
            "true with passwordless sudo, or log in as root"
        )
    if not facts.has_systemd:
        raise PreflightError(f"{label}: no systemctl here; etcdforge needs a systemd host")
    if facts.arch != "x86_64":
        raise PreflightError(
            f"{label}: architecture {facts.arch} is not x86_64 (linux-amd64 releases)"
        )
    if not abs(facts.skew) <= MAX_CLOCK_SKEW:
        raise PreflightError(
            f"{label}: clock differs from this machine's by {facts.skew:+.0f} s (limit "
            f"{MAX_CLOCK_SKEW:.0f} s); fix NTP on the host (certificates would not be valid yet)"
        )
    for free, minimum, where in (
        (facts.free_data, MIN_FREE_DATA, paths.data_dir),
        (facts.free_releases, MIN_FREE_RELEASES, paths.releases_dir),
    ):
        if free < minimum:
            raise PreflightError(
                f"{label}: only {free >> 20} MiB free for {where} (need {minimum >> 20} MiB); "
                "free some space or move host_paths"
            )
    _check_ports(label, member, paths, facts, takeover_pid)
    if takeover_pid is None and facts.data_owner(token) is DataDirOwner.OTHER:
        raise foreign_data(
            label,
            paths.data_dir,
            facts.env_token,
            "move it away, or `etcdforge reset --purge-data` if it is this cluster's",
        )


def _check_ports(
    label: str,
    member: MemberSpec,
    paths: HostPathsSpec,
    facts: HostFacts,
    takeover_pid: int | None = None,
) -> None:
    unit = facts.unit
    ours = unit.main_pid if unit.running and not facts.foreign_unit(paths) else takeover_pid
    for port in (member.client_port, member.peer_port):
        for listener in facts.listeners:
            if listener.port != port or listener.address not in (
                member.address,
                "0.0.0.0",
                "*",
                "::",
            ):
                continue
            if ours is not None and listener.pid == ours:
                continue
            owner = (
                f"{listener.process} (pid {listener.pid})" if listener.pid else "another process"
            )
            raise PreflightError(
                f"{label}: port {port} on {listener.address} is taken by {owner}; stop it or "
                "give the member other ports in the spec"
            )
