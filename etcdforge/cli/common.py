"""Options and output helpers shared by every command group."""

from __future__ import annotations

import functools
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from etcdforge.errors import EtcdforgeError

EXIT_ERROR = 1
F = TypeVar("F", bound=Callable[..., Any])


def report_error(exc: BaseException, debug: bool) -> int:
    """One red line on stderr; the traceback only with --debug."""
    if debug:
        traceback.print_exception(exc)
    if isinstance(exc, EtcdforgeError):
        message = str(exc)
    elif isinstance(exc, KeyboardInterrupt):
        message = "interrupted; rerun the same command to resume"
    else:
        message = (
            f"internal error: {exc.__class__.__name__}: {exc} (rerun with --debug and report it)"
        )
    click.secho(f"error: {message}", fg="red", err=True)
    return EXIT_ERROR


def cluster_options(func: F) -> F:
    """-f / --state-dir / --cluster: how every command names its cluster."""

    @click.option(
        "-f",
        "--file",
        "file",
        type=click.Path(path_type=Path, dir_okay=False),
        help="Cluster YAML (default: the embedded local cluster).",
    )
    @click.option(
        "--state-dir",
        type=click.Path(path_type=Path, file_okay=False),
        envvar="ETCDFORGE_STATE_DIR",
        help="This cluster's state directory (default: $XDG_STATE_HOME/etcdforge/<cluster>).",
    )
    @click.option("--cluster", "cluster", help="Cluster name when no -f is given.", default=None)
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from etcdforge.ops.target import Selection

        kwargs["selection"] = Selection(
            file=kwargs.pop("file"),
            state_dir=kwargs.pop("state_dir"),
            cluster=kwargs.pop("cluster"),
        )
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def progress_printer() -> Callable[[str], None]:
    def show(message: str) -> None:
        click.secho(f"  → {message}", err=True, dim=True)

    return show


def warn(message: str) -> None:
    click.secho(f"warning: {message}", fg="yellow", err=True)


def timeout_option(
    help_text: str, default: float = 60.0, maximum: float = 600.0
) -> Callable[[F], F]:
    """`--timeout SECONDS`: how long a command waits for cluster health."""
    return click.option(
        "--timeout",
        type=click.FloatRange(1, maximum),
        default=default,
        show_default=True,
        help=help_text,
    )
