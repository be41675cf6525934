"""What a kill sweep checks on a cluster: members healthy, and nothing left behind.

`LocalTarget` is a cluster started by `up` (tests.helpers.LocalCluster); `HostsTarget` one on
fleet hosts (tests.fleet). "Left behind" means what a killed run may leave and its rerun must
clear: an etcd that is not the member's recorded process (orphaned between launch and pid file,
or a second one on the same data dir), helpers still running (etcdctl/etcdutl on our files), and
temp files of atomic writes, snapshots, restores and release unpacking.
"""

from __future__ import annotations

import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.helpers import LocalCluster
from tests.killsweep import SweepReport
from tests.load import WriteLoad, tls_context

#: mkstemp's `.NAME.XXXXXXXX` (fsutil.write_temp) and the suffixes of snapshots and restores.
LOCAL_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}$|\.part$|\.restoring$|\.pre-migrate$")
HEALTH_TIMEOUT = 3.0


def _health(endpoints: Sequence[str], context: ssl.SSLContext, names: Sequence[str]) -> list[str]:
    found = []
    with httpx.Client(verify=context, timeout=HEALTH_TIMEOUT) as client:
        for name, endpoint in zip(names, endpoints, strict=True):
            try:
                response = client.get(f"{endpoint}/health")
                healthy = response.status_code == 200 and response.json().get("health") == "true"
                why = "" if healthy else f"{response.status_code} {response.text.strip()}"
            except (httpx.HTTPError, ValueError) as exc:
                why = f"{exc.__class__.__name__}: {exc}"
            if why:
                found.append(f"{name} ({endpoint}): {why}")
    return found


def command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return []
    return [] if state == "Z" else [p.decode(errors="replace") for p in raw.split(b"\0") if p]


@dataclass
class LocalTarget:
    """A local cluster; `running`: whether its members should run after the command."""

    cluster: LocalCluster
    running: bool = True

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{m['address']}:2379" for m in self.cluster.data["members"]]

    @property
    def names(self) -> list[str]:
        return [m["name"] for m in self.cluster.data["members"]]

    def admin_files(self) -> tuple[Path, Path, Path]:
        pki = self.cluster.state_dir / "pki"
        return pki / "ca.crt", pki / "admin.crt", pki / "admin.key"

    def unhealthy(self) -> list[str]:
        return _health(self.endpoints, tls_context(*self.admin_files()), self.names)

    def leftovers(self) -> list[str]:
        return self.stray_processes() + self.temp_files()

    def member_pids(self) -> dict[int, str]:
        """The recorded PID of each member whose process runs: the only etcds that may."""
        found = {}
        for name in self.names:
            files = self.cluster.state_dir / "members" / name
            try:
                pid = int((files / "etcd.pid").read_text().strip())
            except (FileNotFoundError, ValueError):
                continue
            if f"--data-dir={files / 'data'}" in command_line(pid):
                found[pid] = name
        return found

    def stray_processes(self) -> list[str]:
        allowed = self.member_pids() if self.running else {}
        root = str(self.cluster.state_dir)
        strays = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) in (os.getpid(), *allowed):
                continue
            argv = command_line(int(entry.name))
            if any(root in arg for arg in argv):
                strays.append(f"pid {entry.name}: {' '.join(argv)[:200]}")
        if self.running and len(allowed) != len(self.names):
            missing = sorted(set(self.names) - set(allowed.values()))
            strays.append(f"no recorded etcd process for {', '.join(missing)}")
        return strays

    def temp_files(self) -> list[str]:
        found = []
        for directory, dirs, files in os.walk(self.cluster.state_dir):
            here = Path(directory)
            dirs[:] = [d for d in dirs if not _data_dir(here / d)]
            found += [str(here / n) for n in [*files, *dirs] if LOCAL_TEMP.search(n)]
        return found


def _data_dir(path: Path) -> bool:
    """A member's data dir: etcd's own files, not ours to judge (a restore's aside copy is)."""
    return path.parent.parent.name == "members" and path.name == "data"


#: On a host: etcds other than the unit's main process, snapshot helpers, and temp files of
#: atomic writes (`.NAME.XXXXXX`), release unpacking and restores. $1: the unit; $2: 1 if the
#: member should run.
_HOST_LEFTOVERS = r"""
main=$(systemctl show -p MainPID --value "$1" 2>/dev/null || echo 0)
for pid in $(pgrep -x etcd); do
  if [ "$2" != 1 ] || [ "$pid" != "$main" ]; then
    unit=$(systemctl show -p ActiveState,SubState,UnitFileState,FragmentPath --value "$1" | tr '\n' ' ')
    echo "etcd pid $pid (unit: MainPID $main, $unit)"
  fi
done
for pid in $(pgrep -x etcdutl; pgrep -x etcdctl); do echo "helper pid $pid: $(tr '\0' ' ' < /proc/$pid/cmdline)"; done
find /etc/etcd /etc/systemd/system /var/lib /opt/etcd /usr/local/bin -maxdepth 2 \
  \( -name '.*.??????' -o -name '.incoming-*' -o -name '.unpack.*' -o -name '*.broken' \
     -o -name '.etcd.snapshot-*' -o -name '*.restoring' -o -name '*.pre-migrate' -o -name '*.tmp' \) \
  2>/dev/null | sed 's/^/file /'
exit 0
"""


@dataclass
class HostsTarget:
    """A cluster on fleet hosts (tests.fleet.Host), admin files in `state_dir`."""

    hosts: Sequence[Any]  # tests.fleet.Host
    state_dir: Path
    running: bool = True
    unit: str = "etcd.service"

    @property
    def endpoints(self) -> list[str]:
        return [f"https://{h.address}:2379" for h in self.hosts]

    def admin_files(self) -> tuple[Path, Path, Path]:
        pki = self.state_dir / "pki"
        return pki / "ca.crt", pki / "admin.crt", pki / "admin.key"

    def unhealthy(self) -> list[str]:
        names = [h.name for h in self.hosts]
        context = tls_context(*self.admin_files())
        context.check_hostname = False  # fleet certificates name addresses, not host names
        return _health(self.endpoints, context, names)

    def leftovers(self) -> list[str]:
        found = []
        flag = "1" if self.running else "0"
        for host in self.hosts:
            out = host.run("sh", "-c", _HOST_LEFTOVERS, "sh", self.unit, flag, check=False)
            found += [f"{host.name}: {line}" for line in out.stdout.splitlines() if line.strip()]
        return found


def write_load(target: LocalTarget, prefix: str) -> WriteLoad:
    """The writer a local sweep runs under (every acknowledged write is read back at the end)."""
    return WriteLoad(target.endpoints, target.admin_files(), prefix, reload=True)


def require_passed(report: SweepReport) -> None:
    print(report.summary())
    assert report.ok, report.details()
