"""The handle tests get for one running test host: commands as root, real SSH, partitions.

Why two ways in: ``run()`` enters the host's namespaces with nsenter (no network, no sshd), so an
assertion still works while the host is partitioned or its sshd is broken; ``ssh()`` goes
through the host's real sshd (system ssh client, the fleet's key, pinned host keys).
``network_cut()`` downs the host's bridge port, so peers see timeouts, like a pulled cable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shlex
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.fleet_network import ip, netns_names
from tests.fleet_proc import SYSTEM_PATH, FleetError, run_command

SSH_PORT = 22  # sshd's port on every host


@dataclass(frozen=True)
class Host:
    """One running test host.

    Accounts: ``root``, ``deploy`` (passwordless sudo) and ``nosudo`` (no sudo at all), each
    reachable with ``key_path`` only. ``user`` is the default login of ``ssh()`` (see as_user).
    Host keys are pinned in ``known_hosts`` (one line per host: address and name).
    """

    name: str
    address: str
    ssh_port: int
    user: str
    key_path: Path
    leader_pid: int
    known_hosts: Path
    index: int
    netns: str
    root: Path  # the host's / as seen from the admin side (overlay mount or copy)
    nspawn_pid: int
    bridge_netns: str = field(repr=False)
    bridge_port: str = field(repr=False)

    def as_user(self, user: str) -> Host:
        """The same host, with ``user`` as the default SSH login."""
        return dataclasses.replace(self, user=user)

    def run(
        self, *argv: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the host as root, via nsenter (no network involved): for assertions."""
        env = {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb"}
        cmd = ["nsenter", f"--target={self.leader_pid}", "--all", "--", *argv]
        return run_command(cmd, check=check, timeout=timeout, input=input, env=env)

    def ssh_argv(self, *argv: str, user: str | None = None) -> list[str]:
        """The system ssh client command for argv: key only, batch mode, pinned host key."""
        cmd = [
            "ssh", "-F", "/dev/null", "-i", str(self.key_path), "-p", str(self.ssh_port),
            "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
            "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-o", "LogLevel=ERROR", "--", f"{user or self.user}@{self.address}",
        ]  # fmt: skip
        if argv:
            cmd.append(shlex.join(argv))  # one word: the remote shell splits it exactly back
        return cmd

    def ssh(
        self,
        *argv: str,
        user: str | None = None,
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv on the host over real SSH (as ``user`` or self.user)."""
        return run_command(
            self.ssh_argv(*argv, user=user), check=check, timeout=timeout, input=input
        )

    def cut_network(self) -> None:
        """Partition the host: its bridge port goes down, so frames are dropped both ways.

        Inside, eth0 loses carrier but keeps its address and route: peers see timeouts, like a
        pulled cable, not connection refusals.
        """
        ip("-n", self.bridge_netns, "link", "set", self.bridge_port, "down")

    def restore_network(self) -> None:
        """Undo cut_network (the bridge has STP off, so the port forwards at once).

        Also forgets the ARP failures the cut caused, in every fleet namespace and on the admin
        side: otherwise the first connection after the restore fails at once with "No route to
        host" until the kernel re-probes (measured: ~0.5 s), which makes tests flaky.
        """
        ip("-n", self.bridge_netns, "link", "set", self.bridge_port, "up")
        # The kernel applies carrier changes asynchronously (linkwatch, up to ~1 s): until both
        # ends are operationally UP, frames are still dropped and ARP probes wasted.
        deadline = time.monotonic() + 5
        for _ in range(100):
            ends = [("-n", self.netns, "eth0"), ("-n", self.bridge_netns, self.bridge_port)]
            if all(
                " state UP " in ip(n, ns, "-o", "link", "show", dev).stdout for n, ns, dev in ends
            ):
                break
            if time.monotonic() >= deadline:
                raise FleetError(f"{self.name}: network did not come back within 5 s")
            time.sleep(0.05)
        runid = self.bridge_netns.removeprefix("efnet-")
        flush = ["neigh", "flush", "nud", "failed", "nud", "incomplete"]
        for ns in netns_names():
            if ns.startswith(f"efh-{runid}-"):
                ip("-n", ns, *flush, check=False)
        ip(*flush, "dev", f"efa-{runid}", check=False)

    @contextlib.contextmanager
    def network_cut(self) -> Iterator[Host]:
        """``with host.network_cut():`` — partitioned inside the block, restored after it."""
        self.cut_network()
        try:
            yield self
        finally:
            self.restore_network()
