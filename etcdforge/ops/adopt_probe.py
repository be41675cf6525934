"""Reading a host the way `adopt` needs it: two read-only scripts, parsed by pure functions.

First the etcd process (the runbook's `etcd.service`'s main process, else any `etcd`): its command
line and environment, its binary and version, the unit that runs it and the units that unit names
but systemd does not know, and the host's established TCP connections. Then the files its flags
name (certificates, keys, the CA key and client pair the runbook copies beside the CA) and
whether its data dir holds a member. Nothing on the host changes.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import replace

from etcdforge.adopt_model import (
    HostReading,
    nul_list,
    parse_connections,
    wanted_files,
)
from etcdforge.hosts import Host
from etcdforge.ops.preflight import probe_failure

RUNBOOK_UNIT = "etcd.service"

_PROCESS = r"""
pid=$(systemctl show -p MainPID --value -- "$1" 2>/dev/null)
case "$pid" in ''|0) pid=$(pgrep -xo etcd 2>/dev/null || true) ;; esac
echo "pid=$pid"
if [ -n "$pid" ]; then
  unit=$(sed -n 's|^[0-9]*:[^:]*:.*/\([^/]*\.service\)$|\1|p' /proc/"$pid"/cgroup | head -n 1)
  echo "unit=$unit"
  echo "exe=$(readlink /proc/"$pid"/exe)"
  echo "version=$(/proc/"$pid"/exe --version 2>/dev/null | sed -n 's/^etcd Version: //p')"
  echo "cmdline=$(base64 -w0 < /proc/"$pid"/cmdline)"
  echo "environ=$(base64 -w0 < /proc/"$pid"/environ)"
  if [ -n "$unit" ]; then
    path=$(systemctl show -p FragmentPath --value -- "$unit")
    echo "unit_path=$path"
    if [ -f "$path" ]; then
      echo "unit_text=$(base64 -w0 < "$path")"
      for dep in $(sed -n 's/^[[:space:]]*\(After\|Wants\|Requires\)=//p' "$path"); do
        state=$(systemctl show -p LoadState --value -- "$dep")
        [ "$state" = not-found ] && echo "unknown_unit=$dep"
      done
    fi
  fi
fi
echo "connections<<"
ss -Htnp 2>/dev/null
echo ">>"
"""

_FILES = r"""
data=$1; shift
[ -d "$data/member" ] && echo "member_data=yes"
for path in "$@"; do
  if [ -f "$path" ]; then printf 'file\t%s\t%s\n' "$path" "$(base64 -w0 < "$path")"
  else printf 'missing\t%s\n' "$path"; fi
done
"""


def parse_process(label: str, text: str) -> HostReading:
    head, _, rest = text.partition("connections<<\n")
    values: dict[str, str] = {}
    unknown: list[str] = []
    for line in head.splitlines():
        key, sep, value = line.partition("=")
        if key == "unknown_unit" and value not in unknown:
            unknown.append(value)
        elif sep:
            values[key] = value
    pid = values.get("pid", "")
    environ = dict(e.split("=", 1) for e in nul_list(values.get("environ", "")) if "=" in e)
    return HostReading(
        label=label,
        pid=int(pid) if pid.isdigit() else None,
        unit=values.get("unit", ""),
        unit_path=values.get("unit_path", ""),
        unit_text=base64.b64decode(values.get("unit_text", "")).decode(errors="replace"),
        unknown_units=tuple(unknown),
        argv=tuple(nul_list(values.get("cmdline", ""))),
        environ=environ,
        exe=values.get("exe", ""),
        version=values.get("version", ""),
        connections=parse_connections(rest.partition(">>")[0]),
    )


def parse_files(text: str) -> tuple[bool, dict[str, bytes | None]]:
    files: dict[str, bytes | None] = {}
    member_data = False
    for line in text.splitlines():
        parts = line.split("\t")
        if parts[0] == "member_data=yes":
            member_data = True
        elif parts[0] == "file" and len(parts) == 3:
            files[parts[1]] = base64.b64decode(parts[2])
        elif parts[0] == "missing" and len(parts) == 2:
            files[parts[1]] = None
    return member_data, files


async def read_host(host: Host, extra_files: Sequence[str] = ()) -> HostReading:
    """The etcd member on `host` as it runs now; `extra_files` are read along (recorded keys)."""
    result = await host.run(["sh", "-c", _PROCESS, "sh", RUNBOOK_UNIT], check=False)
    if result.code != 0:
        raise probe_failure(host, result)
    reading = parse_process(host.label, result.out)
    if reading.pid is None:
        return reading
    paths = list(dict.fromkeys([*wanted_files(reading), *extra_files]))
    data_dir = reading.settings.get("data-dir") or "/nonexistent"
    result = await host.run(["sh", "-c", _FILES, "sh", data_dir, *paths])
    member_data, files = parse_files(result.out)
    return replace(reading, files=files, has_member_data=member_data)
