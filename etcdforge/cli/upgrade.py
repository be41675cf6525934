"""`etcdforge upgrade`: move a cluster to another etcd release (patch, or one minor at a time)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import click

from etcdforge.cli.common import (
    cluster_options,
    exclusive,
    timeout_option,
    wait_lock_option,
    warn,
)

if TYPE_CHECKING:
    from etcdforge.ops.target import Selection
    from etcdforge.ops.upgrade import UpgradeResult
    from etcdforge.ops.upgrade_run import UpgradeOutcome

VERSION = re.compile(r"^v?\d+\.\d+\.\d+$")


def _version(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not VERSION.match(value):
        raise click.BadParameter(f"{value!r} is not an etcd version like 3.5.30")
    return value.removeprefix("v")


@click.command("upgrade")
@cluster_options
@click.option(
    "--to", "to", required=True, metavar="X.Y.Z", callback=_version, help="The etcd version."
)
@click.option(
    "--binary",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Local clusters: the new etcd (its `etcd --version` must print X.Y.Z; etcdctl and "
    "etcdutl beside it are used for the snapshot). Default: the spec's etcd.binary.",
)
@click.option(
    "--release",
    metavar="URL|FILE|DIR",
    help="Clusters on hosts: the target's release tarball, when the spec names its release "
    "itself (default: the spec's source for version X.Y.Z).",
)
@click.option("--sha256", metavar="HEX", help="Clusters on hosts: pin the target tarball.")
@click.option("--dry-run", is_flag=True, help="Print the path, snapshot and member order only.")
@timeout_option(
    "Seconds to wait for the cluster, and for each member, to be healthy.",
    default=120.0,
    maximum=3600,
)
@wait_lock_option()
def upgrade_cmd(
    selection: Selection,
    to: str,
    binary: Path | None,
    release: str | None,
    sha256: str | None,
    dry_run: bool,
    timeout: float,
    wait_lock: float,
) -> None:
    """Upgrade every member, one at a time, to etcd X.Y.Z (a patch, or the next minor)."""
    from etcdforge.ops.upgrade import UpgradeRequest, upgrade

    request = UpgradeRequest(to, binary, release, sha256)
    with exclusive(selection, wait_lock, dry_run) as progress:
        result = upgrade(selection, request, dry_run, progress, timeout)
    for message in (*result.warnings, *result.advisories):
        warn(message)
    print_upgrade(result)


def print_outcome(outcome: UpgradeOutcome) -> None:
    """The path, the snapshot and the member order: shared by `upgrade` and `plan`."""
    if not outcome.new_snapshot:
        kept = "taken by the cut-short run of this upgrade, kept"
    else:
        kept = "to be taken, verified and kept" if outcome.dry_run else "verified, kept"
    click.echo(f"  path: {outcome.path}")
    click.echo(f"  snapshot ({kept}): {outcome.snapshot}")
    order = ", ".join(outcome.order) if outcome.order else "none left"
    click.echo(f"  member order (followers first, the leader last after a hand-off): {order}")
    if not outcome.dry_run:
        click.echo(
            f"  checked: cluster version {outcome.cluster_version}; every member's HashKV "
            f"agrees at revision {outcome.hash_revision}"
        )


def print_upgrade(result: UpgradeResult) -> None:
    outcome = result.outcome
    if outcome is None:
        click.echo(f"cluster {result.cluster}: {result.path}")
    elif outcome.dry_run:
        click.echo(f"cluster {result.cluster}: upgrade plan (nothing was changed)")
        print_outcome(outcome)
    else:
        click.echo(f"cluster {result.cluster}: every member runs etcd {result.target}")
        print_outcome(outcome)
    if result.spec_hint and not (outcome and outcome.dry_run):
        click.echo(f"next: {result.spec_hint} (apply and up refuse to go back)")
