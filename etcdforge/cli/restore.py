"""`etcdforge restore` (the whole cluster from one backup) and `etcdforge recover` (quorum lost
for good)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from etcdforge.cli.common import cluster_options, exclusive, wait_lock_option, warn

if TYPE_CHECKING:
    from etcdforge.ops.cluster_restore import Restored
    from etcdforge.ops.recover import RecoveryPlan
    from etcdforge.ops.target import Selection


def _confirm(yes: bool, question: str) -> None:
    """Destroying data needs --yes, or a yes typed on a terminal."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.UsageError(f"{question} Pass --yes to confirm (stdin is not a terminal).")
    if not click.confirm(question, err=True):
        raise click.Abort()


def _report(done: Restored, what: str) -> None:
    from etcdforge.ops.recover import NEWEST_BACKUP

    for message in done.warnings:
        warn(message)
    result, state = done.result, done.state
    assert result is not None
    bumped = f", revisions bumped by {state.bump_by:,}" if state.bump_by else ""
    newest = state.source == NEWEST_BACKUP
    source = f"{state.source}, {state.snapshot}" if newest else state.source
    click.echo(
        f"cluster {done.cluster}: {what} from {source} (revision {state.revision}{bumped}); "
        f"every member healthy at revision {result.revision} with {result.keys} key(s) and the "
        f"same keyspace hash; cluster ID {result.cluster_id}"
        + (f" (was {state.old_cluster_id})" if state.old_cluster_id else "")
    )


@click.command("restore")
@cluster_options
@click.argument("snapshot", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--yes", is_flag=True, help="Replace every member's data without asking.")
@click.option(
    "--other-cluster",
    is_flag=True,
    help="Accept a snapshot of another cluster, or one without etcdforge's metadata.",
)
@click.option(
    "--no-bump-revision",
    "no_bump",
    is_flag=True,
    help="Do not bump revisions / mark them compacted (watchers then miss the jump back).",
)
@click.option("--dry-run", is_flag=True, help="Check the snapshot and the room; change nothing.")
@wait_lock_option()
def restore_cmd(
    selection: Selection,
    snapshot: Path,
    yes: bool,
    other_cluster: bool,
    no_bump: bool,
    dry_run: bool,
    wait_lock: float,
) -> None:
    """Restore the whole cluster from SNAPSHOT (a backup): every member, a new cluster ID.

    The snapshot is verified and every data dir checked for room first; the old data is kept
    aside until the restored cluster is healthy and verified. A killed restore resumes on rerun.
    """
    from etcdforge.ops.cluster_restore import restore_cluster

    if not dry_run:
        _confirm(yes, f"Replace all data of the cluster with {snapshot}?")
    with exclusive(selection, wait_lock, dry_run) as progress:
        done = restore_cluster(selection, snapshot, other_cluster, not no_bump, dry_run, progress)
    if dry_run:
        for message in done.warnings:
            warn(message)
        click.echo(
            f"cluster {done.cluster}: {snapshot} verifies (revision {done.state.revision}) and "
            "every data dir has room; a restore would replace every member's data"
        )
        return
    _report(done, "restored")


@click.command("recover")
@cluster_options
@click.option(
    "--from",
    "from_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Recover from this backup (default: the newest verified backup).",
)
@click.option("--from-member", help="Recover from this surviving member's own database.")
@click.option("--yes", is_flag=True, help="Rebuild without asking.")
@click.option("--dry-run", is_flag=True, help="Print the plan: what will be lost; change nothing.")
@wait_lock_option()
def recover_cmd(
    selection: Selection,
    from_file: Path | None,
    from_member: str | None,
    yes: bool,
    dry_run: bool,
    wait_lock: float,
) -> None:
    """Rebuild a cluster whose quorum is lost for good, at the spec's size, from one database.

    Every member is restored from a backup or a surviving member's database, with a new cluster
    ID. Refused while a majority of members still follows a leader.
    """
    from etcdforge.ops.recover import plan, recover

    if from_file is not None and from_member is not None:
        raise click.UsageError("--from and --from-member exclude each other")
    found = plan(selection, from_file, from_member)
    _print_plan(found)
    if dry_run:
        return
    _confirm(yes, f"Rebuild cluster {found.cluster} from {found.source}, losing {found.loss}?")
    with exclusive(selection, wait_lock) as progress:
        done = recover(selection, from_file, from_member, progress)
    _report(done, "recovered")


def _print_plan(found: RecoveryPlan) -> None:
    click.echo(f"cluster {found.cluster}: recovery plan")
    for member in found.members:
        if member.answers:
            lead = "follows a leader" if member.leader else "no leader"
            click.echo(f"  {member.name}: answers, revision {member.revision}, {lead}")
        else:
            click.echo(f"  {member.name}: does not answer ({member.error})")
    at = f" at revision {found.source_revision}" if found.source_revision is not None else ""
    click.echo(f"  source: {found.source}{at}")
    click.echo(f"  lost: {found.loss}")
    click.echo("  then: every member restored from the source with a new cluster ID, started")
