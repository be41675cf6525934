"""The member runtime: how one etcd member is started, stopped and inspected, wherever it runs.

Every operation that touches members (up/apply, down/reset, rolling restarts, restore, CA rotation,
migration, and the day-2 operations built on them) is written once against `MemberRuntime`. There
are two implementations, picked once from the deployed record (`ops.runtime.open_runtime`):

- `services.local.LocalRuntime`: detached processes on this machine, with pid, flags and log files;
- `services.systemd.SystemdRuntime`: a systemd unit on each host, driven over a `Host`.

The contract, like etcdadm's `InitSystem`: `start` returns once the member has been asked to
start (a member of a new cluster only becomes ready with a quorum, so nobody waits on one member);
`restart` and `stop` return once the old process is gone; `settle` waits out a member caught
between states (still stopping after an interrupted run, say) so a caller judges it only once it
is really running or really stopped; `down_reason` says why a member is not running, reading only
the log of its latest start.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class ActionKind(StrEnum):
    START = "start"
    RESTART = "restart"


@dataclass(frozen=True)
class ServiceAction:
    """What a member's service needs: to be started, or restarted for these reasons."""

    kind: ActionKind
    reasons: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.kind is ActionKind.RESTART and self.reasons:
            return f"restart ({'; '.join(self.reasons)})"
        return self.kind.value

    @property
    def past(self) -> str:
        return f"{self.kind.value}ed"


START = ServiceAction(ActionKind.START)


@dataclass(frozen=True)
class RunningMember:
    """What a live member process runs with, read from the process itself."""

    pid: int
    settings: dict[str, str]  # etcd settings by flag name, e.g. "initial-cluster-state"
    binary: str
    fingerprint: str | None = None  # the unit and CA files it started with (systemd)
    argv: tuple[str, ...] = ()  # the whole command line, flags included
    env: Mapping[str, str] = field(default_factory=dict)  # its ETCD_* environment variables


class MemberRuntime(Protocol):
    """Start, stop and inspect the members of one cluster; see the module docstring."""

    def label(self, name: str) -> str:
        """How messages name the member: `m1`, or `etcd-1 (10.0.0.11)` on hosts."""
        ...

    def service_name(self, name: str) -> str:
        """What progress lines call the service: `m1`, or the unit name on hosts."""
        ...

    async def start(self, name: str) -> None: ...

    async def stop(self, name: str) -> None: ...

    async def restart(self, name: str) -> None: ...

    async def kill(self, name: str) -> None:
        """SIGKILL, as a crash would: tests and failure drills only."""
        ...

    async def is_running(self, name: str) -> bool: ...

    async def settle(self, name: str, timeout: float) -> None: ...

    async def running_with(self, name: str) -> RunningMember | None: ...

    async def down_reason(self, name: str) -> str | None:
        """None while the member runs or is starting; else why not, from its latest start."""
        ...

    async def log_tail(self, name: str, lines: int = 5) -> str: ...

    def log_hint(self, name: str) -> str:
        """Where to read the member's whole log: a file, or a journalctl command."""
        ...
