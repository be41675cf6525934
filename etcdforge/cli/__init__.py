"""The `etcdforge` command line: parsing, rendering, and turning errors into one red line.

Heavy libraries are imported inside the commands, so `etcdforge status` starts quickly.
"""

from __future__ import annotations

import sys

import click

from etcdforge.cli.certs import certs_group
from etcdforge.cli.cluster import down_cmd, env_cmd, status_cmd, up_cmd
from etcdforge.cli.common import EXIT_ERROR, report_error
from etcdforge.cli.hosts import apply_cmd, plan_cmd, reset_cmd
from etcdforge.cli.kubeadm import kubeadm_group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="etcdforge")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Deploy and operate standalone mutual-TLS etcd clusters."""
    ctx.obj = {"debug": debug}


cli.add_command(up_cmd)
cli.add_command(down_cmd)
cli.add_command(status_cmd)
cli.add_command(env_cmd)
cli.add_command(certs_group)
cli.add_command(plan_cmd)
cli.add_command(apply_cmd)
cli.add_command(reset_cmd)
cli.add_command(kubeadm_group)


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # Without standalone mode click *returns* the code of a command that raised Exit.
        code = cli.main(args=argv, prog_name="etcdforge", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.secho("aborted", fg="red", err=True)
        sys.exit(EXIT_ERROR)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except Exception as exc:
        sys.exit(report_error(exc, debug))
    sys.exit(code if isinstance(code, int) else 0)
