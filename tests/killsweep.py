"""Kill-point sweeps: a changing command SIGKILLed at N points over its whole run, rerun at once.

The guarantee under test (README, "Interrupted commands"): a changing command killed at any point
completes when rerun at once, no acknowledged write is lost, and nothing is left running (or
lying around) that should not be. A sweep checks it for one command:

1. **calibrate**: `prepare()`, then one uninterrupted run records its progress lines (stderr is
   not a terminal, so every step is one line) and when each came: the command's timeline.
2. **kill points**: half at step boundaries (the moment a step's line appears), spread evenly
   over the timeline; half at random instants (uniform over the whole run, so inside steps, the
   start-up and the waits), each kept as "this line, then this delay", so a rerun that skips the
   steps already done still finds it. The RNG is seeded; the seed is in the report, and
   `KILLSWEEP_SEED=N` replays the same choice of points.
3. **rounds**: `prepare()`, run, SIGKILL the CLI's own PID (not its process group: helpers it
   started live on, as after `kill -9 PID`) at the first point whose line comes; rerun at once
   and kill that rerun at the next, and so on; the last rerun must complete. A run that fails
   instead (exit non-zero without being killed) is a broken promise: it is recorded, and rerun
   (bounded) so the report says how many reruns a kill really needed. Points a round never
   reached (a step its reruns found done) are tried in the next round; a point a run outran
   (it ended sooner after the point's line than the calibration did) is moved into the time
   that run had after the line. `prepare` must give each round the same work (crash the same
   member, say), or the lines will not match.
   **Planted** points (`tests.kill_inside`: an exact place in the code, like "between launching
   etcd and writing its pid file") come first in a round, in the order given.
4. **checks** after each round: every member healthy (`Target.unhealthy`), the command's own
   postconditions (`check`), nothing left (`Target.leftovers`: stray processes, temp files); at
   the end, 0 acknowledged writes of the `WriteLoad` missing on any member.

Use it from any day-2 test (the targets are in `tests.killsweep_targets`)::

    with WriteLoad(target.endpoints, target.admin_files(), "sweep", reload=True) as load:
        report = sweep(Sweep(["certs", "rotate-ca", *cluster.args], target, load=load,
                         planted=[Inside("etcdforge.ops.rotation_plan:restart_one")]))
    print(report.summary())
    assert report.ok, report.details()

`killsweep_run.signal_at` sends SIGTERM or SIGINT instead, once, for the safe-stop tests.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import httpx

from tests.kill_inside import Inside
from tests.killsweep_run import STEP_MARK, Aim, KillPoint, Line, Outcome, run_cli
from tests.load import WriteLoad

MAX_FAILED_RERUNS = 3  # reruns after one kill that may fail before the sweep gives up
KINDS = ("boundary", "inside", "planted")
HEALTH_GRACE = 15.0  # a completed command left the cluster healthy, or nearly so
LEFTOVER_GRACE = 3.0  # a helper finishing its last write may take a moment to exit


class Target(Protocol):
    """The cluster a sweep runs against (see tests.killsweep_targets)."""

    @property
    def endpoints(self) -> list[str]:
        """Every member's client URL (where lost writes are looked for)."""
        ...

    def unhealthy(self) -> list[str]:
        """Members that do not answer healthy, each with why; empty when all are healthy."""
        ...

    def leftovers(self) -> list[str]:
        """What a run left that should not be there: stray processes, temp files."""
        ...


@dataclass
class Kill:
    kind: str  # "boundary", "inside" (a timed instant) or "planted" (tests.kill_inside)
    where: str
    last_line: str  # the last progress line the killed run printed: where it really died
    reruns: int = 1  # runs after the kill until one continued (killed later) or completed


