"""`etcdforge kubeadm ...`: config, apiserver flags, client certificates, migration."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from etcdforge.cli.common import EXIT_ERROR, cluster_options, progress_printer, warn

if TYPE_CHECKING:
    from etcdforge.ops.kubeadm import CheckRow, ClusterEndpoints
    from etcdforge.ops.target import Selection

F = TypeVar("F", bound=Callable[..., Any])
API_CHOICE = click.Choice(["v1beta3", "v1beta4"])


def path_options(func: F) -> F:
    """Where the kube-apiserver reads its etcd files; kubeadm's standard paths by default."""

    @click.option(
        "--ca-file",
        default="/etc/kubernetes/pki/etcd/ca.crt",
        show_default=True,
        help="etcd CA certificate path on the control plane.",
    )
    @click.option(
        "--cert-file",
        default="/etc/kubernetes/pki/apiserver-etcd-client.crt",
        show_default=True,
        help="apiserver-etcd-client certificate path.",
    )
    @click.option(
        "--key-file",
        default="/etc/kubernetes/pki/apiserver-etcd-client.key",
        show_default=True,
        help="apiserver-etcd-client key path.",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from etcdforge.kubeadm import KubeadmPaths

        kwargs["paths"] = KubeadmPaths(
            kwargs.pop("ca_file"), kwargs.pop("cert_file"), kwargs.pop("key_file")
        )
        return func(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _endpoint_warning(found: ClusterEndpoints) -> None:
    if found.warning:
        warn(found.warning)


@click.group("kubeadm")
def kubeadm_group() -> None:
    """Hand the cluster to Kubernetes: kubeadm config, apiserver flags, certs, migration."""


@kubeadm_group.command("config")
@cluster_options
@path_options
@click.option(
    "--api", type=API_CHOICE, help="kubeadm API version (default v1beta4; --merge: the file's)."
)
@click.option(
    "--merge",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Rewrite this kubeadm config file to use the cluster, keeping everything else.",
)
@click.option("--dry-run", is_flag=True, help="With --merge: print the result, write nothing.")
def config_cmd(
    selection: Selection, paths: Any, api: str | None, merge: Path | None, dry_run: bool
) -> None:
    """Print a ClusterConfiguration whose etcd.external points at this cluster."""
    from etcdforge.ops.kubeadm import config

    result = config(selection, paths, api, merge, dry_run)
    _endpoint_warning(result.endpoints)
    if merge is None or dry_run:
        click.echo(result.text, nl=False)
        return
    what = (
        f"etcd.{result.replaced} replaced by etcd.external"
        if result.replaced
        else "etcd.external added"
    )
    if result.changed:
        click.echo(f"{merge}: {what} ({len(result.endpoints.endpoints)} endpoints)")
    else:
        click.echo(
            f"{merge}: already points at cluster {result.endpoints.cluster}; nothing changed"
        )


@kubeadm_group.command("apiserver-flags")
@cluster_options
@path_options
def apiserver_flags_cmd(selection: Selection, paths: Any) -> None:
    """Print the kube-apiserver --etcd-* flags for control planes not made by kubeadm."""
    from etcdforge.ops.kubeadm import apiserver_flags

    flags, found = apiserver_flags(selection, paths)
    _endpoint_warning(found)
    click.echo("\n".join(flags))


@kubeadm_group.command("certs")
@cluster_options
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    help="Install into this directory, laid out like /etc/kubernetes/pki.",
)
@click.option(
    "--control-plane",
    "control_planes",
    multiple=True,
    metavar="HOST",
    help="Install on this control-plane host over SSH (repeatable).",
)
@click.option("--check", is_flag=True, help="Prove the installed files reach every endpoint.")
@click.option("--dry-run", is_flag=True, help="Print the steps that would run; change nothing.")
def certs_cmd(
    selection: Selection,
    out: Path | None,
    control_planes: tuple[str, ...],
    check: bool,
    dry_run: bool,
) -> None:
    """Issue the apiserver-etcd-client certificate and install it with the etcd CA certificate.

    Like kubeadm: CN kube-apiserver-etcd-client, clientAuth only, signed by the cluster CA; the
    key is 0600 and the CA key is never copied.
    """
    from etcdforge.kubeadm import KubeadmError
    from etcdforge.ops.kubeadm import LocalInstallation, certs

    if control_planes:
        raise KubeadmError(
            "--control-plane needs the SSH hosts layer, which this build does not have yet; "
            "use --out DIR and copy DIR to /etc/kubernetes/pki on each control plane"
        )
    if out is None:
        raise click.UsageError("give --out DIR (or --control-plane HOST)")
    result = certs(
        selection, [LocalInstallation(out.absolute())], check, dry_run, progress_printer()
    )
    if check:
        assert result.endpoints is not None
        _endpoint_warning(result.endpoints)
        _print_check(result.rows)
        if not all(row.ok for row in result.rows):
            raise click.exceptions.Exit(EXIT_ERROR)
        return
    assert result.plan is not None
    if dry_run:
        click.echo(f"{len(result.plan.pending)} step(s) would run")
        for title in result.plan.pending:
            click.echo(f"  - {title}")
    elif result.plan.changed:
        click.echo(f"installed in {out}: etcd/ca.crt, apiserver-etcd-client.crt, .key (0600)")
    else:
        click.echo(f"{out}: already installed and valid; nothing changed")


def _print_check(rows: tuple[CheckRow, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="apiserver-etcd-client write/read/delete under /registry/", title_justify="left"
    )
    for column in ("from", "endpoint", "result"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(row.where, row.endpoint, "[green]ok[/]" if row.ok else f"[red]{row.error}[/]")
    Console(width=None if sys.stdout.isatty() else 200).print(table)


@kubeadm_group.command("migrate")
@cluster_options
@path_options
@click.option("--from", "source", required=True, metavar="URL", help="One stacked etcd endpoint.")
@click.option(
    "--from-pki",
    "source_pki",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="kubeadm's etcd pki dir (ca.crt, healthcheck-client.crt ...) or a copy of it.",
)
@click.option("--replace", is_flag=True, help="Replace data the target cluster already holds.")
@click.option(
    "--no-bump-revision",
    "no_bump",
    is_flag=True,
    help="Do not bump revisions / mark compacted on restore (when etcd supports it).",
)
@click.option("--api", type=API_CHOICE, default="v1beta4", show_default=True)
@click.option("--dry-run", is_flag=True, help="Print the steps that would run; change nothing.")
def migrate_cmd(
    selection: Selection,
    paths: Any,
    source: str,
    source_pki: Path,
    replace: bool,
    no_bump: bool,
    api: str,
    dry_run: bool,
) -> None:
    """Move a kubeadm cluster's data from its stacked etcd into this cluster.

    Stop every kube-apiserver first. Snapshot, verify, restore into every member, compare
    every /registry/ key and value with the source, then print the kubeadm config to switch to.
    """
    from etcdforge.ops.kubeadm import migrate

    result = migrate(
        selection, source, source_pki, paths, api, replace, not no_bump, dry_run, progress_printer()
    )
    for message in result.warnings:
        warn(message)
    if dry_run:
        click.echo(f"{len(result.plan.pending)} step(s) would run, then start and verify")
        for title in result.plan.pending:
            click.echo(f"  - {title}")
        return
    bumped = f", revisions bumped by {result.bumped_by}" if result.bumped_by else ""
    click.secho(
        f"cluster {result.cluster}: {result.keys} /registry/ keys from {result.source} at revision "
        f"{result.revision}, identical on every member (sha256 {result.sha256[:16]}){bumped}; "
        f"snapshot kept at {result.snapshot}",
        err=True,
    )
    click.echo(result.config, nl=False)
