"""Local cluster lifecycle: up, down, status, env."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from etcdforge.cli.common import (
    DIRECTORY,
    EXIT_ERROR,
    changing_options,
    cluster_options,
    exclusive,
    timeout_option,
    warn,
)
from etcdforge.cli.members import member_options, print_membership, removal_options

if TYPE_CHECKING:
    from etcdforge.ops.status import MemberStatus
    from etcdforge.ops.target import Selection


@click.command("up")
@changing_options
@click.option("--members", type=click.IntRange(1, 7), help="Member count for the default cluster.")
@click.option("--allow-even", is_flag=True, help="Accept an even member count.")
@click.option("--dry-run", is_flag=True, help="Print the steps that would run; change nothing.")
@timeout_option("Seconds to wait for every member to be healthy.")
@click.option(
    "--pki-dir",
    type=DIRECTORY,
    help="Import an existing cfssl PKI (ca.pem, server.pem, peer.pem, client.pem and keys).",
)
@removal_options
def up_cmd(
    selection: Selection,
    members: int | None,
    allow_even: bool,
    dry_run: bool,
    timeout: float,
    pki_dir: Path | None,
    yes: bool,
    purge_data: bool,
    wait_lock: float,
) -> None:
    """Create or resume a local mutual-TLS cluster and wait until it is healthy; members added
    to or removed from the spec join or leave it one at a time."""
    from etcdforge.ops.up import up

    options = member_options(selection, members, allow_even, yes or dry_run, purge_data)
    with exclusive(selection, wait_lock, dry_run) as progress:
        result = up(selection, members, allow_even, dry_run, progress, timeout, pki_dir, options)
    for message in result.warnings:
        warn(message)
    if dry_run:
        print_membership(result.membership, planned=True)
        click.echo(f"cluster {result.cluster}: {len(result.pending)} step(s) would run")
        for title in result.pending:
            click.echo(f"  - {title}")
        return
    summary = f"cluster {result.cluster}: {result.members} member(s), etcd {result.version}"
    if not result.changed:
        click.echo(f"{summary}: already running and healthy; nothing changed")
    elif result.started:
        click.echo(f"{summary}: started {', '.join(result.started)}; all healthy")
    else:
        click.echo(f"{summary}: updated files; all healthy")
    print_membership(result.membership)
    click.echo(f'state: {result.state_dir}   next: eval "$(etcdforge env)"; etcdforge status')


@click.command("down")
@changing_options
@click.option("--purge", is_flag=True, help="Also delete the data directories and the PKI.")
def down_cmd(selection: Selection, purge: bool, wait_lock: float) -> None:
    """Stop the local members (their data and PKI stay unless --purge)."""
    from etcdforge.ops.down import down

    with exclusive(selection, wait_lock) as progress:
        result = down(selection, purge, progress)
    if result.stopped:
        click.echo(f"cluster {result.cluster}: stopped {', '.join(result.stopped)}")
    else:
        click.echo(f"cluster {result.cluster}: no member was running")
    if purge:
        click.echo(f"deleted {len(result.purged)} path(s): data and PKI are gone")


@click.command("status")
@cluster_options
@click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)
def status_cmd(selection: Selection, output: str) -> None:
    """Members: version, leader, raft, db size/in use/fragmentation/quota, alarms, health.

    Exit 1 if any member is unhealthy (a raised alarm makes a member unhealthy).
    """
    from etcdforge.ops.status import status, version_advisories

    record, rows = status(selection)
    if output == "json":
        click.echo(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        _print_status_table(record.name, rows)
    for message in version_advisories(rows):
        warn(message)
    if not all(r.healthy for r in rows):
        raise click.exceptions.Exit(EXIT_ERROR)


def _print_status_table(cluster: str, rows: list[MemberStatus]) -> None:
    from rich.console import Console
    from rich.table import Table

    from etcdforge.maintenance import human_size

    table = Table(title=f"cluster {cluster}", title_justify="left")
    numbers = ("term", "index", "db size", "in use", "frag", "quota")
    for column in ("member", "endpoint", "version", "leader", *numbers, "alarms", "health"):
        table.add_column(column, justify="right" if column in numbers else "left", no_wrap=True)
    for row in rows:
        health = "[green]healthy[/]" if row.healthy else f"[red]{row.error or 'unhealthy'}[/]"
        frag = f"{row.fragmentation:.0f}%" if row.fragmentation is not None else "-"
        table.add_row(
            row.name,
            row.endpoint,
            row.version or "-",
            _role(row),
            str(row.raft_term) if row.raft_term is not None else "-",
            str(row.raft_index) if row.raft_index is not None else "-",
            human_size(row.db_size),
            human_size(row.db_in_use),
            frag,
            human_size(row.quota),
            f"[red]{', '.join(row.alarms)}[/]" if row.alarms else "-",
            health,
        )
    # A pipe has no width; never truncate an endpoint or an error to fit 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(table)


def _role(row: MemberStatus) -> str:
    """`*` for the leader; a learner shows how far it has caught up with the leader."""
    if row.is_learner:
        return "learner" + (f" {row.catch_up:.0%}" if row.catch_up is not None else "")
    return "*" if row.is_leader else ""


@click.command("env")
@cluster_options
def env_cmd(selection: Selection) -> None:
    """Print shell exports for etcdctl: eval "$(etcdforge env)"."""
    from etcdforge.ops.env import env_vars, render_exports

    click.echo(render_exports(env_vars(selection)), nl=False)
