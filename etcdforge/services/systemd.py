"""etcd as a systemd service on a host: the unit, and what the running process really uses.

The unit never holds etcd settings: they live in an `ETCD_*` EnvironmentFile rendered from the
same settings dict as the local cluster's flags (`render.as_env_file`), so the unit is the same on
every member. Whether a running member needs a restart is decided from the live process, not from
what this run happened to write: `/proc/PID/environ` shows the settings it started with and
`/proc/PID/exe` the release it runs. So an `apply` killed between writing a file and restarting
still restarts on the next run, and a converged cluster is never restarted.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath

from etcdforge.errors import ServiceError
from etcdforge.hosts import Host, last_line
from etcdforge.render import BOOTSTRAP_ONLY, env_name
from etcdforge.services.runtime import START, ActionKind, RunningMember, ServiceAction
from etcdforge.spec import HostPathsSpec

FINGERPRINT_VAR = "ETCDFORGE_UNIT"
#: A running member needs no restart for these: etcd reads them only when it bootstraps or joins.
BOOTSTRAP_ENV = frozenset(env_name(s) for s in BOOTSTRAP_ONLY)
RESTART_TIMEOUT = 120.0
SETTLE_POLL = 0.2


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


SHOW_PROPERTIES = (
    "ActiveState",
    "SubState",
    "UnitFileState",
    "MainPID",
    "FragmentPath",
    "NeedDaemonReload",
    "InvocationID",
)


@dataclass(frozen=True)
class UnitState:
    active: str  # active, inactive, failed, activating, deactivating, ...
    enabled: str  # enabled, disabled, masked, "" when there is no unit file
    main_pid: int
    fragment: str  # the unit file systemd loaded
    need_reload: bool
    sub: str = ""  # running, auto-restart, start, stop-sigterm, ...
    invocation: str = ""

    @property
    def running(self) -> bool:
        return self.active in ("active", "activating", "reloading") and self.main_pid > 0

    @property
    def in_transition(self) -> bool:
        """Starting or stopping: judge the member only once this is over."""
        return self.active in ("activating", "deactivating", "reloading") and (
            self.sub != "auto-restart"
        )

    @property
    def switched_on(self) -> bool:
        """Enabled at boot or running now: a unit that would start a member by itself."""
        return self.enabled == "enabled" or self.active in ("active", "activating")

    @property
    def crashed(self) -> bool:
        return self.active == "failed" or self.sub == "auto-restart"


def parse_show(text: str, prefix: str = "") -> UnitState:
    """`systemctl show -p ...` output (lines `Key=value`, optionally prefixed) as a UnitState."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith(prefix):
            values[key.removeprefix(prefix)] = value
    return UnitState(
        active=values.get("ActiveState", ""),
        enabled=values.get("UnitFileState", ""),
        main_pid=int(values.get("MainPID", "0") or 0),
        fragment=values.get("FragmentPath", ""),
        need_reload=values.get("NeedDaemonReload", "no") == "yes",
        sub=values.get("SubState", ""),
        invocation=values.get("InvocationID", ""),
    )


def show_script(unit: str, prefix: str) -> str:
    """The same `systemctl show` as a shell line whose output `parse_show(.., prefix)` reads;
    for probes that gather everything about a host in one round trip. `unit` is shell text."""
    return f'systemctl show -p {",".join(SHOW_PROPERTIES)} -- {unit} | sed "s/^/{prefix}/"'


def show_argv(name: str) -> list[str]:
    return ["systemctl", "show", "-p", ",".join(SHOW_PROPERTIES), "--", name]


async def unit_state(host: Host, name: str) -> UnitState:
    result = await host.run(show_argv(name))
    return parse_show(result.out)


@dataclass(frozen=True)
class Running:
    """What a live etcd process was started with."""

    pid: int
    environ: dict[str, str]
    exe: str
    argv: tuple[str, ...] = ()


