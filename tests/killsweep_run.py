"""One run of the CLI for the kill sweeps: its progress lines as they come, and a signal sent
to its PID at a chosen moment (see tests/killsweep.py for how the moments are chosen).

A moment is "this progress line, then this delay" (`KillPoint`), followed along a calibration
timeline by `Aim`, so a rerun that skips the steps already done still finds its moment.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from tests.helpers import REPO
from tests.kill_inside import Inside

STEP_MARK = "→"
#: Numbers that differ from run to run: a number standing alone (revision 86, 94 keys), three
#: digits or more anywhere (time stamps, PIDs, ports) and measures (90%, 3.7 MiB, 0.5 s). Names
#: and versions are kept: m2, etcd-1, 3.5.30, 10.0.0.2.
VARYING_NUMBER = re.compile(
    r"(?<![\w.-])\d+(?![\w.-])|\d{3,}|\d+(?:\.\d+)?(?=\s*(?:%|[KMG]i?B\b|s\b))"
)
RUN_TIMEOUT = 300.0  # one run of the command


@dataclass(frozen=True)
class Line:
    at: float  # seconds since the command was launched
    text: str


@dataclass(frozen=True, order=True)
class KillPoint:
    """Kill `delay` seconds after timeline line `index` appears (index -1: after launch); points
    sort in the order a run meets them."""

    index: int
    delay: float
    text: str

    @property
    def boundary(self) -> bool:
        return self.delay == 0.0

    def describe(self) -> str:
        where = f"'{self.text}'" if self.index >= 0 else "launch"
        return f"{where} + {self.delay:.2f} s" if not self.boundary else f"at {where}"


@dataclass
class Outcome:
    code: int | None  # None: killed by us
    lines: list[Line]
    stdout: str
    stderr: str
    point: KillPoint | None = None  # the point it was killed at
    outran: tuple[KillPoint, KillPoint] | None = None  # (a point armed when the run ended
    # before its instant, the same point moved into the time the run had after its line)

    @property
    def last_line(self) -> str:
        steps = [line.text for line in self.lines if STEP_MARK in line.text]
        return steps[-1] if steps else "(no step yet)"

    @property
    def error(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else f"exit {self.code}, no output"


def same_step(text: str) -> str:
    """A line with its varying numbers blanked: the step it names is the same in every run."""
    return VARYING_NUMBER.sub("#", text)


class Aim:
    """Maps a run's lines onto the calibration timeline and arms the kill for a pending point
    when its line comes. Lines are matched by text to the earliest timeline line not matched yet,
    not in strict order: hosts work in parallel, so their lines interleave differently each run.
    A point whose line this run never prints (a step found done) stays pending."""

    def __init__(self, timeline: Sequence[Line], pending: Sequence[KillPoint]) -> None:
        self.unmatched: dict[str, list[int]] = {}
        for index, line in enumerate(timeline):
            self.unmatched.setdefault(same_step(line.text), []).append(index)
        self.pending = list(pending)
        self.armed: tuple[float, KillPoint] | None = None
        self.armed_since = 0.0  # when the armed point's line came

    def outran(self, ended: float) -> tuple[KillPoint, KillPoint] | None:
        """The armed point moved into the time this run really had after its line: half of it.
        A run that skips steps a kill left done may end sooner after a line than the
        calibration did; the next try of the point must still land inside the run."""
        if self.armed is None:
            return None
        point = self.armed[1]
        delay = max(0.001, round((ended - self.armed_since) / 2, 3))
        return point, KillPoint(point.index, min(point.delay, delay), point.text)

    def launched(self, now: float) -> None:
        self._arm(-1, now)

    def seen(self, text: str, now: float) -> None:
        indexes = self.unmatched.get(same_step(text))
        if not indexes:
            return  # a line the calibration did not print (a rerun's own repair step)
        index = indexes.pop(0)
        if self.armed is not None and index > self.armed[1].index and now < self.armed[0]:
            # The armed instant's step ended sooner than in the calibration: kill now, late in
            # that step, rather than in a later one, whose own points would then be skipped.
            self.armed = (now, self.armed[1])
        self._arm(index, now)

    def _arm(self, index: int, now: float) -> None:
        point = next((p for p in self.pending if p.index == index), None)
        if self.armed is None and point is not None:
            self.armed = (now + point.delay, point)
            self.armed_since = now


@dataclass(frozen=True)
class Send:
    """What to send when the moment comes: SIGKILL to the CLI's PID by default; `group`: to its
    whole process group, as a terminal's Ctrl-C does; `times` > 1: again every `gap` seconds."""

    signum: signal.Signals = signal.SIGKILL
    group: bool = False
    times: int = 1
    gap: float = 0.3

    def to(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            (os.killpg if self.group else os.kill)(pid, self.signum)


KILL = Send()


def run_cli(
    args: Sequence[str],
    env: Mapping[str, str],
    aim: Aim | None = None,
    send: Send = KILL,
    planted: Inside | None = None,
    timeout: float = RUN_TIMEOUT,
) -> Outcome:
    """Run `etcdforge ARGS`; `send` to it when `aim` arms a point; with `planted`, through
    tests.kill_inside, which dies at that exact place by itself."""
    launcher = ["tests.kill_inside", planted.to_json(), "--"] if planted else ["etcdforge"]
    proc = subprocess.Popen(
        [sys.executable, "-m", *launcher, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
        start_new_session=True,  # the harness's own terminal signals never reach it
    )
    started = time.monotonic()
    lines: list[Line] = []
    out: list[str] = []
    err: list[str] = []
    woken = threading.Event()
    if aim is not None:
        aim.launched(started)

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:  # ends when the process (and anything holding the pipe) ends
            now = time.monotonic()
            err.append(raw)
            text = raw.strip()
            if text:
                lines.append(Line(now - started, text))
                if aim is not None:
                    aim.seen(text, now)
                    woken.set()

    def read_stdout() -> None:
        assert proc.stdout is not None
        out.extend(proc.stdout)

    readers = [threading.Thread(target=f, daemon=True) for f in (read_stderr, read_stdout)]
    for reader in readers:
        reader.start()
    point = _wait(proc, aim, woken, send, started + timeout)
    for reader in readers:
        reader.join(timeout=10)
    code = None if point is not None and send.signum == signal.SIGKILL else proc.returncode
    outran = aim.outran(time.monotonic()) if aim is not None and point is None else None
    return Outcome(code, lines, "".join(out), "".join(err), point, outran)


def _wait(
    proc: subprocess.Popen[str],
    aim: Aim | None,
    woken: threading.Event,
    send: Send,
    deadline: float,
) -> KillPoint | None:
    """Until the process ends: send when the armed point's time comes; returns it if it came."""
    fired: KillPoint | None = None
    due: list[float] = []  # when to send again (`send.times`)
    while proc.poll() is None:
        now = time.monotonic()
        if now > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise AssertionError(f"`etcdforge` did not finish in {RUN_TIMEOUT:.0f} s")
        armed = aim.armed if aim is not None and fired is None else None
        if armed is not None and now >= armed[0]:
            fired = armed[1]
            due = [now + i * send.gap for i in range(send.times)]
        if due and now >= due[0]:
            send.to(proc.pid)
            due.pop(0)
            continue
        next_at = due[0] if due else armed[0] if armed else now + 0.05
        woken.wait(max(0.0, min(0.05, next_at - now)))
        woken.clear()
    return fired


def signal_at(
    args: Sequence[str],
    at_line: Callable[[str], bool],
    send: Send,
    env: Mapping[str, str] | None = None,
    delay: float = 0.0,
) -> Outcome:
    """Run the CLI and `send` to it, `delay` s after the first line `at_line` accepts."""

    class _Once(Aim):
        def seen(self, text: str, now: float) -> None:
            if self.armed is None and at_line(text):
                self.armed = (now + delay, KillPoint(0, delay, text))

    return run_cli(args, env or {}, _Once([], []), send)
