"""What a changing command shows while it runs: its phases, live on a terminal, or plain lines.

On a terminal one live display lists the command's phases with their elapsed time and, under the
phase that runs, the latest step on each member or host; `-v` also prints every step as a line
above it. When stderr is not a terminal (scripts, CI, logs) every phase and step is one plain
line, so logs keep the whole story and `grep` finds a step by its title.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import click


class Board:
    """Implements `ops.plan.Progress` for the CLI; use as a context manager."""

    def __init__(self, verbose: bool | None = None) -> None:
        self.verbose = _verbose() if verbose is None else verbose
        self.phases: list[tuple[str, float, float | None]] = []  # name, started, ended
        self.failed = False
        self.latest: dict[str, str] = {}  # where -> latest step, in the running phase
        self.live: Any = None

    def __enter__(self) -> Board:
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            console = Console(stderr=True)
            self.live = Live(self._render(), console=console, refresh_per_second=4)
            self.live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.failed = exc_type is not None
        self._close_phase()
        if not self.failed:
            self.latest = {}  # done: the phases and their times are the summary
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(exc_type, exc, tb)

    # --- ops.plan.Progress -----------------------------------------------------------------

    def phase(self, name: str) -> None:
        self._close_phase()
        self.phases.append((name, time.monotonic(), None))
        self.latest = {}
        if self.live is not None:
            self.live.update(self._render())
        else:
            click.secho(f"• {name}", err=True, bold=True)

    def step(self, where: str, message: str) -> None:
        self.latest[where] = message
        line = f"  → {where}: {message}" if where else f"  → {message}"
        if self.live is None:
            click.secho(line, err=True, dim=True)
            return
        if self.verbose:
            self.live.console.print(line, style="dim", highlight=False)
        self.live.update(self._render())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No redrawing while the user answers a question on the terminal."""
        if self.live is None:
            yield
            return
        self.live.stop()
        try:
            yield
        finally:
            self.live.start()

    # --- rendering --------------------------------------------------------------------------

    def _close_phase(self) -> None:
        if self.phases and self.phases[-1][2] is None:
            name, started, _ = self.phases[-1]
            self.phases[-1] = (name, started, time.monotonic())

    def _render(self) -> Any:
        from rich.table import Table

        table = Table(box=None, show_header=False, pad_edge=False)
        now = time.monotonic()
        for index, (name, started, ended) in enumerate(self.phases):
            last = index == len(self.phases) - 1
            mark = "[yellow]…[/]" if ended is None else "[green]✓[/]"
            mark = "[red]✗[/]" if last and self.failed else mark
            took = (ended if ended is not None else now) - started
            table.add_row(mark, f"[bold]{name}[/]", f"[dim]{took:5.1f} s[/]", "")
        for where, message in self.latest.items():
            table.add_row("", "", "", f"[dim]{where}:[/] {message}" if where else message)
        return table


def _verbose() -> bool:
    context = click.get_current_context(silent=True)
    root = context.find_root() if context is not None else None
    return bool(root is not None and root.obj and root.obj.get("verbose"))
