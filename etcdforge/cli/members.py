"""Membership: `member replace`, and the confirmation `up`/`apply` ask before removing members."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from etcdforge.cli.common import cluster_options, exclusive, timeout_option, wait_lock_option, warn
from etcdforge.errors import UnsafeOperationError

if TYPE_CHECKING:
    from etcdforge.ops.member_plan import MemberOptions
    from etcdforge.ops.target import Selection

F = TypeVar("F", bound=Callable[..., Any])


def removal_options(func: F) -> F:
    """`--yes` and `--purge-data`: what `up`/`apply` may do to members the spec dropped."""
    func = click.option(
        "--purge-data",
        is_flag=True,
        help="Delete the data dir of a member that leaves (default: renamed aside).",
    )(func)
    return click.option(
        "--yes",
        is_flag=True,
        help="Do not ask: remove members the spec dropped, convert an adopted cluster.",
    )(func)


def member_options(
    selection: Selection, members: int | None, allow_even: bool, yes: bool, purge_data: bool
) -> MemberOptions:
    """Ask before removing members the spec dropped (on a terminal); refuse unsafe plans now."""
    from etcdforge.ops.member_phase import preview
    from etcdforge.ops.member_plan import MemberOptions, check_confirmed

    options = MemberOptions(remove_any=yes, purge_data=purge_data, allow_even=allow_even)
    found = preview(selection, members, allow_even)  # an unsafe change stops here, before the lock
    if found is None or yes:
        return options
    cluster, plan = found
    names = [c.name for c in plan.removals if not c.replacing]
    if not names:
        return options
    if not sys.stdin.isatty():
        check_confirmed(plan, options, cluster)
    _show(plan.describe())
    data = "deleted" if purge_data else "renamed aside"
    click.confirm(
        f"Remove {', '.join(names)} from the cluster (their data dirs are {data})?",
        abort=True,
        err=True,
    )
    return dataclasses.replace(options, confirmed=frozenset(names))


def _show(lines: list[str]) -> None:
    click.echo("membership changes, in order:", err=True)
    for line in lines:
        click.echo(f"  {line}", err=True)


def print_membership(lines: tuple[str, ...], planned: bool = False) -> None:
    if not lines:
        return
    click.echo("membership changes, in order:" if planned else "membership changes done:")
    for line in lines:
        click.echo(f"  {line}" if planned else f"  - {line}")


@click.group("member")
def member_group() -> None:
    """Change a cluster's members (grow and shrink with `up`/`apply` and the spec)."""


@member_group.command("replace")
@click.argument("name")
@cluster_options
@click.option("--force", is_flag=True, help="Replace the member even though it is healthy.")
@click.option("--yes", is_flag=True, help="Do not ask before replacing.")
@click.option(
    "--purge-data", is_flag=True, help="Delete the old data dir (default: renamed aside)."
)
@click.option("--allow-even", is_flag=True, help="Accept an even member count.")
@timeout_option(
    "Seconds to wait for health and for the new member to catch up.", default=300.0, maximum=3600
)
@wait_lock_option()
def replace_cmd(
    selection: Selection,
    name: str,
    force: bool,
    yes: bool,
    purge_data: bool,
    allow_even: bool,
    timeout: float,
    wait_lock: float,
) -> None:
    """Rebuild member NAME (its data or host is lost): remove it, add it back empty as a
    learner (at the spec's address), promote it once it has caught up."""
    from etcdforge.ops.member_replace import plan_replace, replace

    checked = plan_replace(selection, name, force)
    if not yes and not checked.resumed:
        if not sys.stdin.isatty():
            raise UnsafeOperationError(
                f"member replace {name}: the old member is removed and rebuilt from the others; "
                "confirm on a terminal, or pass --yes"
            )
        _show(checked.describe())
        click.confirm(f"Replace member {name} of cluster {checked.cluster}?", abort=True, err=True)
    with exclusive(selection, wait_lock) as board:
        result = replace(selection, name, force, purge_data, board, timeout, allow_even, checked)
    for message in result.warnings:
        warn(message)
    old = f" (was ID {result.old_id})" if result.old_id else ""
    click.echo(f"cluster {result.cluster}: member {name} replaced{old}; all healthy")
    print_membership(result.steps)
    click.echo(f"state: {result.state_dir}   next: etcdforge status -f FILE")
