"""etcd as a systemd service on a host: the unit, and what the running process really uses.

The unit never holds etcd settings: they live in an `ETCD_*` EnvironmentFile rendered from the
same settings dict as the local cluster's flags (`render.as_env_file`), so the unit is the same on
every member. Whether a running member needs a restart is decided from the live process, not from
what this run happened to write: `/proc/PID/environ` shows the settings it started with and
`/proc/PID/exe` the release it runs. So an `apply` killed between writing a file and restarting
still restarts on the next run, and a converged cluster is never restarted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import PurePosixPath

from etcdforge.hosts import Host, last_line
from etcdforge.spec import HostPathsSpec

FINGERPRINT_VAR = "ETCDFORGE_UNIT"
RESTART_TIMEOUT = 120.0


def env_file(paths: HostPathsSpec) -> PurePosixPath:
    return PurePosixPath(paths.config_dir) / "etcd.env"


def unit_name(paths: HostPathsSpec) -> str:
    return paths.unit.name


def render_unit(paths: HostPathsSpec, cluster: str, member: str, extra: bytes = b"") -> str:
    """The unit file; `extra` (the CA certificates) joins its fingerprint, since etcd re-reads
    its own certificates on every handshake but its trusted CAs only at start."""
    body = f"""\
# Rendered by etcdforge; edit the cluster spec, not this file.
[Unit]
Description=etcd member {member} of cluster {cluster} (managed by etcdforge)
Documentation=https://etcd.io/docs/
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
User={paths.user}
Group={paths.user}
EnvironmentFile={env_file(paths)}
Environment={FINGERPRINT_VAR}=@FINGERPRINT@
ExecStart={PurePosixPath(paths.bin_dir) / "etcd"}
Restart=on-failure
RestartSec=5s
TimeoutStartSec=120s
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
"""
    fingerprint = hashlib.sha256(body.encode() + extra).hexdigest()[:16]
    return body.replace("@FINGERPRINT@", fingerprint)


def env_pairs(text: str) -> dict[str, str]:
    """KEY=VALUE lines of an environment file (comments and blanks skipped)."""
    pairs = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            pairs[key.strip()] = value
    return pairs


def unit_fingerprint(unit_text: str) -> str | None:
    for line in unit_text.splitlines():
        if line.startswith(f"Environment={FINGERPRINT_VAR}="):
            return line.split("=", 2)[2]
    return None


@dataclass(frozen=True)
class UnitState:
    active: str  # active, inactive, failed, activating, ...
    enabled: str  # enabled, disabled, masked, "" when there is no unit file
    main_pid: int
    fragment: str  # the unit file systemd loaded
    need_reload: bool

    @property
    def running(self) -> bool:
        return self.active in ("active", "activating", "reloading") and self.main_pid > 0


async def unit_state(host: Host, name: str) -> UnitState:
    props = "ActiveState,UnitFileState,MainPID,FragmentPath,NeedDaemonReload"
    result = await host.run(["systemctl", "show", "-p", props, "--", name])
    values = dict(line.split("=", 1) for line in result.out.splitlines() if "=" in line)
    return UnitState(
        active=values.get("ActiveState", ""),
        enabled=values.get("UnitFileState", ""),
        main_pid=int(values.get("MainPID", "0") or 0),
        fragment=values.get("FragmentPath", ""),
        need_reload=values.get("NeedDaemonReload", "no") == "yes",
    )


@dataclass(frozen=True)
class Running:
    """What a live etcd process was started with."""

    pid: int
    environ: dict[str, str]
    exe: str


async def running_process(host: Host, state: UnitState) -> Running | None:
    if not state.running:
        return None
    pid = state.main_pid
    script = 'cat /proc/"$1"/environ && printf "\\0EXE=" && readlink /proc/"$1"/exe'
    result = await host.run(["sh", "-c", script, "sh", str(pid)], check=False)
    if result.code != 0:
        return None  # exited between the two calls
    entries = result.stdout.decode(errors="replace").split("\0")
    environ = dict(e.split("=", 1) for e in entries if "=" in e)
    exe = environ.pop("EXE", "").strip()
    return Running(pid, environ, exe)


def restart_reasons(
    running: Running, env_text: str, unit_text: str, version_dir: PurePosixPath
) -> list[str]:
    """Why the live process differs from what the files now say; empty means leave it alone."""
    reasons = []
    wanted = env_pairs(env_text)
    changed = sorted(k for k, v in wanted.items() if running.environ.get(k) != v)
    stale = sorted(k for k in running.environ if k.startswith("ETCD_") and k not in wanted)
    if changed or stale:
        reasons.append("settings " + ", ".join(changed + stale))
    if running.environ.get(FINGERPRINT_VAR) != unit_fingerprint(unit_text):
        reasons.append("unit or CA certificates")
    if running.exe != str(version_dir / "etcd"):
        reasons.append(f"binary {running.exe or '?'} -> {version_dir / 'etcd'}")
    return reasons


async def journal_tail(host: Host, name: str, lines: int = 1) -> str:
    result = await host.run(
        ["journalctl", "-u", name, "-n", str(lines), "-o", "cat", "--no-pager"], check=False
    )
    return last_line(result.out) if result.code == 0 else ""