@dataclass
class SweepReport:
    command: str
    seed: int
    planned: int
    kills: list[Kill] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # reruns that failed, with their error
    problems: list[str] = field(default_factory=list)  # checks that failed after a round
    lost: dict[str, int] = field(default_factory=dict)
    acked: int = 0
    rounds: int = 0
    seconds: float = 0.0

    @property
    def max_reruns(self) -> int:
        return max((k.reruns for k in self.kills), default=0)

    @property
    def lost_writes(self) -> int:
        return sum(self.lost.values())

    @property
    def ok(self) -> bool:
        return (
            len(self.kills) >= self.planned
            and self.max_reruns <= 1
            and not self.failures
            and not self.problems
            and self.lost_writes == 0
        )

    def summary(self) -> str:
        kinds = {kind: sum(k.kind == kind for k in self.kills) for kind in KINDS}
        writes = f"{self.lost_writes} of {self.acked} acknowledged writes lost"
        return (
            f"{self.command}: {len(self.kills)} kill points tried ({kinds['boundary']} at step "
            f"boundaries, {kinds['inside']} inside steps, {kinds['planted']} planted) in "
            f"{self.rounds} round(s), {len(self.missed)} not reached; at most {self.max_reruns} "
            f"rerun(s) needed; {writes if self.acked else 'no write load'}; seed {self.seed}; "
            f"{self.seconds:.1f} s"
        )

    def details(self) -> str:
        rows = [self.summary()]
        rows += [f"  kill {k.where}, died after '{k.last_line}'" for k in self.kills]
        rows += [f"  not reached: {m}" for m in self.missed]
        rows += [f"  failed rerun: {f}" for f in self.failures]
        rows += [f"  problem: {p}" for p in self.problems]
        rows += [f"  lost on {e}: {n}" for e, n in self.lost.items() if n]
        return "\n".join(rows)


@dataclass
class Sweep:
    """One command to sweep; `prepare` gives it work to do before each round (and the
    calibration), `check` asserts its postconditions after each completed round."""

    args: Sequence[str]
    target: Target
    points: int = 8
    load: WriteLoad | None = None
    prepare: Callable[[], None] = lambda: None
    check: Callable[[], None] = lambda: None
    env: Mapping[str, str] = field(default_factory=dict)
    max_rounds: int = 8  # rounds run only while points remain; this bounds a sweep that stalls
    healthy_after: bool = True  # False for commands that take the cluster away (down, reset)
    seed: int | None = None
    name: str = ""  # in the report; default: the command's words before its first option
    planted: Sequence[Inside] = ()  # exact places to die at too (tests.kill_inside), in order


# --- the sweep --------------------------------------------------------------------------------------


def kill_points(
    timeline: Sequence[Line], total: float, count: int, rng: random.Random
) -> list[KillPoint]:
    """Half at step boundaries spread evenly, half at uniformly random instants of the run."""
    steps = [(i, line) for i, line in enumerate(timeline) if STEP_MARK in line.text]
    if not steps:
        raise AssertionError("the command printed no step: nothing to kill between")
    boundaries = math.ceil(count / 2)
    points = set()
    for k in range(boundaries):
        index, line = steps[min(len(steps) - 1, int((k + 0.5) * len(steps) / boundaries))]
        points.add(KillPoint(index, 0.0, line.text))
    while len(points) < count:
        instant = rng.uniform(0.0, total)
        before = [(i, line) for i, line in enumerate(timeline) if line.at <= instant]
        index, at, text = (
            (before[-1][0], before[-1][1].at, before[-1][1].text) if before else (-1, 0.0, "")
        )
        points.add(KillPoint(index, round(instant - at, 3) or 0.001, text))
    return sorted(points)


def sweep(spec: Sweep) -> SweepReport:
    """Run the sweep of the module docstring; the report says what held and what did not."""
    seed = spec.seed if spec.seed is not None else int(os.environ.get("KILLSWEEP_SEED", "0") or 0)
    seed = seed or random.SystemRandom().randrange(1, 1 << 31)
    planned = spec.points + len(spec.planted)
    report = SweepReport(spec.name or _command_name(spec.args), seed, planned)
    started = time.monotonic()
    print(f"kill sweep of `{report.command}`: seed {seed} (KILLSWEEP_SEED={seed} replays it)")
    spec.prepare()
    calibration = run_cli(spec.args, spec.env)
    if calibration.code != 0:
        raise AssertionError(f"the uninterrupted run failed: {calibration.error}")
    _after_round(spec, report)
    total = calibration.lines[-1].at if calibration.lines else 1.0
    timed = kill_points(calibration.lines, total, spec.points, random.Random(seed))
    planted = list(spec.planted)
    while (timed or planted) and report.rounds < spec.max_rounds and not report.failures:
        report.rounds += 1
        spec.prepare()
        timed, planted = _round(_Chain(spec, report), calibration.lines, timed, planted)
        _after_round(spec, report)
    report.missed += [p.describe() for p in timed] + [f"planted {i.describe()}" for i in planted]
    if spec.load is not None:
        report.acked = len(spec.load.acked)
        try:
            report.lost = spec.load.missing(spec.target.endpoints)
        except httpx.TransportError as exc:  # the report says why, and which round failed
            report.failures.append(f"the acknowledged writes could not be read back: {exc}")
    report.seconds = time.monotonic() - started
    return report


