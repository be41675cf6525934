"""`etcdforge defrag`: defragment members one at a time, or recover from NOSPACE."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from etcdforge.cli.common import cluster_options, exclusive, timeout_option, wait_lock_option

if TYPE_CHECKING:
    from etcdforge.ops.defrag import MemberDb
    from etcdforge.ops.target import Selection


def _threshold(_ctx: click.Context, _param: click.Parameter, value: str) -> float:
    from etcdforge.maintenance import parse_threshold

    try:
        return parse_threshold(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("defrag")
@cluster_options
@click.option(
    "--threshold",
    default="30%",
    show_default=True,
    callback=_threshold,
    help="Defragment members at least this fragmented (free pages / file size).",
)
@click.option("--all", "everything", is_flag=True, help="Defragment every member.")
@click.option(
    "--recover-nospace",
    is_flag=True,
    help="The NOSPACE alarm is raised: compact, defragment every member, disarm the alarm.",
)
@click.option("--dry-run", is_flag=True, help="Say which members would be defragmented.")
@timeout_option("Seconds to wait for health before and after each member.", default=120.0)
@wait_lock_option()
def defrag_cmd(
    selection: Selection,
    threshold: float,
    everything: bool,
    recover_nospace: bool,
    dry_run: bool,
    timeout: float,
    wait_lock: float,
) -> None:
    """Defragment members one at a time: followers first, the leader last after hand-off."""
    if recover_nospace:
        _recover(selection, dry_run, timeout, wait_lock)
        return
    from etcdforge.ops.defrag import defrag

    with exclusive(selection, wait_lock, dry_run) as progress:
        result = defrag(selection, threshold, everything, dry_run, progress, timeout)
    if not result.order:
        what = f"no member is {threshold:g}% fragmented with 1 MiB or more to give back"
        click.echo(f"cluster {result.cluster}: {what}; nothing to do")
        return
    if dry_run:
        click.echo(f"cluster {result.cluster}: would defragment {', '.join(result.order)}")
        return
    click.echo(f"cluster {result.cluster}: defragmented {', '.join(result.order)} (in that order)")
    _sizes(result.before, result.after)


def _recover(selection: Selection, dry_run: bool, timeout: float, wait_lock: float) -> None:
    from etcdforge.ops.nospace import recover_nospace

    if dry_run:
        raise click.UsageError("--recover-nospace has no --dry-run: it changes only what it must")
    with exclusive(selection, wait_lock) as progress:
        result = recover_nospace(selection, progress, timeout)
    if not result.had_alarm:
        click.echo(f"cluster {result.cluster}: no NOSPACE alarm is raised; nothing to do")
        return
    click.echo(
        f"cluster {result.cluster}: compacted at revision {result.compacted_at}, defragmented "
        "every member, NOSPACE disarmed; all healthy"
    )
    _sizes(result.before, result.after)


def _sizes(before: tuple[MemberDb, ...], after: tuple[MemberDb, ...]) -> None:
    from etcdforge.maintenance import human_size

    now = {db.name: db for db in after}
    for db in before:
        if db.name in now:
            click.echo(f"  {db.name}: {human_size(db.size)} -> {human_size(now[db.name].size)}")
