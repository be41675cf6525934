"""`etcdforge adopt`: read a hand-built cluster and write its cluster YAML and admin state."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from etcdforge.cli.common import DIRECTORY, FILE, ssh_login_options

if TYPE_CHECKING:
    from etcdforge.adopt_findings import Finding
    from etcdforge.ops.convert_report import AdoptionReport


@click.command("adopt")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    metavar="[USER@]HOST[:PORT]",
    help="A member's host, over SSH (repeat for every member; IPv6 as [ADDR]:PORT).",
)
@ssh_login_options
@click.option("-o", "--output", type=FILE, required=True, help="The cluster YAML to write.")
@click.option("--name", help="Cluster name  [default: the cluster's initial-cluster token]")
@click.option(
    "--state-dir",
    type=DIRECTORY,
    help="The adopted cluster's state directory (written into the YAML)  "
    "[default: $XDG_STATE_HOME/etcdforge/<name>]",
)
@click.option(
    "--release",
    help="etcd release for `apply` (URL, tarball or directory)  [default: the version found, "
    "from GitHub]",
)
def adopt_cmd(
    hosts: tuple[str, ...],
    logins: dict[str, Any],
    output: Path,
    name: str | None,
    state_dir: Path | None,
    release: str | None,
) -> None:
    """Adopt a running cluster built by hand (the seed runbook): read every member, change
    nothing on the hosts, write the cluster YAML and the admin state (the imported PKI).

    Refused, with nothing written, when a host is unreachable or runs no etcd, when a file the
    members' flags name is missing, when the hosts belong to two clusters, when the members
    disagree on the CA, or when the member list does not match the hosts.
    """
    from etcdforge.cli.progress import Board
    from etcdforge.kubeadm import parse_control_plane
    from etcdforge.ops.adopt import Target, adopt

    targets = [Target(*parse_control_plane(h, logins, option="--host")) for h in hosts]
    with Board() as board:
        result = adopt(targets, output, name, state_dir, release, progress=board)
    found = result.adopted
    click.echo(
        f"cluster {result.cluster}: adopted {len(found.members)} member(s) of cluster "
        f"{found.cluster_id} (etcd {found.version}); nothing on the hosts was changed"
    )
    for member in found.members:
        click.echo(f"  {member.name}  id {member.id}  {member.label}  data {found.data_dir}")
    click.echo(f"wrote {result.spec_path}; state: {result.state_dir} (PKI imported, CA key 0600)")
    print_findings(result.findings)
    click.echo(f"next: etcdforge plan -f {result.spec_path}; etcdforge apply -f {result.spec_path}")


def print_findings(findings: tuple[Finding, ...] | list[Finding], err: bool = False) -> None:
    if not findings:
        click.echo("findings: none", err=err)
        return
    click.echo(f"findings ({len(findings)}):", err=err)
    for finding in findings:
        click.echo(f"  - {finding.title}", err=err)
        for where in finding.where:
            click.echo(f"      {where}", err=err)
        click.echo(f"    fix: {finding.fix}", err=err)


def print_report(report: AdoptionReport, err: bool = False) -> None:
    """An adopted cluster in `plan` (and before `apply` converts it): findings, conversion,
    and who the conversion cuts off the plain-http listener."""
    state = "converted" if report.converted else "not converted yet"
    click.echo(f"adopted cluster: {state}", err=err)
    print_findings(report.findings, err)
    if report.converted:
        return
    click.echo(
        "conversion, one member at a time (each only while the cluster is healthy; the leader "
        "last, after handing its leadership off; each must be healthy and caught up):",
        err=err,
    )
    for index, step in enumerate(report.steps, 1):
        leader = ", the leader" if step.leader else ""
        click.echo(f"  {index}. {step.label}{leader}: {step.what}", err=err)
    if report.ca_keys:
        keys = ", ".join(report.ca_keys)
        click.echo(f"  then, all converted and healthy: delete the CA key ({keys})", err=err)
    click.echo("clients of the plain-http listener (the conversion cuts them off):", err=err)
    for label, clients in report.clients:
        found = ", ".join(f"{c.process} (pid {c.pid}) from {c.local}" for c in clients)
        click.echo(f"  {label}: {found or 'none'}", err=err)


def confirm_conversion(report: AdoptionReport) -> None:
    """Asked by `apply` before it converts an adopted cluster (skipped with --yes)."""
    print_report(report, err=True)
    who = f"{report.cut_off} client(s) listed above" if report.cut_off else "no client now"
    click.confirm(
        f"Convert the cluster and drop the plain-http listener ({who})?", abort=True, err=True
    )
