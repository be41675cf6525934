"""Stopping a changing command at a safe point: SIGTERM and Ctrl-C end it between two steps.

Every changing command is a plan of steps that check live state first, so a run that ends between
two steps leaves nothing half-done and a rerun continues from there. A signal therefore only sets
a flag; the plan runner (`ops.plan`) calls `checkpoint` before each step, and long waits (health,
the lock) call it on every poll, so the command stops at the next such point, never in the middle
of a step (a rename pair, a restart, an upload). A second signal stops at once, as a kill would:
the rerun still continues, it just finds more to check.

The CLI installs the handlers around each changing command (`stop_at_safe_points`) and turns
`Stopped` into one line and the exit code 128 + the signal number (130 for Ctrl-C, 143 for
SIGTERM), as a shell reports a command ended by that signal.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_requested: list[signal.Signals] = []  # the first stop signal received, if any


class Stopped(BaseException):  # a stop, not an error: `except Exception` must let it by
    """A stop signal arrived and the command reached a safe point; a rerun continues."""

    def __init__(self, signum: signal.Signals, where: str) -> None:
        super().__init__(f"stopped by {signum.name} {where}; rerun the same command to continue")
        self.signum = signum
        self.where = where

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def stop_requested() -> signal.Signals | None:
    return _requested[0] if _requested else None


def checkpoint(where: str) -> None:
    """Raise `Stopped` (naming `where`) if a stop signal arrived; a no-op otherwise."""
    signum = stop_requested()
    if signum is not None:
        raise Stopped(signum, where)


def before_step(title: str, where: str = "") -> None:
    """The checkpoint between two steps of a plan: everything before `title` is complete."""
    on = f" on {where}" if where else ""
    checkpoint(f"before step '{title}'{on} (the steps before it are complete)")


@contextlib.contextmanager
def stop_at_safe_points(notify: Callable[[str], None]) -> Iterator[None]:
    """Within this block the first SIGINT/SIGTERM only asks for a stop (`notify` hears it);
    a second one interrupts at once. The previous handlers come back afterwards."""
    previous = {s: signal.getsignal(s) for s in SIGNALS}

    def at_once(signum: int, frame: FrameType | None) -> None:
        raise Stopped(signal.Signals(signum), "at once (a second signal), maybe inside a step")

    def first(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum)
        _requested.append(name)
        for s in SIGNALS:
            signal.signal(s, at_once)
        notify(
            f"{name.name} received: stopping at the next safe point (between steps); "
            "send it again to stop at once"
        )

    _requested.clear()
    for s in SIGNALS:
        signal.signal(s, first)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested.clear()