def _command_name(args: Sequence[str]) -> str:
    """`certs rotate-ca`: the words before the first option."""
    words = []
    for arg in args:
        if arg.startswith("-"):
            break
        words.append(arg)
    return " ".join(words)


@dataclass
class _Chain:
    """The runs of one round: each killed run is followed at once by the next."""

    spec: Sweep
    report: SweepReport
    last: Kill | None = None

    def run(self, aim: Aim | None = None, planted: Inside | None = None) -> tuple[str, Outcome]:
        """One run: 'killed', 'completed', 'failed', or 'hopeless' (too many failed reruns)."""
        outcome = run_cli(self.spec.args, self.spec.env, aim, planted=planted)
        kill = None
        if outcome.point is not None:
            kind = "boundary" if outcome.point.boundary else "inside"
            kill = Kill(kind, outcome.point.describe(), outcome.last_line)
        elif planted is not None and outcome.code == -signal.SIGKILL:
            kill = Kill("planted", planted.describe(), outcome.last_line)
        if kill is not None:
            self.last = kill
            self.report.kills.append(kill)
            return "killed", outcome
        if outcome.code == 0:
            return "completed", outcome
        after = f"the kill {self.last.where}" if self.last else "a fresh start"
        self.report.failures.append(f"after {after}: {outcome.error}")
        if self.last is None:
            return "hopeless", outcome
        self.last.reruns += 1
        return ("hopeless" if self.last.reruns > MAX_FAILED_RERUNS else "failed"), outcome


def _round(
    chain: _Chain, timeline: Sequence[Line], timed: list[KillPoint], planted: list[Inside]
) -> tuple[list[KillPoint], list[Inside]]:
    """The planted places first (each run resumes the last and dies there), then the timed
    points as their lines come, until a run completes; returns the points not hit."""
    for _ in range(len(timed) + len(planted) + MAX_FAILED_RERUNS + 2):
        inside = planted[0] if planted else None
        status, outcome = chain.run(None if inside else Aim(timeline, timed), planted=inside)
        if status == "killed" and inside is not None:
            planted = planted[1:]
        elif status == "killed":
            timed = [p for p in timed if p != outcome.point]
        elif status in ("completed", "hopeless"):
            return _moved_in(timed, outcome.outran), planted
    chain.report.problems.append("a round did not complete within its run budget")
    return timed, planted


def _moved_in(
    timed: list[KillPoint], outran: tuple[KillPoint, KillPoint] | None
) -> list[KillPoint]:
    """The pending points, the one a completed run outran moved to where its run still was."""
    if outran is None:
        return timed
    point, moved = outran
    return sorted(moved if p == point else p for p in timed)


def _after_round(spec: Sweep, report: SweepReport) -> None:
    """Health, the command's postconditions, and nothing left behind."""
    if spec.healthy_after:
        unhealthy = _settled(spec.target.unhealthy, HEALTH_GRACE)
        report.problems += [f"round {report.rounds}: unhealthy {u}" for u in unhealthy]
    try:
        spec.check()
    except AssertionError as exc:
        report.problems.append(f"round {report.rounds}: postcondition: {exc}")
    left = _settled(spec.target.leftovers, LEFTOVER_GRACE)
    report.problems += [f"round {report.rounds}: left behind: {item}" for item in left]


def _settled(probe: Callable[[], list[str]], grace: float) -> list[str]:
    """`probe()` once it is empty, or its last answer after `grace` seconds."""
    deadline = time.monotonic() + grace
    found = probe()
    while found and time.monotonic() < deadline:
        time.sleep(0.25)
        found = probe()
    return found
