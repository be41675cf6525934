"""Options and output helpers shared by every command group."""

from __future__ import annotations

import contextlib
import functools
import re
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from etcdforge.errors import EtcdforgeError
from etcdforge.interrupt import stop_at_safe_points

if TYPE_CHECKING:
    from etcdforge.cli.progress import Board
    from etcdforge.lock import Held
    from etcdforge.ops.target import Selection

EXIT_ERROR = 1
FILE = click.Path(path_type=Path, dir_okay=False)
DIRECTORY = click.Path(path_type=Path, file_okay=False)
F = TypeVar("F", bound=Callable[..., Any])
DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
MAX_WAIT_LOCK = 24 * 3600.0


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


def notice(message: str) -> None:
    """A line about the command itself (not an error): a stop on its way, where it stopped."""
    click.secho(message, fg="yellow", err=True)


def cluster_options(func: F) -> F:
    """-f / --state-dir / --cluster: how every command names its cluster."""

    @click.option(
        "-f",
        "--file",
        "file",
        type=FILE,
        help="Cluster YAML (default: the embedded local cluster).",
    )
    @click.option(
        "--state-dir",
        type=DIRECTORY,
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


def parse_duration(text: str) -> float:
    """Seconds in `90`, `30s`, `2m`, `1h30m` or `500ms` (Go's notation); ValueError otherwise."""
    value = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    parts = DURATION_PART.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"{text!r} is not a duration; use e.g. 30s, 2m or 1h30m")
    return sum(float(number) * DURATION_UNITS[unit] for number, unit in parts)


def _wait_lock(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    if seconds > MAX_WAIT_LOCK:
        raise click.BadParameter(f"{value!r} is more than 24h; wait at most 24h")
    return seconds


def wait_lock_option() -> Callable[[F], F]:
    """`--wait-lock DURATION`: how long a changing command waits for another one to finish."""
    return click.option(
        "--wait-lock",
        "wait_lock",
        default="0s",
        metavar="DURATION",
        callback=_wait_lock,
        help="When another command is changing this cluster, wait up to DURATION (30s, 2m, "
        "1h30m) for it instead of refusing at once.",
    )


def ssh_login_options(func: F) -> F:
    """--ssh-user/--ssh-port/--ssh-key/--known-hosts/--become/--ssh-timeout: the defaults of
    every `[USER@]HOST[:PORT]` given on the command line, passed on as `logins` (set ones only),
    in the keys of a member's `ssh` section."""

    @click.option("--ssh-user", help="Login user where HOST has no USER@  [default: root]")
    @click.option("--ssh-port", type=int, help="SSH port where HOST has no :PORT  [default: 22]")
    @click.option(
        "--ssh-key",
        type=FILE,
        help="Identity file (only this key is offered)  [default: agent and ~/.ssh/id_*]",
    )
    @click.option(
        "--known-hosts",
        type=FILE,
        help="known_hosts file; host keys are always checked  [default: ~/.ssh/known_hosts]",
    )
    @click.option(
        "--become/--no-become",
        default=None,
        help="Run as root with `sudo -n`  [default: when the user is not root]",
    )
    @click.option(
        "--ssh-timeout",
        type=float,
        default=10.0,
        show_default=True,
        help="Seconds to wait for each SSH login.",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        key, known = kwargs.pop("ssh_key"), kwargs.pop("known_hosts")
        logins = {
            "user": kwargs.pop("ssh_user"),
            "port": kwargs.pop("ssh_port"),
            "identity_file": key.expanduser().absolute() if key else None,
            "known_hosts": known.expanduser().absolute() if known else None,
            "become": kwargs.pop("become"),
            "connect_timeout": kwargs.pop("ssh_timeout"),
        }
        kwargs["logins"] = {k: v for k, v in logins.items() if v is not None}
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def changing_options(func: F) -> F:
    """A command that changes a cluster: how it names the cluster, and `--wait-lock`."""
    return cluster_options(wait_lock_option()(func))


@contextlib.contextmanager
def exclusive(selection: Selection, wait_lock: float, dry_run: bool = False) -> Iterator[Board]:
    """A changing command's context: the cluster's lock held around it (a dry run changes
    nothing: no lock), its progress display, and SIGTERM/Ctrl-C stopping it between steps."""
    # Imported here, as every command body does: `status` must not pay for what it never uses.
    from etcdforge.cli.progress import Board

    with stop_at_safe_points(notice), Board() as board:
        if dry_run:
            yield board
            return
        with _locked(selection, wait_lock, board) as held:
            yield board
    if held.lost is not None:
        warn(
            f"the cluster lock key was lost while this command ran and is now held by "
            f"{held.lost.describe()}; check what that command changed"
        )


@contextlib.contextmanager
def _locked(selection: Selection, wait_lock: float, board: Board) -> Iterator[Held]:
    from etcdforge.lock import hold
    from etcdforge.ops.target import locate

    with hold(locate(selection)[1], wait=wait_lock, notify=lambda m: board.step("lock", m)) as held:
        yield held
