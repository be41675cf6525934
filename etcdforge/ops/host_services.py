"""The services phase of `apply` on hosts: start, upgrade, restart, each member switched in turn.

The files phase installs a new release beside the old one and never switches it; here each
member is switched (`<releases_dir>/current`) right before it starts or restarts:

1. members that are not running are switched to the spec's release and started together (a new
   member only reports ready to systemd once a quorum exists);
2. members running another etcd version are upgraded by the one upgrade procedure
   (`ops.upgrade_run`: health gate, verified snapshot, rolling with per-member rollback, checks),
   whose path `apply` checked before changing anything;
3. members running with other settings, unit or CA files restart one at a time (`ops.rolling`).
"""

from __future__ import annotations

from collections.abc import Callable

from etcdforge import snapshot
from etcdforge.hosts import fan_out
from etcdforge.ops.health import wait_healthy
from etcdforge.ops.plan import Progress
from etcdforge.ops.rolling import rolling_restart
from etcdforge.ops.switch import HostSwitch
from etcdforge.ops.upgrade_run import UpgradeOutcome, UpgradeRun, clear_progress, read_progress
from etcdforge.record import ClusterRecord
from etcdforge.services.runtime import ActionKind, ServiceAction
from etcdforge.services.systemd import SystemdRuntime
from etcdforge.upgrade_path import UpgradePath

Tools = Callable[[], snapshot.SnapshotTools]


def upgrade_run(
    record: ClusterRecord,
    runtime: SystemdRuntime,
    switch: HostSwitch,
    path: UpgradePath | None,
    tools: Tools,
    progress: Progress,
    timeout: float,
) -> UpgradeRun | None:
    """The upgrade this apply performs: a version change, or one a killed run left unfinished."""
    if path is None or (path.done and read_progress(record.layout) is None):
        return None
    return UpgradeRun(record, runtime, switch, path, tools, progress, timeout)


async def start_stopped(
    runtime: SystemdRuntime, switch: HostSwitch, names: list[str], progress: Progress
) -> None:
    for name in names:
        progress.step(runtime.label(name), switch.describe(name, switch.target))
    await fan_out(names, runtime.label, lambda n: switch.point(n, switch.target))
    for name in names:
        progress.step(runtime.label(name), f"start {runtime.unit}")
    await fan_out(names, runtime.label, runtime.start)


async def converge_services(
    record: ClusterRecord,
    runtime: SystemdRuntime,
    switch: HostSwitch,
    actions: dict[str, ServiceAction | None],
    upgrade: UpgradeRun | None,
    progress: Progress,
    timeout: float,
) -> UpgradeOutcome | None:
    """Start what is stopped, upgrade what runs another version, roll stale settings."""
    upgrading = set(upgrade.path.pending) if upgrade is not None else set()
    to_start = [n for n, a in actions.items() if a is not None and a.kind is ActionKind.START]
    to_restart = {
        n: "; ".join(a.reasons)
        for n, a in actions.items()
        if a is not None and a.kind is ActionKind.RESTART and n not in upgrading
    }
    if to_start:
        await start_stopped(runtime, switch, to_start, progress)
    if to_start or (not to_restart and upgrade is None):
        progress.step("cluster", "wait for every member to be healthy")
        await wait_healthy(record, runtime, timeout)
    outcome = None
    if upgrade is not None:
        outcome = await upgrade.run()
        clear_progress(record.layout)  # the record already names the new release

    async def switch_and_restart(name: str) -> None:
        await switch.point(name, switch.target)
        await runtime.restart(name)

    await rolling_restart(record, runtime, to_restart, progress, timeout, switch_and_restart)
    return outcome
