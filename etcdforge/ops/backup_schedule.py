"""`etcdforge backup schedule`: a systemd service and timer that run `etcdforge backup`.

The service is a oneshot that runs this very etcdforge (the same Python, so the same
installation) with absolute paths to the spec and state dir, and waits for the cluster's lock
rather than failing when another command runs. The timer's `OnCalendar` comes from the spec's
`backup.schedule`, checked with `systemd-analyze calendar` before anything is written;
`Persistent=true` runs a backup missed while the machine was off.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from etcdforge.backups import BackupError
from etcdforge.fsutil import PUBLIC_FILE, atomic_write
from etcdforge.ops.backup import cluster_spec
from etcdforge.ops.target import Selection, record_for

#: Environment that decides where etcdforge finds state and release caches: carried over.
CARRIED_ENV = ("ETCDFORGE_STATE_HOME", "ETCDFORGE_CACHE_DIR", "XDG_STATE_HOME", "HOME")
WAIT_LOCK = "30m"


@dataclass(frozen=True)
class ScheduleResult:
    service: Path
    timer: Path
    on_calendar: str
    command: list[str]


def unit_base(cluster: str) -> str:
    return f"etcdforge-backup-{cluster}"


def backup_command(selection: Selection, state_dir: Path, dest: str | None) -> list[str]:
    """The command the service runs: absolute paths only, this Python's etcdforge."""
    argv = [sys.executable, "-m", "etcdforge", "backup"]
    if selection.file is not None:
        argv += ["-f", str(selection.file.absolute())]
    argv += ["--state-dir", str(state_dir), "--wait-lock", WAIT_LOCK]
    if dest is not None:
        argv += ["--dest", dest]
    return argv


def _systemd_word(word: str, command: bool = True) -> str:
    """systemd splits on quotes like a shell and expands `%` specifiers everywhere and `$`
    variables in commands: both are escaped, so every word arrives as written."""
    escaped = word.replace("%", "%%")
    escaped = escaped.replace("$", "$$") if command else escaped
    return shlex.quote(escaped)


def render_service(cluster: str, command: list[str], env: dict[str, str]) -> str:
    lines = [
        "# Rendered by etcdforge backup schedule; rerun it rather than editing this file.",
        "[Unit]",
        f"Description=etcdforge backup of etcd cluster {cluster}",
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=oneshot",
        "UMask=0077",
        "Nice=10",
        "TimeoutStartSec=2h",
    ]
    lines += [f"Environment={_systemd_word(f'{k}={v}', False)}" for k, v in sorted(env.items())]
    lines.append("ExecStart=" + " ".join(_systemd_word(w) for w in command))
    return "\n".join(lines) + "\n"


def render_timer(cluster: str, on_calendar: str) -> str:
    return (
        "\n".join(
            [
                "# Rendered by etcdforge backup schedule; rerun it rather than editing this file.",
                "[Unit]",
                f"Description=Scheduled etcdforge backup of etcd cluster {cluster}",
                "",
                "[Timer]",
                f"OnCalendar={on_calendar}",
                "Persistent=true",
                "RandomizedDelaySec=60",
                f"Unit={unit_base(cluster)}.service",
                "",
                "[Install]",
                "WantedBy=timers.target",
            ]
        )
        + "\n"
    )


def check_calendar(expression: str) -> None:
    """systemd's own parser decides; without systemd-analyze the timer is written unchecked."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    result = subprocess.run(
        [analyze, "calendar", expression], capture_output=True, text=True, timeout=20, check=False
    )
    if result.returncode != 0:
        reason = (result.stderr or result.stdout).strip().splitlines()
        raise BackupError(
            f"backup.schedule {expression!r} is not a systemd OnCalendar expression "
            f"({reason[-1] if reason else 'rejected'}); e.g. hourly, daily, *-*-* 02:30:00"
        )


def default_unit_dir() -> Path:
    """System units for root, the user's own units otherwise."""
    if os.geteuid() == 0:
        return Path("/etc/systemd/system")
    return Path.home() / ".config" / "systemd" / "user"


def schedule(
    selection: Selection, out: Path | None = None, dest: str | None = None
) -> ScheduleResult:
    record = record_for(selection)
    settings = cluster_spec(selection, record).backup
    check_calendar(settings.schedule)
    command = backup_command(selection, record.layout.root, dest)
    env = {k: os.environ[k] for k in CARRIED_ENV if os.environ.get(k)}
    directory = out if out is not None else default_unit_dir()
    base = directory / unit_base(record.name)
    service = base.with_name(base.name + ".service")
    timer = base.with_name(base.name + ".timer")
    atomic_write(service, render_service(record.name, command, env).encode(), PUBLIC_FILE)
    atomic_write(timer, render_timer(record.name, settings.schedule).encode(), PUBLIC_FILE)
    return ScheduleResult(service, timer, settings.schedule, command)
