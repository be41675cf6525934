"""Plans: ordered steps, each knowing how to tell whether it is already done.

Executing a plan skips done steps, so an interrupted run resumes where it stopped and a rerun on
a converged cluster changes nothing. `--dry-run` prints the steps that would run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Step:
    title: str
    is_done: Callable[[], bool]
    run: Callable[[], object]


@dataclass(frozen=True)
class PlanResult:
    changed: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def changed_anything(self) -> bool:
        return bool(self.changed)


def execute(
    steps: Sequence[Step], progress: Progress | None = None, dry_run: bool = False
) -> PlanResult:
    changed: list[str] = []
    pending: list[str] = []
    for step in steps:
        if step.is_done():
            continue
        if dry_run:
            pending.append(step.title)
            continue
        if progress:
            progress(step.title)
        step.run()
        changed.append(step.title)
    return PlanResult(changed=tuple(changed), pending=tuple(pending))


@dataclass(frozen=True)
class AsyncStep:
    """A step on a remote host: checking and doing both cost a round trip, so both are async.

    `explain` says what the step would change (a short diff summary) for `plan`.
    """

    title: str
    is_done: Callable[[], Awaitable[bool]]
    run: Callable[[], Awaitable[object]]
    explain: Callable[[], Awaitable[str]] | None = None


async def execute_async(
    steps: Sequence[AsyncStep], progress: Progress | None = None, dry_run: bool = False
) -> PlanResult:
    changed: list[str] = []
    pending: list[str] = []
    for step in steps:
        if await step.is_done():
            continue
        if dry_run:
            detail = await step.explain() if step.explain else ""
            pending.append(f"{step.title}: {detail}" if detail else step.title)
            continue
        if progress:
            progress(step.title)
        await step.run()
        changed.append(step.title)
    return PlanResult(changed=tuple(changed), pending=tuple(pending))
