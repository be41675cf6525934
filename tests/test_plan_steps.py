"""How `execute_async` checks and runs a host's steps: each check costs a round trip, and a
step's answer may be trusted only while nothing has run since it was asked."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from etcdforge.ops.plan import AsyncStep, execute_async


@dataclass
class Machine:
    """A host's state as flags; each check and each run is written down."""

    state: dict[str, bool]
    log: list[str] = field(default_factory=list)

    def step(self, name: str, undoes: str = "") -> AsyncStep:
        async def is_done() -> bool:
            self.log.append(f"check {name}")
            return self.state[name]

        async def run() -> None:
            self.log.append(f"run {name}")
            self.state[name] = True
            if undoes:
                self.state[undoes] = False

        return AsyncStep(name, is_done, run)


def test_a_converged_host_is_checked_once_per_step() -> None:
    machine = Machine({"user": True, "dirs": True, "unit": True})
    steps = [machine.step(n) for n in ("user", "dirs", "unit")]
    result = asyncio.run(execute_async(steps))
    assert result.changed == ()
    assert sorted(machine.log) == ["check dirs", "check unit", "check user"]


def test_steps_before_the_first_change_are_not_asked_twice() -> None:
    machine = Machine({"user": True, "release": True, "dirs": False, "env": True})
    steps = [machine.step(n) for n in ("user", "release", "dirs", "env")]
    result = asyncio.run(execute_async(steps))
    assert result.changed == ("dirs",)
    # the concurrent round, then only what comes after the step that ran
    assert sorted(machine.log[:4]) == ["check dirs", "check env", "check release", "check user"]
    assert machine.log[4:] == ["run dirs", "check env"]


def test_a_step_that_undoes_a_later_one_is_followed_by_that_one() -> None:
    # a new unit file makes "daemon reloaded" false again: the concurrent answer is stale
    machine = Machine({"unit": False, "reload": True})
    steps = [machine.step("unit", undoes="reload"), machine.step("reload")]
    result = asyncio.run(execute_async(steps))
    assert result.changed == ("unit", "reload")
    assert machine.state == {"unit": True, "reload": True}


def test_a_dry_run_lists_what_is_left_from_one_round_of_checks() -> None:
    machine = Machine({"user": True, "dirs": False, "env": False})
    steps = [machine.step(n) for n in ("user", "dirs", "env")]
    result = asyncio.run(execute_async(steps, dry_run=True))
    assert result.pending == ("dirs", "env")
    assert result.changed == ()
    assert len(machine.log) == 3 and all(line.startswith("check") for line in machine.log)