ARGV_VAR = "ETCDFORGE_ARGV"  # carries the base64 of /proc/PID/cmdline in the probe's output
_PROCESS_SCRIPT = (
    f'cat /proc/"$1"/environ && printf "\\0{ARGV_VAR}=" && base64 -w0 /proc/"$1"/cmdline'
    ' && printf "\\0EXE=" && readlink /proc/"$1"/exe'
)


def parse_process(pid: int, output: bytes) -> Running:
    """The probe's output: environ entries, then the command line (base64), then the binary."""
    entries = output.decode(errors="replace").split("\0")
    environ = dict(e.split("=", 1) for e in entries if "=" in e)
    exe = environ.pop("EXE", "").strip()
    packed = environ.pop(ARGV_VAR, "")
    try:
        raw = base64.b64decode(packed, validate=True)
    except ValueError:
        raw = b""
    argv = tuple(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return Running(pid, environ, exe, argv)


async def running_process(host: Host, state: UnitState) -> Running | None:
    if not state.running:
        return None
    pid = state.main_pid
    result = await host.run(["sh", "-c", _PROCESS_SCRIPT, "sh", str(pid)], check=False)
    if result.code != 0:
        return None  # exited between the two calls
    return parse_process(pid, result.stdout)


def service_action(
    running: RunningMember | None, env_text: str, unit_text: str, version_dir: PurePosixPath
) -> ServiceAction | None:
    """What the live process needs to match the files: start, restart and why, or nothing."""
    if running is None:
        return START
    reasons = []
    wanted = env_pairs(env_text)
    changed = sorted(
        k for k, v in wanted.items() if running.settings.get(k) != v and k not in BOOTSTRAP_ENV
    )
    stale = sorted(k for k in running.settings if k not in wanted)
    if changed or stale:
        reasons.append("settings " + ", ".join(changed + stale))
    if running.fingerprint != unit_fingerprint(unit_text):
        reasons.append("unit or CA certificates")
    if running.binary != str(version_dir / "etcd"):
        reasons.append(f"binary {running.binary or '?'} -> {version_dir / 'etcd'}")
    return ServiceAction(ActionKind.RESTART, tuple(reasons)) if reasons else None


async def journal_tail(host: Host, name: str, lines: int = 1, invocation: str = "") -> str:
    """The unit's last log lines; with `invocation`, only that start's (not an earlier run's)."""
    select = [f"_SYSTEMD_INVOCATION_ID={invocation}"] if invocation else ["-u", name]
    argv = ["journalctl", *select, "-n", str(lines), "-o", "cat", "--no-pager"]
    result = await host.run(argv, check=False)
    if result.code != 0:
        return ""
    return last_line(result.out) if lines == 1 else "\n".join(result.out.splitlines()[-lines:])


# --- unit management: every systemctl call of etcdforge lives in this module ------------------


async def daemon_reload(host: Host) -> None:
    await host.run(["systemctl", "daemon-reload"])


def reloaded_check(name: str, fragment: str) -> list[str]:
    """Exits 0 when systemd has loaded unit `name` from `fragment`, as it is on disk now."""
    script = (
        '[ "$(systemctl show -p FragmentPath --value -- "$1")" = "$2" ] && '
        '[ "$(systemctl show -p NeedDaemonReload --value -- "$1")" != yes ]'
    )
    return ["sh", "-c", script, "sh", name, fragment]


def enabled_check(name: str) -> list[str]:
    return ["systemctl", "is-enabled", "-q", name]


async def enable(host: Host, name: str) -> None:
    await host.run(["systemctl", "enable", "-q", name])


async def disable_now(host: Host, name: str) -> None:
    await host.run(["systemctl", "disable", "--now", "-q", name], timeout=RESTART_TIMEOUT)


async def stop_now(host: Host, name: str) -> None:
    """Stop a unit, waiting for the stop job (one already running included) to finish."""
    await host.run(["systemctl", "stop", name], timeout=RESTART_TIMEOUT)


async def switch_off(host: Host, name: str, disable: bool) -> None:
    """Stop a member's unit (and disable it, so a reboot does not start it): one round trip,
    and no error when it is stopped or absent already."""
    argv = ["systemctl", "disable", "--now", "-q", name] if disable else ["systemctl", "stop", name]
    await host.run(argv, check=False, timeout=RESTART_TIMEOUT)


async def mask_now(host: Host, name: str) -> None:
    await host.run(["systemctl", "mask", "--now", name], timeout=RESTART_TIMEOUT)


async def retire(host: Host, name: str) -> None:
    """Stop, disable and mask a unit whose member etcdforge takes over (an adopted cluster's own
    unit): it can never start a second etcd on the same data, not even after a reboot."""
    await host.run(["systemctl", "disable", "--now", "-q", name], timeout=RESTART_TIMEOUT)
    await host.run(["systemctl", "mask", "-q", name])


def off_check(name: str) -> list[str]:
    """Exits 0 when the unit neither runs nor is enabled (the distribution's, taken over)."""
    script = '! systemctl is-active -q "$1" && ! systemctl is-enabled -q "$1"'
    return ["sh", "-c", script, "sh", name]


async def forget_unit(host: Host, name: str) -> None:
    """After the unit file is removed: reload, and drop a failed state systemd still shows."""
    await daemon_reload(host)
    await host.run(["systemctl", "reset-failed", name], check=False)


class SystemdRuntime:
    """Members of a host cluster: the same unit on every host, one host per member."""

    def __init__(self, hosts: Mapping[str, Host], unit: str) -> None:
        self.hosts = hosts
        self.unit = unit

    def label(self, name: str) -> str:
        return self.hosts[name].label

    def service_name(self, name: str) -> str:
        return self.unit

    async def state(self, name: str) -> UnitState:
        return await unit_state(self.hosts[name], self.unit)

    async def start(self, name: str) -> None:
        # --no-block: a member of a new cluster reports ready only once a quorum has formed.
        await self.hosts[name].run(["systemctl", "start", "--no-block", self.unit])

    async def stop(self, name: str) -> None:
        await self.hosts[name].run(["systemctl", "stop", self.unit], timeout=RESTART_TIMEOUT)

    async def restart(self, name: str) -> None:
        result = await self.hosts[name].run(
            ["systemctl", "restart", self.unit], check=False, timeout=RESTART_TIMEOUT
        )
        if result.code != 0:
            reason = await self.down_reason(name) or last_line(result.err)
            raise ServiceError(f"{self.label(name)}: restart of {self.unit} failed: {reason}")

    async def kill(self, name: str) -> None:
        await self.hosts[name].run(["systemctl", "kill", "-s", "SIGKILL", self.unit])

    async def is_running(self, name: str) -> bool:
        return (await self.state(name)).running

    async def settle(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (await self.state(name)).in_transition and time.monotonic() < deadline:
            await asyncio.sleep(SETTLE_POLL)

    async def running_with(self, name: str) -> RunningMember | None:
        found = await running_process(self.hosts[name], await self.state(name))
        if found is None:
            return None
        settings = {k: v for k, v in found.environ.items() if k.startswith("ETCD_")}
        fingerprint = found.environ.get(FINGERPRINT_VAR)
        return RunningMember(
            found.pid, settings, found.exe, fingerprint, argv=found.argv, env=settings
        )

    async def down_reason(self, name: str) -> str | None:
        state = await self.state(name)
        if (state.running and not state.crashed) or state.in_transition:
            return None  # running, or still starting or stopping: judged once it settles
        host = self.hosts[name]
        if not state.crashed:
            return f"{host.label}: {self.unit} is {state.active or 'not loaded'}"
        log = await journal_tail(host, self.unit, invocation=state.invocation)
        return f"{host.label}: {self.unit} exited" + (f": {log[:300]}" if log else "")

    async def log_tail(self, name: str, lines: int = 5) -> str:
        state = await self.state(name)
        return await journal_tail(self.hosts[name], self.unit, lines, state.invocation)

    def log_hint(self, name: str) -> str:
        return f"see `journalctl -u {self.unit}` on the host"
