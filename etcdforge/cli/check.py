"""`etcdforge check`: the audit of a live cluster, as a table, JSON and a Prometheus textfile."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from etcdforge.cli.common import cluster_options

if TYPE_CHECKING:
    from etcdforge.ops.check import CheckReport
    from etcdforge.ops.target import Selection

RESULT_STYLES = {"pass": "green", "warn": "yellow", "fail": "red"}


@click.command("check")
@cluster_options
@click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)
@click.option(
    "--textfile",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    metavar="DIR",
    help="Also write DIR/etcdforge.prom (Prometheus textfile collector), atomically.",
)
def check_cmd(selection: Selection, output: str, textfile: Path | None) -> None:
    """Audit a live cluster: CIS etcd benchmark, listeners, versions, certificates, health,
    storage and consistency between members; one row per check and member.

    Exit 0 when every check passes, 1 when any fails, 3 when some only warn. Read-only: takes no
    lock, safe from cron.
    """
    from etcdforge.ops.check import check, write_textfile

    report = check(selection)
    if textfile is not None:
        write_textfile(textfile, report)
    if output == "json":
        click.echo(json.dumps(report.as_json(), indent=2))
    else:
        _print_table(report)
    if report.exit_code:
        raise click.exceptions.Exit(report.exit_code)


def _print_table(report: CheckReport) -> None:
    from rich.console import Console
    from rich.table import Table

    from etcdforge.ops.check_model import Result

    counts = ", ".join(f"{report.count(r)} {r.value}" for r in Result)
    table = Table(title=f"cluster {report.cluster}: {counts}", title_justify="left")
    for column in ("check", "title", "member", "result", "seen", "fix"):
        table.add_column(column, no_wrap=column in ("check", "member", "result"))
    for row in report.rows:
        style = RESULT_STYLES[row.result.value]
        table.add_row(
            row.check, row.title, row.member, f"[{style}]{row.result.value}[/]", row.seen, row.fix
        )
    # A pipe has no width; keep rows readable in a log or a mail from cron.
    Console(width=None if sys.stdout.isatty() else 240).print(table)
