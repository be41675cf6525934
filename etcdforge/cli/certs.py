"""`etcdforge certs`: cfssl-compatible issuing, check, renewal and CA rotation."""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from etcdforge.cli.common import (
    DIRECTORY,
    EXIT_ERROR,
    FILE,
    changing_options,
    cluster_options,
    exclusive,
    timeout_option,
)

if TYPE_CHECKING:
    from etcdforge.ops.cert_check import CheckReport
    from etcdforge.ops.target import Selection

WINDOW = re.compile(r"^(\d+)([dhm]?)$")


def _window(_ctx: click.Context, _param: click.Parameter, value: str) -> dt.timedelta:
    """`30` or `30d` days, `12h` hours, `90m` minutes."""
    match = WINDOW.match(value.strip())
    if not match:
        raise click.BadParameter(f"{value!r}: use days (30 or 30d), hours (12h) or minutes (90m)")
    unit = {"": "days", "d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
    return dt.timedelta(**{unit: int(match.group(1))})


warn_option = click.option(
    "--warn-within",
    default="30d",
    show_default=True,
    callback=_window,
    help="Flag certificates expiring within this window (30d, 12h, 90m).",
)


@click.group("certs")
def certs_group() -> None:
    """Certificates: cfssl-compatible gencert, check, renew, rotate-ca."""


@certs_group.command("gencert")
@click.option("-initca", "initca", is_flag=True, help="Create a self-signed CA from the CSR.")
@click.option("-ca", "ca", type=FILE, help="CA cert.")
@click.option("-ca-key", "ca_key", type=FILE, help="CA key.")
@click.option("-config", "config", type=FILE, help="ca-config.json.")
@click.option("-profile", "profile", help="Signing profile in the config (default: default).")
@click.option("-hostname", "hostname", help="Comma-separated hosts overriding the CSR's hosts.")
@click.option("-bare", "bare", help="File name prefix (default: ca, or the profile name).")
@click.option(
    "--out",
    "-out",
    "out",
    type=DIRECTORY,
    default=Path("."),
    help="Directory for NAME.pem, NAME-key.pem, NAME.csr (default: current).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing CA key with -initca.")
@click.argument("csr_file", type=FILE)
def gencert_cmd(
    initca: bool,
    ca: Path | None,
    ca_key: Path | None,
    config: Path | None,
    profile: str | None,
    hostname: str | None,
    bare: str | None,
    out: Path,
    force: bool,
    csr_file: Path,
) -> None:
    """Like `cfssl gencert ... | cfssljson -bare NAME`, from the same JSON files.

    \b
    etcdforge certs gencert -initca ca-csr.json
    etcdforge certs gencert -ca ca.pem -ca-key ca-key.pem -config ca-config.json \\
        -profile server etcd.json
    """
    from etcdforge.ops.gencert import gencert

    result = gencert(
        csr_file,
        out,
        initca=initca,
        ca=ca,
        ca_key=ca_key,
        config=config,
        profile=profile,
        bare=bare,
        hostname=hostname,
        force=force,
    )
    files = result.files
    click.echo(f"wrote {files.cert}, {files.key}, {files.csr}")
    sans = ", ".join(result.sans) or "none"
    click.echo(
        f"  subject {result.subject}; SANs {sans}; serial {result.serial:x}; "
        f"expires {result.not_after:%Y-%m-%d %H:%M} UTC"
    )


@certs_group.command("check")
@cluster_options
@click.option(
    "--pki-dir",
    type=DIRECTORY,
    help="Check a cfssl directory (ca.pem, server.pem, ...) instead of a deployed cluster; "
    "with -f, also its member addresses.",
)
@warn_option
@click.option(
    "-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True
)
def check_cmd(
    selection: Selection, pki_dir: Path | None, warn_within: dt.timedelta, output: str
) -> None:
    """One row per certificate; exit 1 if any is expiring, expired or wrong for its role."""
    from etcdforge.ops.cert_check import check

    report = check(selection, warn_within, pki_dir)
    if output == "json":
        click.echo(json.dumps([row.as_json() for row in report.rows], indent=2))
    else:
        _print_check_table(report)
    if not report.ok:
        raise click.exceptions.Exit(EXIT_ERROR)


def _print_check_table(report: CheckReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=report.source, title_justify="left")
    for column in ("name", "subject", "SANs", "usages", "not after", "left", "issuer", "status"):
        table.add_column(column, overflow="fold")
    for row in report.rows:
        status = "[green]ok[/]" if row.ok else f"[red]{row.status}[/]"
        table.add_row(
            row.name,
            row.subject,
            ", ".join(row.sans) or "-",
            ", ".join(row.usages) or "-",
            row.not_after[:16].replace("T", " ") if row.not_after else "-",
            row.remaining or "-",
            row.issuer,
            status,
        )
    Console(width=None if sys.stdout.isatty() else 220).print(table)


@certs_group.command("renew")
@changing_options
@click.option("--all", "all_leaves", is_flag=True, help="Every member certificate and the admin's.")
@click.option("--member", help="Only this member's server and peer certificates.")
@click.option("--new-key", is_flag=True, help="Generate new keys too (default: keep the keys).")
@click.option("--days", type=click.IntRange(1, 36500), help="Validity (default: the spec's).")
@warn_option
@click.option("--dry-run", is_flag=True, help="Print what would be renewed; change nothing.")
def renew_cmd(
    selection: Selection,
    all_leaves: bool,
    member: str | None,
    new_key: bool,
    days: int | None,
    warn_within: dt.timedelta,
    dry_run: bool,
    wait_lock: float,
) -> None:
    """Reissue leaf certificates in place; running members serve them on the next handshake.

    Without --all or --member, renews what `certs check` flags (expiring, wrong, mismatched).
    """
    from etcdforge.ops.renew import renew

    if all_leaves and member:
        raise click.UsageError("--all and --member exclude each other")
    with exclusive(selection, wait_lock, dry_run) as progress:
        result = renew(
            selection,
            all_leaves=all_leaves,
            member=member,
            new_key=new_key,
            days=days,
            warn_within=warn_within,
            dry_run=dry_run,
            progress=progress,
        )
    if dry_run:
        click.echo(
            f"cluster {result.cluster}: {len(result.pending)} certificate(s) would be renewed"
        )
        for title in result.pending:
            click.echo(f"  - {title}")
    elif not result.renewed:
        click.echo(f"cluster {result.cluster}: nothing to renew")
    elif result.on_hosts:
        click.echo(
            f"cluster {result.cluster}: renewed {len(result.renewed)} certificate(s) on the "
            "admin machine; run `etcdforge apply -f ...` to install them on the hosts "
            "(members serve them on new connections, no restart)"
        )
    else:
        click.echo(
            f"cluster {result.cluster}: renewed {len(result.renewed)} certificate(s); "
            "members serve them on new connections, no restart"
        )


@certs_group.command("rotate-ca")
@changing_options
@click.option(
    "--stop-after",
    type=click.Choice(["trust", "reissue"]),
    help="Pause after a phase (e.g. to hand the new CA bundle to other clients); rerun to go on.",
)
@click.option("--dry-run", is_flag=True, help="Print the steps that would run; change nothing.")
@timeout_option("Seconds to wait for health after each member restart.")
def rotate_ca_cmd(
    selection: Selection, stop_after: str | None, dry_run: bool, timeout: float, wait_lock: float
) -> None:
    """Replace the CAs with no downtime: trust old+new, reissue, drop the old. Resumable."""
    from etcdforge.ops.rotate_ca import rotate_ca

    with exclusive(selection, wait_lock, dry_run) as progress:
        result = rotate_ca(
            selection, stop_after=stop_after, dry_run=dry_run, progress=progress, timeout=timeout
        )
    if dry_run:
        click.echo(f"cluster {result.cluster}: {len(result.pending)} step(s) would run")
        for title in result.pending:
            click.echo(f"  - {title}")
        return
    restarted = ", ".join(result.restarted) if result.restarted else "none"
    if result.phase == "done":
        click.echo(f"cluster {result.cluster}: CA rotation complete; restarted {restarted}")
    else:
        click.echo(
            f"cluster {result.cluster}: CA rotation paused after phase '{result.phase}'; "
            f"restarted {restarted}; rerun `etcdforge certs rotate-ca` to continue"
        )
