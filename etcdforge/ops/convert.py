"""Converting an adopted cluster: `apply`'s services phase while the runbook's units still run.

A member is in one of three states, read from its host every time (never from what a run wrote):
it runs the runbook's unit; it runs etcdforge's; or neither (a conversion cut short). `apply` first
finishes a member caught in between, then converts the others one at a time under the one
rolling policy (`ops.rolling`: health gate, followers first, the leader last after handing its
leadership off): the runbook's unit is stopped, disabled and masked, the data dir (never moved)
is given to the etcd user, etcdforge's unit starts on it, and the member must be healthy and
caught up with the leader before the next one goes. Only once every member runs etcdforge's unit
and the cluster is healthy is the CA key deleted from every member; then the adoption is done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePosixPath

from etcdforge.adoption import Adoption, write_adoption
from etcdforge.errors import ServiceError
from etcdforge.hosts import Host, fan_out
from etcdforge.layout import StateLayout
from etcdforge.ops.health import wait_caught_up, wait_healthy
from etcdforge.ops.plan import AsyncStep, Progress
from etcdforge.ops.rolling import rolling_restart
from etcdforge.record import ClusterRecord
from etcdforge.services import systemd
from etcdforge.services.runtime import ActionKind, ServiceAction
from etcdforge.services.systemd import SystemdRuntime
from etcdforge.spec import HostPathsSpec


class Phase(Enum):
    RUNBOOK = "runs the runbook's unit"
    HALF = "stopped mid-conversion"
    CONVERTED = "runs etcdforge's unit"


@dataclass(frozen=True)
class MemberState:
    phase: Phase
    runbook_pid: int | None  # the runbook's etcd while it still runs: its ports are this member's


@dataclass(frozen=True)
class Conversion:
    adoption: Adoption
    hosts: Mapping[str, Host]
    paths: HostPathsSpec
    layout: StateLayout

    @property
    def unit(self) -> str:
        return self.adoption.found.unit

    def reason(self, state: MemberState) -> str:
        if state.phase is Phase.HALF:
            return f"finish the conversion: {self.unit} is stopped, start {self.paths.unit.name}"
        return (
            f"take over from the runbook's {self.unit}: https only, client-cert-auth on both "
            f"ports, data stays in {self.paths.data_dir}"
        )

    async def survey(self) -> dict[str, MemberState]:
        names = list(self.hosts)
        found = await asyncio.gather(*(self._state(n) for n in names))
        return dict(zip(names, found, strict=True))

    async def _state(self, name: str) -> MemberState:
        host = self.hosts[name]
        ours = await systemd.unit_state(host, self.paths.unit.name)
        theirs = await systemd.unit_state(host, self.unit)
        if ours.running:
            return MemberState(Phase.CONVERTED, None)
        if theirs.running:
            return MemberState(Phase.RUNBOOK, theirs.main_pid)
        return MemberState(Phase.HALF, None)

    def actions(
        self, states: Mapping[str, MemberState], found: Mapping[str, ServiceAction | None]
    ) -> dict[str, ServiceAction | None]:
        """What each member's service needs: members not yet converted restart into ours."""
        return {
            name: found[name]
            if state.phase is Phase.CONVERTED
            else ServiceAction(ActionKind.RESTART, (self.reason(state),))
            for name, state in states.items()
        }

    # --- the services phase ------------------------------------------------------------------

    async def run(
        self,
        record: ClusterRecord,
        runtime: SystemdRuntime,
        found: Mapping[str, ServiceAction | None],
        progress: Progress,
        timeout: float,
    ) -> None:
        states = await self.survey()
        half = [n for n, s in states.items() if s.phase is Phase.HALF]
        if half:
            await self.finish(record, runtime, half, progress, timeout)
        taking = [n for n, s in states.items() if s.phase is Phase.RUNBOOK]
        reasons = {n: self.reason(states[n]) for n in taking}
        for name, action in found.items():
            if states[name].phase is Phase.CONVERTED and action is not None:
                reasons[name] = "; ".join(action.reasons)

        async def one(name: str) -> None:
            if name not in taking:
                await runtime.restart(name)
                return
            await self.take_over(runtime, name, progress)
            progress.step(runtime.label(name), "wait until it has caught up with the leader")
            await wait_caught_up(record, name, timeout)

        await rolling_restart(record, runtime, reasons, progress, timeout, action=one)
        await self.drop_ca_keys(record, runtime, progress, timeout)

    async def finish(
        self,
        record: ClusterRecord,
        runtime: SystemdRuntime,
        names: list[str],
        progress: Progress,
        timeout: float,
    ) -> None:
        """Members a killed run left stopped: complete their switch, start them together."""
        for name in names:
            progress.step(runtime.label(name), self.reason(MemberState(Phase.HALF, None)))
            await self.prepare(name, progress)
        await fan_out(names, runtime.label, runtime.start)
        progress.step("cluster", "wait for every member to be healthy")
        await wait_healthy(record, runtime, timeout)

    async def prepare(self, name: str, progress: Progress) -> None:
        """Runbook unit off for good, data dir to the etcd user, our unit enabled (not started)."""
        host = self.hosts[name]
        progress.step(host.label, f"stop, disable and mask the runbook's {self.unit}")
        await systemd.retire(host, self.unit)
        user, data_dir = self.paths.user, self.paths.data_dir
        progress.step(host.label, f"give {data_dir} to user {user} (kept in place)")
        await host.run(["chown", "-R", f"{user}:{user}", "--", str(data_dir)])
        await systemd.enable(host, self.paths.unit.name)

    async def take_over(self, runtime: SystemdRuntime, name: str, progress: Progress) -> None:
        await self.prepare(name, progress)
        progress.step(runtime.label(name), f"start {self.paths.unit.name}")
        await runtime.restart(name)  # starts it, and returns once etcd reported ready

    # --- the end: CA keys off the members ----------------------------------------------------

    async def drop_ca_keys(
        self, record: ClusterRecord, runtime: SystemdRuntime, progress: Progress, timeout: float
    ) -> None:
        progress.phase("CA keys")
        progress.step("cluster", "wait for every member to be healthy before deleting the CA key")
        await wait_healthy(record, runtime, timeout)
        states = await self.survey()
        left = [n for n, s in states.items() if s.phase is not Phase.CONVERTED]
        if left:
            raise ServiceError(
                f"member(s) {', '.join(left)} do not run {self.paths.unit.name}; the CA key stays "
                "on the members until every member is converted: rerun `etcdforge apply`"
            )

        async def one(name: str) -> None:
            for path in self.adoption.found.ca_keys.get(name, ()):
                host = self.hosts[name]
                if (await host.run(["test", "-e", path], check=False)).code == 0:
                    progress.step(host.label, f"delete the CA key {path}")
                    await host.run(["rm", "-f", "--", path])

        await fan_out(list(self.hosts), lambda n: self.hosts[n].label, one)
        write_adoption(self.layout, self.adoption.done())


def reach_data_step(host: Host, paths: HostPathsSpec) -> AsyncStep:
    """The runbook's etcd ran as root under a 0700 root directory; ours runs as the etcd user,
    who must be able to pass through every directory above the (unmoved) data dir."""
    parents = [str(p) for p in reversed(PurePosixPath(paths.data_dir).parents) if str(p) != "/"]
    check = 'for d in "$@"; do runuser -u "$U" -- test -x "$d" || exit 1; done'
    fix = 'for d in "$@"; do runuser -u "$U" -- test -x "$d" || chmod o+x -- "$d"; done'
    env = ["env", f"U={paths.user}", "sh", "-c"]

    async def is_done() -> bool:
        return (await host.run([*env, check, "sh", *parents], check=False)).code == 0

    async def run() -> None:
        await host.run([*env, fix, "sh", *parents])

    title = f"let user {paths.user} reach {paths.data_dir} (o+x on its parent directories)"
    return AsyncStep(title, is_done, run)
