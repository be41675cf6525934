"""One test host's life: its root, its network, its systemd-nspawn, its boot, its teardown.

Host n of run <runid> gets, in this order: an overlayfs over the cached rootfs
(``cp -a --reflink=auto`` if overlay fails) with its own machine id, name and ssh host key; its
netns ``efh-<runid>-<n>`` plugged into the bridge; a systemd-nspawn in cgroups of its own, forked
from one long-lived thread so the parent-death signal works. Ready means sshd answers and systemd
says running (or degraded, logged). Teardown removes exactly what the HostRecord says was made.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from tests.fleet_fs import mkdir_owned, mounts, read_passwd, safe_rmtree, umount, write_file
from tests.fleet_host import SSH_PORT, Host
from tests.fleet_network import FIRST_HOST_OCTET, Network, ip, link_names, netns_names
from tests.fleet_proc import (
    CGROUP_DIR,
    SYSTEM_PATH,
    FleetError,
    cgroup_roots,
    container_leader,
    kill_orphaned_init,
    proc_starttime,
    rmdir_cgroup_tree,
    run_command,
)
from tests.fleet_rootfs import NOSUDO_USER, SUDO_USER

log = logging.getLogger("etcdforge.tests.fleet")


def _ssh_banner(address: str, port: int, timeout: float = 1.0) -> bool:
    """True once something on address:port greets like sshd."""
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


class _Launcher:
    """Forks the nspawn processes from one daemon thread that lives as long as the process.

    Why: the parent-death signal (``setpriv --pdeathsig``, which powers the containers off if
    this process is SIGKILLed) fires when the *thread* that forked the child exits; forking from
    a short-lived worker thread would power a container off as soon as that thread finished.
    """

    _instance: _Launcher | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[
            tuple[Callable[[], subprocess.Popen[bytes]], Future[subprocess.Popen[bytes]]]
        ] = queue.SimpleQueue()
        threading.Thread(target=self._serve, name="etcdforge-fleet-launcher", daemon=True).start()

    @classmethod
    def get(cls) -> _Launcher:
        with cls._guard:
            if cls._instance is None:
                cls._instance = _Launcher()
            return cls._instance

    def _serve(self) -> None:
        while True:
            fn, fut = self._queue.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # delivered to the caller
                fut.set_exception(exc)

    def spawn(self, fn: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        fut: Future[subprocess.Popen[bytes]] = Future()
        self._queue.put((fn, fut))
        return fut.result(timeout=60)


# Put the future nspawn into its own cgroup(s), try to give it the hard file limit systemd gives
# PID 1 on a real host, then exec it with a parent-death signal. A shell, not preexec_fn:
# preexec_fn is unsafe while other threads run (and they do). The limit: a container cannot
# raise the hard limit it inherits (nspawn drops CAP_SYS_RESOURCE), so with this machine's 20000
# a unit's LimitNOFILE=65536 silently ends up as 20000. Here the raise fails too (the sandbox
# lacks CAP_SYS_RESOURCE); see "Differences from real hosts" in tests/fleet.py.
_NSPAWN_WRAPPER = """
n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n - 1)); done
ulimit -H -n 524288 2>/dev/null || true
exec setpriv --pdeathsig TERM -- "$@"
"""


@dataclass
class HostRecord:
    """What the Fleet created for one host, so teardown removes exactly that (and only that)."""

    index: int
    name: str
    address: str
    dir: Path
    mode: str = ""  # "overlay" or "copy"
    netns_created: bool = False
    port: str = ""
    cgroups: list[Path] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    leader: int | None = None
    leader_start: int | None = None
    host_key: str = ""
    host: Host | None = None

    @property
    def root(self) -> Path:
        """The host's / as seen from here (overlay mount point or copy)."""
        return self.dir / "root"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def console_tail(self, lines: int = 25) -> str:
        """The last lines of the console log, terminal escapes removed (for error messages)."""
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
        return "\n".join(text.splitlines()[-lines:])


