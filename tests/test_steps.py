"""How a host's steps are checked and run (`execute_async`): each check costs a round trip, a
step's answer may be trusted only while nothing has run since it was asked, and a step is done
only when everything it does is done."""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from etcdforge.hosts import CommandResult, LocalHost, file_matches
from etcdforge.ops.plan import AsyncStep, Probe, check_all, execute_async, probed
from etcdforge.ops.reset import reset_steps
from etcdforge.spec import HostPathsSpec


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


class CountingHost(LocalHost):
    """This machine, counting the commands it is sent (each would be a session on a host)."""

    def __init__(self) -> None:
        super().__init__("counting")
        self.sessions = 0

    async def _exec(self, command: str, input: bytes | None, timeout: float) -> CommandResult:
        self.sessions += 1
        return await super()._exec(command, input, timeout)


def test_a_hosts_probes_are_asked_in_one_command(tmp_path: Path) -> None:
    host = CountingHost()
    present, missing = tmp_path / "present", tmp_path / "missing"
    present.write_bytes(b"data\n")
    present.chmod(0o640)
    owner = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
    ran: list[str] = []

    def step(title: str, argv: list[str] | None) -> AsyncStep:
        async def run() -> None:
            ran.append(title)

        return probed(title, Probe(host, lambda: argv), run)

    steps = [
        step("same file", file_matches(PurePosixPath(present), b"data\n", 0o640, owner)),
        step("other mode", file_matches(PurePosixPath(present), b"data\n", 0o600, owner)),
        step("other data", file_matches(PurePosixPath(present), b"else\n", 0o640, owner)),
        step("no file", file_matches(PurePosixPath(missing), b"data\n", 0o640, owner)),
        step("no content yet", None),
        step("true", ["true"]),
    ]
    assert asyncio.run(check_all(steps)) == [True, False, False, False, False, True]
    assert host.sessions == 1
    # run: the first step left to do runs without a second question; later ones are asked again
    host.sessions = 0
    result = asyncio.run(execute_async(steps))
    assert result.changed == ("other mode", "other data", "no file", "no content yet")
    assert ran == list(result.changed)
    # the batch; then "other data", "no file" and "true" asked again ("no content yet" needs no
    # question), each after a step ran
    assert host.sessions == 1 + 3


def test_a_reset_cut_short_before_removing_the_config_dir_is_not_done(tmp_path: Path) -> None:
    """Found by the kill sweep of `reset --purge-data`: killed between removing the PKI and the
    settings and the `rmdir` of their directory, the rerun took the step as done."""
    paths = HostPathsSpec(
        config_dir=tmp_path / "etc", pki_dir=tmp_path / "etc" / "pki", data_dir=tmp_path / "data"
    )
    host = LocalHost()
    step = next(s for s in reset_steps(host, paths, None, True) if "pki" in s.title)
    (tmp_path / "etc").mkdir()
    assert asyncio.run(step.is_done()) is False  # ours gone, their directory still there
    (tmp_path / "etc" / "notes.txt").write_text("someone else's\n")
    assert asyncio.run(step.is_done()) is True  # not ours to remove: left as it is
    (tmp_path / "etc" / "notes.txt").unlink()
    asyncio.run(step.run())
    assert not (tmp_path / "etc").exists()
