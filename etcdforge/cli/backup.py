"""`etcdforge backup`: take a backup; `backup list`, `backup verify`, `backup schedule`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from etcdforge.cli.common import EXIT_ERROR, cluster_options, exclusive, wait_lock_option

if TYPE_CHECKING:
    from etcdforge.backups import BackupMeta
    from etcdforge.ops.target import Selection

DEST_HELP = "A directory or ssh://user@host[:port]/path (default: the spec's backup.dest)."
_GROUP_OPTIONS = "etcdforge.backup.options"


def _inherited(selection: Selection, dest: str | None) -> tuple[Selection, str | None]:
    """`backup -f x list` and `backup list -f x` alike: a subcommand's own options win."""
    context = click.get_current_context()
    given = context.meta.get(_GROUP_OPTIONS)
    if given is None:
        return selection, dest
    group_selection, group_dest = given
    own = selection.file or selection.state_dir or selection.cluster
    return (selection if own else group_selection), (dest if dest is not None else group_dest)


@click.group("backup", invoke_without_command=True)
@cluster_options
@click.option("--dest", metavar="DIR|ssh://USER@HOST/PATH", help=DEST_HELP)
@wait_lock_option()
@click.pass_context
def backup_group(
    ctx: click.Context, selection: Selection, dest: str | None, wait_lock: float
) -> None:
    """Take a verified snapshot of the live cluster, with metadata; apply retention.

    Subcommands: list, verify, schedule (-f, --state-dir and --dest may come before or after
    the subcommand's name).
    """
    if ctx.invoked_subcommand is not None:
        ctx.meta[_GROUP_OPTIONS] = (selection, dest)
        return
    from etcdforge.maintenance import human_size
    from etcdforge.ops.backup import backup

    with exclusive(selection, wait_lock) as progress:
        result = backup(selection, dest, progress)
    meta = result.meta
    click.echo(
        f"cluster {result.cluster}: backup at revision {meta.revision} from {meta.source} "
        f"({human_size(meta.size)}, sha256 {meta.sha256[:16]}, verified) in "
        f"{result.seconds:.1f} s: {result.location}"
    )
    if result.removed:
        click.echo(f"retention removed {len(result.removed)}: {', '.join(result.removed)}")


@backup_group.command("list")
@cluster_options
@click.option("--dest", metavar="DIR|ssh://USER@HOST/PATH", help=DEST_HELP)
@click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)
def list_cmd(selection: Selection, dest: str | None, output: str) -> None:
    """This cluster's backups at the destination, oldest first."""
    from etcdforge.backups import metadata_summary
    from etcdforge.ops.backup import list_backups

    selection, dest = _inherited(selection, dest)
    where, entries = list_backups(selection, dest)
    if output == "json":
        click.echo(json.dumps([metadata_summary(m) for m in entries], indent=2))
        return
    _print_list(where, entries)


def _print_list(where: str, entries: list[BackupMeta]) -> None:
    from rich.console import Console
    from rich.table import Table

    from etcdforge.maintenance import human_size

    table = Table(title=f"backups in {where}", title_justify="left")
    for column in ("file", "taken (UTC)", "revision", "size", "etcd", "from", "sha256"):
        table.add_column(column, no_wrap=True, justify="right" if column == "revision" else "left")
    for meta in entries:
        table.add_row(
            meta.file,
            meta.taken_at.replace("+00:00", "Z"),
            str(meta.revision),
            human_size(meta.size),
            meta.etcd_version,
            meta.source,
            meta.sha256[:16],
        )
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    if not entries:
        click.echo("no backups yet: run `etcdforge backup`")


@backup_group.command("verify")
@cluster_options
@click.option("--dest", metavar="DIR|ssh://USER@HOST/PATH", help=DEST_HELP)
@click.argument(
    "backup_file", metavar="FILE", required=False, type=click.Path(path_type=Path, dir_okay=False)
)
def verify_cmd(selection: Selection, dest: str | None, backup_file: Path | None) -> None:
    """Check FILE, or every backup at the destination: size, sha256, `snapshot status`.

    Exit 1 if any backup is bad.
    """
    from etcdforge.ops.backup import verify_backups

    selection, dest = _inherited(selection, dest)
    results = verify_backups(selection, backup_file, dest)
    for checked in results:
        if checked.meta is not None:
            click.echo(f"ok: {checked.location} (revision {checked.meta.revision})")
        else:
            click.secho(f"bad: {checked.error}", fg="red", err=True)
    if any(c.meta is None for c in results):
        raise click.exceptions.Exit(EXIT_ERROR)


@backup_group.command("schedule")
@cluster_options
@click.option("--dest", metavar="DIR|ssh://USER@HOST/PATH", help=DEST_HELP)
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Where to write the units (default: /etc/systemd/system as root, else "
    "~/.config/systemd/user).",
)
def schedule_cmd(selection: Selection, dest: str | None, out: Path | None) -> None:
    """Write a systemd .service and .timer that run `etcdforge backup` (OnCalendar from the
    spec's backup.schedule)."""
    from etcdforge.ops.backup_schedule import schedule

    selection, dest = _inherited(selection, dest)
    result = schedule(selection, out, dest)
    click.echo(f"wrote {result.service}")
    click.echo(f"wrote {result.timer} (OnCalendar={result.on_calendar})")
    directory = result.timer.parent
    flag = {Path("/etc/systemd/system"): "", Path.home() / ".config/systemd/user": " --user"}
    if directory in flag:
        user = flag[directory]
        enable = f"systemctl{user} enable --now {result.timer.name}"
        click.echo(f"next: systemctl{user} daemon-reload && {enable}")
    else:
        click.echo(
            "next: copy both into /etc/systemd/system (or ~/.config/systemd/user), then "
            f"`systemctl daemon-reload && systemctl enable --now {result.timer.name}`"
        )
