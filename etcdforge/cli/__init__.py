"""The `etcdforge` command line: parsing, rendering, and turning errors into one red line.

Heavy libraries are imported inside the commands, so `etcdforge status` starts quickly.
"""

from __future__ import annotations

import importlib
import sys

import click

from etcdforge.cli.common import EXIT_ERROR, notice, report_error
from etcdforge.interrupt import Stopped

#: command name -> "module:attribute"; a command's module is imported only when it runs.
COMMANDS = {
    "up": "etcdforge.cli.cluster:up_cmd",
    "down": "etcdforge.cli.cluster:down_cmd",
    "status": "etcdforge.cli.cluster:status_cmd",
    "env": "etcdforge.cli.cluster:env_cmd",
    "plan": "etcdforge.cli.hosts:plan_cmd",
    "apply": "etcdforge.cli.hosts:apply_cmd",
    "reset": "etcdforge.cli.hosts:reset_cmd",
    "upgrade": "etcdforge.cli.upgrade:upgrade_cmd",
    "member": "etcdforge.cli.members:member_group",
    "certs": "etcdforge.cli.certs:certs_group",
    "kubeadm": "etcdforge.cli.kubeadm:kubeadm_group",
    "check": "etcdforge.cli.check:check_cmd",
    "backup": "etcdforge.cli.backup:backup_group",
    "defrag": "etcdforge.cli.maintenance:defrag_cmd",
    "restore": "etcdforge.cli.restore:restore_cmd",
    "recover": "etcdforge.cli.restore:recover_cmd",
    "adopt": "etcdforge.cli.adopt:adopt_cmd",
}


class LazyGroup(click.Group):
    """Loads each command's module on demand, so `status` does not pay for `kubeadm`."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, attribute = target.split(":")
        command = getattr(importlib.import_module(module), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.option(
    "-v", "--verbose", is_flag=True, help="On a terminal, print every step above the live phases."
)
@click.version_option(package_name="etcdforge")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Deploy and operate standalone mutual-TLS etcd clusters."""
    ctx.obj = {"debug": debug, "verbose": verbose}


def main(argv: list[str] | None = None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        # Without standalone mode click *returns* the code of a command that raised Exit.
        code = cli.main(args=argv, prog_name="etcdforge", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except Stopped as exc:  # SIGTERM or Ctrl-C, at a safe point: 128 + the signal, as shells do
        notice(str(exc))
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
