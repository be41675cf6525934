"""Preflight: is every host fit for the change? Checked on all hosts before any host is touched.

One read-only probe per host (a single shell script, so a host costs one round trip after login)
gathers what the checks need; the checks themselves are pure functions of that probe, so each
refusal is one line naming the host and the fix. Time is compared with the admin machine's clock
around the probe, because certificates are issued here and backdated by only 5 minutes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from etcdforge.errors import PreflightError
from etcdforge.hosts import CommandResult, Host, last_line
from etcdforge.services.systemd import env_file
from etcdforge.spec import HostPathsSpec, MemberSpec

MAX_CLOCK_SKEW = 60.0
MIN_FREE_DATA = 1 << 30  # a fresh member preallocates ~123 MB of WAL; leave room to grow
MIN_FREE_RELEASES = 256 << 20  # one release unpacked is ~60 MB

_PROBE = r"""
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
systemctl show -p MainPID -p ActiveState -p UnitFileState -p FragmentPath -- "$unit" \
  | sed 's/^/unit_/'
systemctl show -p ActiveState -p UnitFileState -p FragmentPath -- etcd.service | sed 's/^/distro_/'
echo "listeners<<"
ss -Htlnp 2>/dev/null
echo ">>"
"""


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    pid: int | None
    process: str


@dataclass(frozen=True)
class HostFacts:
    """What the probe found on one host; read by the checks and by `apply`'s plan."""

    values: dict[str, str]
    listeners: tuple[Listener, ...]
    skew: float

    @property
    def unit_pid(self) -> int:
        return int(self.values.get("unit_MainPID", "0") or 0)

    @property
    def unit_active(self) -> bool:
        return self.values.get("unit_ActiveState", "") in ("active", "activating", "reloading")

    @property
    def unit_fragment(self) -> str:
        return self.values.get("unit_FragmentPath", "")

    @property
    def unit_enabled(self) -> str:
        return self.values.get("unit_UnitFileState", "")

    def foreign_unit(self, paths: HostPathsSpec) -> bool:
        """A unit of our name loaded from another file (the distribution's etcd.service)."""
        return bool(self.unit_fragment) and self.unit_fragment != str(paths.unit)

    @property
    def env_token(self) -> str | None:
        return self.values.get("env_token")


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


def _parse(text: str) -> tuple[dict[str, str], list[Listener]]:
    head, _, rest = text.partition("listeners<<\n")
    listeners_text = rest.partition(">>")[0]
    values = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
    return values, parse_listeners(listeners_text)


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
    values, listeners = _parse(result.out)
    try:
        skew = float(values.get("time", "nan")) - (before + after) / 2
    except ValueError:
        skew = float("nan")
    return HostFacts(values, tuple(listeners), skew)


def check(
    host: Host,
    member: MemberSpec,
    paths: HostPathsSpec,
    facts: HostFacts,
    token: str | None,
) -> None:
    """Refuse a host that would break or be broken by the change; the message names the fix."""
    label = host.label
    values = facts.values
    if values.get("uid") != "0":
        raise PreflightError(
            f"{label}: commands do not run as root (uid {values.get('uid')}); set ssh.become: "
            "true with passwordless sudo, or log in as root"
        )
    if values.get("systemd") != "yes":
        raise PreflightError(f"{label}: no systemctl here; etcdforge needs a systemd host")
    if values.get("arch") != "x86_64":
        raise PreflightError(
            f"{label}: architecture {values.get('arch')} is not x86_64 (linux-amd64 releases)"
        )
    if not abs(facts.skew) <= MAX_CLOCK_SKEW:
        raise PreflightError(
            f"{label}: clock differs from this machine's by {facts.skew:+.0f} s (limit "
            f"{MAX_CLOCK_SKEW:.0f} s); fix NTP on the host (certificates would not be valid yet)"
        )
    for key, minimum, where in (
        ("free_data", MIN_FREE_DATA, paths.data_dir),
        ("free_releases", MIN_FREE_RELEASES, paths.releases_dir),
    ):
        free = int(values.get(key, "0") or 0) * 1024
        if free < minimum:
            raise PreflightError(
                f"{label}: only {free >> 20} MiB free for {where} (need {minimum >> 20} MiB); "
                "free some space or move host_paths"
            )
    ours = facts.unit_pid if facts.unit_active and not facts.foreign_unit(paths) else None
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
    if values.get("data_member") == "yes" and (token is None or facts.env_token != token):
        whose = f"token {facts.env_token}" if facts.env_token else "no etcdforge configuration here"
        raise PreflightError(
            f"{label}: {paths.data_dir} already holds an etcd member of another cluster "
            f"({whose}); move it away, or `etcdforge reset --purge-data` if it is this cluster's"
        )