def prepare_root(rec: HostRecord, lower: Path, ssh_key: Path) -> None:
    """The host's / (overlay over lower, else a copy) with its own machine id, name and host
    key, and ssh_key's public half authorized for root, deploy and nosudo."""
    rec.dir.mkdir()
    for sub in ("upper", "work", "root"):
        (rec.dir / sub).mkdir()
    if os.environ.get("ETCDFORGE_FLEET_NO_OVERLAY") != "1":
        opts = f"lowerdir={lower},upperdir={rec.dir / 'upper'},workdir={rec.dir / 'work'}"
        res = run_command(
            ["mount", "-t", "overlay", "overlay", "-o", opts, str(rec.root)], check=False
        )
        if res.returncode == 0:
            rec.mode = "overlay"
        else:
            log.warning("overlay mount failed (%s); copying the rootfs instead", res.stderr.strip())
    if not rec.mode:
        run_command(["cp", "-a", "--reflink=auto", f"{lower}/.", str(rec.root)], timeout=600)
        rec.mode = "copy"
    root = rec.root
    write_file(root, "etc/machine-id", secrets.token_hex(16) + "\n", 0o444)
    write_file(root, "etc/hostname", rec.name + "\n")
    keydir = rec.dir / "hostkey"
    keydir.mkdir(mode=0o700)
    run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{rec.name}",
                 "-f", str(keydir / "key")])  # fmt: skip
    write_file(root, "etc/ssh/ssh_host_ed25519_key", (keydir / "key").read_text(), 0o600)
    host_pub = (keydir / "key.pub").read_text()
    rec.host_key = " ".join(host_pub.split()[:2])
    write_file(root, "etc/ssh/ssh_host_ed25519_key.pub", host_pub, 0o644)
    pub = ssh_key.with_suffix(".pub").read_text()
    users = read_passwd(root)
    for user in ("root", SUDO_USER, NOSUDO_USER):
        uid, gid, home = users[user]
        rel_home = home.lstrip("/")
        mkdir_owned(root, f"{rel_home}/.ssh", 0o700, uid, gid)
        write_file(root, f"{rel_home}/.ssh/authorized_keys", pub, 0o600, uid, gid)


def prepare_network(rec: HostRecord, net: Network) -> None:
    """The host's netns with eth0 at its address, plugged into the bridge through its port."""
    ip("netns", "add", rec.name)
    rec.netns_created = True
    # IPv6 off for interfaces created from now on (eth0), lo keeps ::1.
    no_v6 = "net.ipv6.conf.default.disable_ipv6=1"
    run_command(["ip", "netns", "exec", rec.name, "sysctl", "-qw", no_v6])
    rec.port = f"efp-{net.runid}-{rec.index}"
    # A MAC derived from the address: a later host reusing the address stays reachable
    # through neighbour caches that still hold the old entry.
    mac = f"02:ef:0a:fe:00:{FIRST_HOST_OCTET + rec.index:02x}"
    ip("-n", net.netns, "link", "add", rec.port, "type", "veth",
        "peer", "name", "eth0", "address", mac, "netns", rec.name)  # fmt: skip
    ip("-n", net.netns, "link", "set", rec.port, "master", net.bridge, "up")
    ip("-n", rec.name, "addr", "add", f"{rec.address}/24", "dev", "eth0")
    ip("-n", rec.name, "link", "set", "lo", "up")
    ip("-n", rec.name, "link", "set", "eth0", "up")


def launch(rec: HostRecord, net: Network) -> None:
    """Start systemd-nspawn for the host in its own cgroups; its console goes to a file."""
    procs = []
    for root in cgroup_roots():
        group = root / CGROUP_DIR / net.runid / rec.name
        group.mkdir(parents=True, exist_ok=True)
        rec.cgroups.append(group)
        procs.append(str(group / "cgroup.procs"))
    argv = [
        *("/bin/sh", "-c", _NSPAWN_WRAPPER, "fleet-nspawn", str(len(procs)), *procs),
        "systemd-nspawn", "--boot", f"--directory={rec.root}", f"--machine={rec.name}",
        f"--network-namespace-path=/run/netns/{rec.name}", "--register=no", "--keep-unit",
        "--private-users=no", "--resolv-conf=off", "--timezone=off", "--link-journal=no",
        "--console=read-only",
    ]  # fmt: skip

    def popen() -> subprocess.Popen[bytes]:
        with open(rec.console_log, "wb") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # no terminal signals: Ctrl-C goes through close()
            )

    rec.proc = _Launcher.get().spawn(popen)


