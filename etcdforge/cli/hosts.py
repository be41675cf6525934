"""Clusters on real hosts: plan, apply, reset."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from etcdforge.cli.common import (
    changing_options,
    cluster_options,
    exclusive,
    timeout_option,
    warn,
)
from etcdforge.cli.members import member_options, print_membership, removal_options
from etcdforge.cli.upgrade import print_outcome

if TYPE_CHECKING:
    from etcdforge.ops.apply import ApplyResult
    from etcdforge.ops.convert_report import AdoptionReport
    from etcdforge.ops.target import Selection


@click.command("plan")
@cluster_options
@click.option("--allow-even", is_flag=True, help="Accept an even member count.")
def plan_cmd(selection: Selection, allow_even: bool) -> None:
    """Show what `apply` (or `up`, for a local cluster) would change, membership changes first,
    each with why it is safe; change nothing."""
    from etcdforge.cli.progress import Board
    from etcdforge.ops.apply import apply
    from etcdforge.ops.target import spec_for_up
    from etcdforge.ops.up import up

    local = selection.file is not None and not spec_for_up(selection, None, allow_even)[0].on_hosts
    with Board() as board:
        if local:
            ran = up(selection, allow_even=allow_even, dry_run=True, progress=board)
        else:
            result = apply(selection, dry_run=True, progress=board, allow_even=allow_even)
    if local:
        for message in ran.warnings:
            warn(message)
        click.echo(f"cluster {ran.cluster}: local, etcd {ran.version}; plan (nothing was changed)")
        print_membership(ran.membership, planned=True)
        for title in ran.pending:
            click.echo(f"  - {title}")
        if not ran.pending and not ran.membership:
            click.echo("nothing to change")
        return
    for message in (*result.warnings, *result.advisories):
        warn(message)
    if result.adoption is not None:
        from etcdforge.cli.adopt import print_report

        print_report(result.adoption)
    _print_plan(result)


def _print_plan(result: ApplyResult) -> None:
    click.echo(f"cluster {result.cluster}: etcd {result.version}; plan (nothing was changed)")
    print_membership(result.membership, planned=True)
    count = 0
    if result.admin_changes:
        click.echo(f"admin machine ({result.state_dir}):")
        for title in result.admin_changes:
            click.echo(f"  - {title}")
    for host in result.hosts:
        lines = [*host.changes] + ([f"service: {host.service}"] if host.service else [])
        count += len(lines)
        click.echo(f"{host.label}: " + ("no change" if not lines else f"{len(lines)} change(s)"))
        for line in lines:
            click.echo(f"  - {line}")
    if result.upgrade is not None:
        click.echo("upgrade:")
        print_outcome(result.upgrade)
    if not result.changed_anything:
        click.echo("nothing to change: every host matches the spec and every member runs it")


@click.command("apply")
@changing_options
@click.option("--allow-even", is_flag=True, help="Accept an even member count.")
@timeout_option(
    "Seconds to wait for the cluster to be healthy (after starts, around each restart).",
    default=120.0,
    maximum=3600,
)
@removal_options
def apply_cmd(
    selection: Selection,
    allow_even: bool,
    timeout: float,
    yes: bool,
    purge_data: bool,
    wait_lock: float,
) -> None:
    """Deploy or converge the cluster on its hosts over SSH, then wait until it is healthy;
    members added to or removed from the spec join or leave it one at a time.

    An adopted cluster is converted first, one member at a time; before that, `apply` shows
    who is connected to the plain-http listener it drops and asks (unless --yes).
    """
    from etcdforge.cli.adopt import confirm_conversion
    from etcdforge.ops.apply import apply

    options = member_options(selection, None, allow_even, yes, purge_data)
    with exclusive(selection, wait_lock) as board:

        def ask(report: AdoptionReport) -> None:
            with board.paused():
                confirm_conversion(report)

        result = apply(
            selection,
            progress=board,
            timeout=timeout,
            allow_even=allow_even,
            options=options,
            confirm=None if yes else ask,
        )
    for message in (*result.warnings, *(result.advisories if result.upgrade else ())):
        warn(message)
    summary = f"cluster {result.cluster}: {len(result.hosts)} member(s), etcd {result.version}"
    if not result.changed_anything:
        click.echo(f"{summary}: healthy; nothing changed, nothing restarted")
    else:
        click.echo(f"{summary}: all healthy")
        for host in result.hosts:
            done = f"{len(host.changes)} change(s)" if host.changes else "no file change"
            service = f", {host.service.past}" if host.service else ""
            click.echo(f"  {host.label}: {done}{service}")
        if result.upgrade is not None:
            print_outcome(result.upgrade)
    print_membership(result.membership)
    click.echo(f"state: {result.state_dir}   next: etcdforge status -f FILE; etcdforge env -f FILE")


@click.command("reset")
@changing_options
@click.option("--purge-data", is_flag=True, help="Also delete the members' data directories.")
@click.option("--yes", is_flag=True, help="Do not ask before deleting data.")
def reset_cmd(selection: Selection, purge_data: bool, yes: bool, wait_lock: float) -> None:
    """Stop and remove what etcdforge installed on the hosts (data only with --purge-data)."""
    from etcdforge.ops.reset import reset

    if purge_data and not yes:
        click.confirm(
            "Delete every member's etcd data on the hosts? This destroys the cluster's contents",
            abort=True,
            err=True,
        )
    with exclusive(selection, wait_lock) as board:
        result = reset(selection, purge_data, progress=board)
    click.echo(f"cluster {result.cluster}: reset")
    for label, steps in result.removed:
        click.echo(f"  {label}: " + (", ".join(steps) if steps else "nothing left to remove"))
    if result.purged_data:
        click.echo("data deleted; the PKI stays in the state directory (CA keys)")
    else:
        click.echo("data dirs kept: `apply` starts the members on them again; --purge-data deletes")
