"""`etcdforge kubeadm ...`: config, apiserver flags, client certificates, migration."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypeVar

import click

from etcdforge.cli.common import (
    DIRECTORY,
    EXIT_ERROR,
    FILE,
    changing_options,
    cluster_options,
    exclusive,
    ssh_login_options,
    warn,
)

if TYPE_CHECKING:
    from etcdforge.hosts import SSHTarget
    from etcdforge.ops.kubeadm_certs import CheckRow
    from etcdforge.ops.kubeadm_config import ClusterEndpoints
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
    type=FILE,
    help="Rewrite this kubeadm config file to use the cluster, keeping everything else.",
)
@click.option("--dry-run", is_flag=True, help="With --merge: print the result, write nothing.")
def config_cmd(
    selection: Selection, paths: Any, api: str | None, merge: Path | None, dry_run: bool
) -> None:
    """Print a ClusterConfiguration whose etcd.external points at this cluster."""
    from etcdforge.ops.kubeadm_config import config

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
    from etcdforge.ops.kubeadm_config import apiserver_flags

    flags, found = apiserver_flags(selection, paths)
    _endpoint_warning(found)
    click.echo("\n".join(flags))


@kubeadm_group.command("certs")
@cluster_options
@click.option(
    "--out",
    type=DIRECTORY,
    help="Install into this directory, laid out like /etc/kubernetes/pki.",
)
@click.option(
    "--control-plane",
    "control_planes",
    multiple=True,
    metavar="[USER@]HOST[:PORT]",
    help="Install on this control-plane host over SSH (repeatable; IPv6 as [ADDR]:PORT).",
)
@click.option(
    "--pki-dir",
    default="/etc/kubernetes/pki",
    show_default=True,
    help="kubeadm's certificatesDir on the control-plane hosts.",
)
@ssh_login_options
@click.option("--check", is_flag=True, help="Prove the installed files reach every endpoint.")
@click.option("--dry-run", is_flag=True, help="Print the steps that would run; change nothing.")
def certs_cmd(
    selection: Selection,
    out: Path | None,
    control_planes: tuple[str, ...],
    pki_dir: str,
    logins: dict[str, Any],
    check: bool,
    dry_run: bool,
) -> None:
    """Issue the apiserver-etcd-client certificate and install it with the etcd CA certificate.

    Like kubeadm: CN kube-apiserver-etcd-client, clientAuth only, signed by the cluster CA; the
    key is 0600 and the CA key is never copied. With --control-plane, every host is logged in to
    and checked (root via sudo) before any is changed, and --check runs from each host.
    """
    from etcdforge.cli.progress import Board
    from etcdforge.ops.kubeadm_certs import LocalInstallation, certs, certs_on_hosts

    if out is None and not control_planes:
        raise click.UsageError("give --out DIR or --control-plane HOST")
    local = [LocalInstallation(out.absolute())] if out is not None else []
    targets = _targets(control_planes, logins)
    with Board() as board:
        if targets:
            hosts_dir = PurePosixPath(pki_dir)
            result = certs_on_hosts(selection, targets, hosts_dir, local, check, dry_run, board)
        else:
            result = certs(selection, local, check, dry_run, board)
    if check:
        assert result.endpoints is not None
        _endpoint_warning(result.endpoints)
        _print_check(result.rows)
        if not all(row.ok for row in result.rows):
            raise click.exceptions.Exit(EXIT_ERROR)
        return
    plan = result.plan
    assert plan is not None
    if dry_run:
        click.echo(f"{len(plan.pending)} step(s) would run")
        for title in plan.pending:
            click.echo(f"  - {title}")
        return
    for where, done in result.plans:
        if done.changed:
            click.echo(f"{where}: installed etcd/ca.crt, apiserver-etcd-client.crt, .key (0600)")
        else:
            click.echo(f"{where}: already installed and valid; nothing changed")


def _targets(values: tuple[str, ...], defaults: dict[str, Any]) -> list[SSHTarget]:
    """Every --control-plane parsed and validated before any host is contacted."""
    from etcdforge.host_logins import ssh_target
    from etcdforge.kubeadm import parse_control_plane

    targets = []
    for value in values:
        label, ssh = parse_control_plane(value, defaults)
        targets.append(ssh_target(label, label, ssh))
    return targets


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
@changing_options
@path_options
@click.option("--from", "source", required=True, metavar="URL", help="One stacked etcd endpoint.")
@click.option(
    "--from-pki",
    "source_pki",
    required=True,
    type=DIRECTORY,
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
    wait_lock: float,
) -> None:
    """Move a kubeadm cluster's data from its stacked etcd into this cluster.

    Stop every kube-apiserver first. Snapshot, verify, restore into every member, compare
    every /registry/ key and value with the source, then print the kubeadm config to switch to.
    """
    from etcdforge.ops.kubeadm_migrate import migrate

    with exclusive(selection, wait_lock, dry_run) as progress:
        result = migrate(
            selection,
            source,
            source_pki,
            paths,
            api,
            replace,
            not no_bump,
            dry_run,
            progress,
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