def wait_ready(rec: HostRecord, started: float, boot_timeout: float) -> None:
    """Wait until sshd answers and systemd is running (or degraded, logged); FleetError if not."""
    assert rec.proc is not None
    deadline = started + boot_timeout
    banner = False
    state = "unknown"
    for _ in range(int(boot_timeout / 0.1) + 10):
        if rec.proc.poll() is not None:
            raise FleetError(
                f"systemd-nspawn exited with {rec.proc.returncode} during boot; "
                f"console ({rec.console_log}):\n{rec.console_tail()}"
            )
        if rec.leader is None:
            rec.leader = container_leader(rec.proc.pid)
            if rec.leader is not None:
                rec.leader_start = proc_starttime(rec.leader)
        elif not banner:
            banner = _ssh_banner(rec.address, SSH_PORT)
        else:
            res = run_command(
                [
                    "nsenter",
                    f"--target={rec.leader}",
                    "--all",
                    "--",
                    "systemctl",
                    "is-system-running",
                ],
                check=False,
                timeout=10,
                env={"PATH": SYSTEM_PATH},
            )
            state = res.stdout.strip() or res.stderr.strip()
            if state == "running":
                return
            if state == "degraded":
                failed = run_command(
                    [
                        "nsenter",
                        f"--target={rec.leader}",
                        "--all",
                        "--",
                        "systemctl",
                        "--failed",
                        "--no-legend",
                    ],
                    check=False,
                    env={"PATH": SYSTEM_PATH},
                ).stdout.strip()
                log.warning("%s booted degraded; failed units:\n%s", rec.name, failed)
                return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    raise FleetError(
        f"not ready after {boot_timeout:.0f} s (leader pid {rec.leader}, "
        f"sshd banner {banner}, system state {state!r}); "
        f"console ({rec.console_log}):\n{rec.console_tail()}"
    )


def stop_hosts(records: list[HostRecord], stop_timeout: float, net: Network | None) -> list[str]:
    """Tear down the given hosts: all of them in parallel, each wait bounded."""
    problems: list[str] = []
    live = [r for r in records if r.proc is not None and r.proc.poll() is None]
    for rec in live:
        assert rec.proc is not None
        rec.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
    deadline = time.monotonic() + stop_timeout
    for _ in range(int(stop_timeout / 0.1) + 10):
        if all(r.proc is not None and r.proc.poll() is not None for r in live):
            break
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    for rec in live:
        assert rec.proc is not None
        if rec.proc.poll() is None:
            log.warning("%s did not power off in %.0f s; SIGKILL", rec.name, stop_timeout)
            rec.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                rec.proc.wait(timeout=5)
    for rec in records:
        problems += _cleanup_record(rec, net)
    return problems


def _cleanup_record(rec: HostRecord, net: Network | None) -> list[str]:
    """Remove what was made for rec; returns what could not be removed."""
    problems = []
    if rec.proc is not None and rec.proc.poll() is None:
        problems.append(f"{rec.name}: systemd-nspawn pid {rec.proc.pid} still running")
    if rec.leader is not None and rec.leader_start is not None:
        problems += kill_orphaned_init(rec.name, rec.leader, rec.leader_start)
    if rec.mode == "overlay":
        umount(str(rec.root))
        if str(rec.root) in mounts():
            problems.append(f"{rec.name}: {rec.root} still mounted")
        else:
            rec.mode = ""
    if rec.netns_created:
        ip("netns", "del", rec.name, check=False)
        rec.netns_created = rec.name in netns_names()
        if rec.netns_created:
            problems.append(f"{rec.name}: netns still present")
    bridge_alive = net is not None and net.netns in netns_names()
    if net is not None and bridge_alive and rec.port in link_names(net.netns):
        ip("-n", net.netns, "link", "del", rec.port, check=False)
    for group in rec.cgroups:
        for _ in range(20):
            if rmdir_cgroup_tree(group):
                break
            time.sleep(0.1)
        else:
            problems.append(f"{rec.name}: cgroup {group} not removable")
    if not problems:
        if net is not None:
            net.used.discard(rec.index)
        with contextlib.suppress(FleetError, OSError):
            safe_rmtree(rec.dir)
    rec.host = None
    return problems
