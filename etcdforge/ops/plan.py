"""Plans: ordered steps, each knowing how to tell whether it is already done; and progress.

Executing a plan skips done steps, so an interrupted run resumes where it stopped and a rerun on
a converged cluster changes nothing. `--dry-run` prints the steps that would run.

Progress is reported, never printed, below the CLI: an operation announces its phases (`phase`)
and the steps it takes on a member, a host or the admin machine (`step`); the CLI shows them as a
live display on a terminal and as plain lines otherwise.

Before each step that will run, the runner passes a checkpoint (`interrupt.before_step`): a
SIGTERM or Ctrl-C stops the command there, between two steps, never inside one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from etcdforge.interrupt import before_step

if TYPE_CHECKING:
    from etcdforge.hosts import Host


class Progress(Protocol):
    def phase(self, name: str) -> None:
        """A new phase of the operation begins (preflight, files, services, ...)."""
        ...

    def step(self, where: str, message: str) -> None:
        """A step on `where`: a member or host label, "admin", or "cluster"."""
        ...


class Silent:
    """No output: library callers and nested operations that report through their caller."""

    def phase(self, name: str) -> None:
        pass

    def step(self, where: str, message: str) -> None:
        pass


SILENT = Silent()


@dataclass(frozen=True)
class StepLines:
    """Each step's message to one callable (phases dropped): for scripts and tests."""

    show: Callable[[str], None]

    def phase(self, name: str) -> None:
        pass

    def step(self, where: str, message: str) -> None:
        self.show(message)


@dataclass(frozen=True)
class StepsOnly:
    """Forward the steps of a nested operation (rotate-ca's `apply`), keep the caller's phase."""

    progress: Progress

    def phase(self, name: str) -> None:
        pass

    def step(self, where: str, message: str) -> None:
        self.progress.step(where, message)


@dataclass(frozen=True)
class Step:
    title: str
    is_done: Callable[[], bool]
    run: Callable[[], object]
    phase: str = ""  # announced when the first step of a phase runs


@dataclass(frozen=True)
class PlanResult:
    changed: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def changed_anything(self) -> bool:
        return bool(self.changed)


class _Phases:
    """Announce a step's phase once, when the first step of it actually runs."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.current = ""

    def enter(self, phase: str) -> None:
        if phase and phase != self.current:
            self.current = phase
            self.progress.phase(phase)


def execute(
    steps: Sequence[Step], progress: Progress = SILENT, dry_run: bool = False, where: str = ""
) -> PlanResult:
    changed: list[str] = []
    pending: list[str] = []
    phases = _Phases(progress)
    for step in steps:
        if step.is_done():
            continue
        if dry_run:
            pending.append(step.title)
            continue
        before_step(step.title, where)
        phases.enter(step.phase)
        progress.step(where, step.title)
        step.run()
        changed.append(step.title)
    return PlanResult(changed=tuple(changed), pending=tuple(pending))


@dataclass(frozen=True)
class Probe:
    """A check that is one command on a host: done when it exits 0. `argv` gives None when the
    answer is known without asking (no content to compare with yet: not done)."""

    host: Host
    argv: Callable[[], Sequence[str] | None]

    async def passes(self) -> bool:
        argv = self.argv()
        return argv is not None and (await self.host.run(argv, check=False)).code == 0


@dataclass(frozen=True)
class AsyncStep:
    """A step on a remote host: checking and doing both cost a round trip, so both are async.

    `explain` says what the step would change (a short diff summary) for `plan`. A step whose
    check is a `Probe` is made with `probed`; `check_all` asks a host's probes in one command.
    """

    title: str
    is_done: Callable[[], Awaitable[bool]]
    run: Callable[[], Awaitable[object]]
    explain: Callable[[], Awaitable[str]] | None = None
    probe: Probe | None = None


def probed(
    title: str,
    probe: Probe,
    run: Callable[[], Awaitable[object]],
    explain: Callable[[], Awaitable[str]] | None = None,
) -> AsyncStep:
    return AsyncStep(title, probe.passes, run, explain, probe)


#: Checks in flight at once on one host: sshd allows 10 sessions per connection by default.
CONCURRENT_CHECKS = 8


async def check_all(steps: Sequence[AsyncStep]) -> list[bool]:
    """Each step's "done", asked at once: the probes of one host in one command
    (`Host.exit_codes`), the other checks concurrently, `CONCURRENT_CHECKS` at a time."""
    known: dict[int, bool] = {}
    batches: dict[int, tuple[Host, list[tuple[int, Sequence[str]]]]] = {}
    for index, step in enumerate(steps):
        if step.probe is not None:
            argv = step.probe.argv()
            if argv is None:
                known[index] = False
            else:
                host = step.probe.host
                batches.setdefault(id(host), (host, []))[1].append((index, argv))
    limit = asyncio.Semaphore(CONCURRENT_CHECKS)

    async def ask(host: Host, asked: list[tuple[int, Sequence[str]]]) -> None:
        codes = await host.exit_codes([argv for _, argv in asked])
        known.update((index, code == 0) for (index, _), code in zip(asked, codes, strict=True))

    async def check(index: int, step: AsyncStep) -> None:
        async with limit:
            known[index] = await step.is_done()

    unprobed = [check(i, s) for i, s in enumerate(steps) if s.probe is None]
    await asyncio.gather(*(ask(host, asked) for host, asked in batches.values()), *unprobed)
    return [known[index] for index in range(len(steps))]


async def execute_async(
    steps: Sequence[AsyncStep], progress: Progress = SILENT, dry_run: bool = False, where: str = ""
) -> PlanResult:
    """Every step is checked at once; the answers hold up to the first step that runs (and all
    of them in a dry run, where nothing runs). After a step has run, the later ones are checked
    again in order, since a step can undo a later one's "done", as a new unit file does to
    "daemon reloaded"."""
    changed: list[str] = []
    pending: list[str] = []
    known = await check_all(steps)
    for index, step in enumerate(steps):
        done = known[index] if dry_run or not changed else await step.is_done()
        if done:
            continue
        if dry_run:
            detail = await step.explain() if step.explain else ""
            pending.append(f"{step.title}: {detail}" if detail else step.title)
            continue
        before_step(step.title, where)
        progress.step(where, step.title)
        await step.run()
        changed.append(step.title)
    return PlanResult(changed=tuple(changed), pending=tuple(pending))
