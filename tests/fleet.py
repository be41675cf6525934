"""A fleet of real little Debian hosts for tests: systemd-nspawn containers on a private bridge.

Why: etcdforge deploys over SSH onto machines that run systemd, so the honest test target is a
real sshd and a real systemd (``Type=notify`` units, ``sudo``, partitions), not mocks. On these
machines a bookworm rootfs boots under ``systemd-nspawn`` in well under a second (see
shared/DESIGN.md, "Facts measured on these machines").

One job per module:

- tests/fleet.py: ``Fleet`` (boots hosts in parallel, tears everything down on close) and the
  names tests import (re-exported from the modules below).
- tests/fleet_rootfs.py: the cached, post-processed debootstrap image every host boots from.
- tests/fleet_network.py: the bridge, namespaces and veths of 10.254.0.0/24, its machine lock.
- tests/fleet_boot.py: one host's overlay root, netns, systemd-nspawn, readiness and teardown.
- tests/fleet_host.py: ``Host``, the handle tests get (run as root, ssh, network cut/restore).
- tests/fleet_proc.py and tests/fleet_fs.py: bounded commands, processes, cgroups; safe file
  writes, mounts, flocks.

Differences from real hosts (measured here): the open-files hard limit inside every host is the
one this process has (20000 on these machines, which lack CAP_SYS_RESOURCE to raise it), so
``LimitNOFILE=65536`` in a unit starts fine but yields 20000. No DNS (names are in /etc/hosts),
no IPv6 on eth0, no default route, journal in memory, gettys/timers masked.

There is one 10.254.0.0/24 per machine, so processes take turns on a machine-wide lock
(``/run/lock/etcdforge-fleet.lock``); inside one process every Fleet shares one network, held
in this module (``_network``). Import these modules as ``tests.fleet`` (``tests.fleet_*``)
everywhere: a second copy under another name would not share that network and would wait for its
own lock forever.

Example::

    with Fleet() as fleet:
        a, b, c = fleet.start(3)
        a.run("systemctl", "is-system-running")          # as root, via nsenter
        a.ssh("sudo", "-n", "true", user="deploy")        # the real ssh client, key only
        with c.network_cut():
            ...                                            # c is partitioned
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

from tests.fleet_boot import (
    HostRecord,
    launch,
    prepare_network,
    prepare_root,
    stop_hosts,
    wait_ready,
)
from tests.fleet_fs import safe_rmtree, write_file
from tests.fleet_host import SSH_PORT, Host
from tests.fleet_network import (
    ADMIN_ADDRESS,
    FIRST_HOST_OCTET,
    MACHINE_LOCK,
    MAX_HOSTS,
    SUBNET,
    Network,
)
from tests.fleet_proc import CommandError, FleetError, run_command
from tests.fleet_rootfs import (
    DEFAULT_CACHE,
    DEFAULT_MIRROR,
    IMAGE_MARK,
    INCLUDE,
    MASKED_UNITS,
    NOSUDO_USER,
    SUDO_USER,
    SUITE,
    VARIANT,
    cache_dir,
    debian_mirror,
    ensure_rootfs,
    rootfs_path,
)

# The public names of the fleet, importable from here as before the split into modules.
__all__ = [
    "ADMIN_ADDRESS",
    "DEFAULT_CACHE",
    "DEFAULT_MIRROR",
    "FIRST_HOST_OCTET",
    "IMAGE_MARK",
    "INCLUDE",
    "MACHINE_LOCK",
    "MASKED_UNITS",
    "MAX_HOSTS",
    "NOSUDO_USER",
    "SSH_PORT",
    "SUBNET",
    "SUDO_USER",
    "SUITE",
    "VARIANT",
    "CommandError",
    "Fleet",
    "FleetError",
    "Host",
    "cache_dir",
    "debian_mirror",
    "ensure_rootfs",
    "fleet_available",
    "rootfs_path",
    "run_command",
]

log = logging.getLogger("etcdforge.tests.fleet")


def fleet_available(cache: Path | None = None) -> str | None:
    """Why this machine cannot run the fleet, or None if it can.

    Cheap checks only (no build, no network): root, Linux, the tools on PATH. debootstrap is
    only needed while the rootfs is not cached yet.
    """
    if not sys.platform.startswith("linux"):
        return f"the test fleet needs Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "the test fleet needs root (network namespaces, mounts, systemd-nspawn)"
    tools = ["systemd-nspawn", "ip", "nsenter", "setpriv", "mount", "umount", "ssh", "ssh-keygen"]
    tools += ["chroot", "cp"]
    if rootfs_path(cache) is None:
        tools.append("debootstrap")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        return f"missing tools: {', '.join(missing)} (install them with .ci/fleet-deps.sh)"
    if not Path("/proc/self/ns/net").exists():
        return "the kernel has no network namespaces"
    return None


# The one network of this process, shared by every Fleet in it (see the module docstring).
_net_guard = threading.Lock()
_network: Network | None = None


def _acquire_network(lock_timeout: float, cache: Path) -> Network:
    """The process's network: set up (under the machine lock) by the first Fleet that needs it."""
    global _network
    with _net_guard:
        if _network is None:
            net = Network(secrets.token_hex(3))
            net.setup(lock_timeout, cache)
            _network = net
        _network.users += 1
        return _network


def _release_network(net: Network) -> list[str]:
    """Drop one user of the network; the last one tears it down and frees the machine lock."""
    global _network
    with _net_guard:
        net.users -= 1
        if net.users > 0:
            return []
        _network = None
        return net.teardown()


#: Every host's systemd (PID 1, journald, logind, ...) takes inotify instances from root's
#: per-user budget, shared with the machine: Debian's default of 128 runs out around eight hosts
#: at once ("Failed to allocate manager object: Too many open files" at boot).
INOTIFY_INSTANCES = 1024
INOTIFY_LIMIT = Path("/proc/sys/fs/inotify/max_user_instances")


def ensure_inotify_instances(wanted: int) -> None:
    """Raise root's inotify instance limit to `wanted` if it is lower (never lowers it)."""
    if int(INOTIFY_LIMIT.read_text()) < wanted:
        INOTIFY_LIMIT.write_text(f"{wanted}\n")


class Fleet:
    """Starts test hosts, and removes every trace of them on close().

    close() is idempotent and also registered with atexit. Only processes this Fleet started
    (systemd-nspawn, and if it will not die, the container init it spawned) are ever signalled.
    """

    def __init__(
        self,
        *,
        cache: Path | None = None,
        boot_timeout: float = 60,
        stop_timeout: float = 20,
        lock_timeout: float | None = None,
        user: str = "root",
    ) -> None:
        self.cache = cache or cache_dir()
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.lock_timeout = (
            lock_timeout
            if lock_timeout is not None
            # below pytest-timeout's 600 s, so a busy machine fails with a clear message
            else float(os.environ.get("ETCDFORGE_FLEET_LOCK_TIMEOUT", "500"))
        )
        self.default_user = user
        self.timings: dict[str, float] = {}
        self._records: list[HostRecord] = []
        self._net: Network | None = None
        self._dir: Path | None = None
        self._guard = threading.RLock()
        self._closed = False
        self._starts = 0
        atexit.register(self.close)

    # -- public ------------------------------------------------------------------------------

    @property
    def hosts(self) -> list[Host]:
        """Every running host of this fleet, in start order."""
        return [r.host for r in self._records if r.host is not None]

    @property
    def ssh_key(self) -> Path:
        """Private key (ed25519, no passphrase) for root, deploy and nosudo on every host."""
        return self._workdir() / "ssh" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        """known_hosts with every host's own ed25519 key, by address and by name."""
        return self._workdir() / "ssh" / "known_hosts"

    @property
    def runid(self) -> str | None:
        """The network's run id (names efnet-/efbr-/efa-<runid>), None before the first start."""
        return self._net.runid if self._net else None

    def start(self, count: int) -> list[Host]:
        """Boot ``count`` new hosts in parallel; return them once sshd answers and systemd is up."""
        if count < 1:
            raise ValueError("count must be >= 1")
        with self._guard:
            if self._closed:
                raise FleetError("this fleet is closed")
            t0 = time.monotonic()
            lower = ensure_rootfs(self.cache, lock_timeout=self.lock_timeout)
            self.timings.setdefault("rootfs", time.monotonic() - t0)
            ensure_inotify_instances(INOTIFY_INSTANCES)
            self._ensure_key()
            if self._net is None:
                t1 = time.monotonic()
                self._net = _acquire_network(self.lock_timeout, self.cache)
                self.timings["network"] = time.monotonic() - t1
            net = self._net
            batch = []
            for _ in range(count):
                n = net.alloc()
                name = f"efh-{net.runid}-{n}"
                address = f"10.254.0.{FIRST_HOST_OCTET + n}"
                rec = HostRecord(n, name, address, self._workdir() / name)
                self._records.append(rec)
                batch.append(rec)
            t2 = time.monotonic()
            errors: list[str] = []
            with ThreadPoolExecutor(
                max_workers=min(count, 8), thread_name_prefix="fleet-boot"
            ) as pool:
                futures = [pool.submit(self._boot, rec, lower, net) for rec in batch]
                for rec, fut in zip(batch, futures, strict=True):
                    try:
                        fut.result()
                    except Exception as exc:  # report all hosts, not just the first failure
                        errors.append(f"{rec.name}: {exc}")
            if errors:
                stop_hosts(batch, self.stop_timeout, self._net)
                raise FleetError("could not start test hosts:\n" + "\n\n".join(errors))
            self._refresh_names()
            took = time.monotonic() - t2
            self._starts += 1
            self.timings[f"start #{self._starts} ({count} hosts)"] = took
            log.info("started %d fleet host(s) in %.1f s", count, took)
            return [rec.host for rec in batch if rec.host is not None]

    def close(self) -> None:
        """Power every host off and delete its mounts, namespaces, veths, cgroups and files."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self.close)
        t0 = time.monotonic()
        problems = stop_hosts(list(self._records), self.stop_timeout, self._net)
        if self._net is not None:
            problems += _release_network(self._net)
        if self._dir is not None:
            try:
                safe_rmtree(self._dir)
            except (FleetError, OSError) as exc:
                problems.append(str(exc))
        self.timings["close"] = time.monotonic() - t0
        if problems:
            raise FleetError("fleet teardown left things behind:\n" + "\n".join(problems))

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _workdir(self) -> Path:
        if self._dir is None:
            runs = self.cache / "runs"
            runs.mkdir(parents=True, exist_ok=True)
            # The pid in the name tells a later run whether this directory is stale.
            self._dir = Path(tempfile.mkdtemp(prefix=f"fleet-{os.getpid()}-", dir=runs))
        return self._dir

    def _ensure_key(self) -> None:
        key = self.ssh_key
        if not key.exists():
            key.parent.mkdir(mode=0o700, exist_ok=True)
            comment = "etcdforge-fleet-admin"
            run_command(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)]
            )

    def _boot(self, rec: HostRecord, lower: Path, net: Network) -> None:
        started = time.monotonic()
        prepare_root(rec, lower, self.ssh_key)
        prepare_network(rec, net)
        launch(rec, net)
        wait_ready(rec, started, self.boot_timeout)
        rec.host = Host(
            name=rec.name,
            address=rec.address,
            ssh_port=SSH_PORT,
            user=self.default_user,
            key_path=self.ssh_key,
            leader_pid=rec.leader or 0,
            known_hosts=self.known_hosts,
            index=rec.index,
            netns=rec.name,
            root=rec.root,
            nspawn_pid=rec.proc.pid if rec.proc else 0,
            bridge_netns=net.netns,
            bridge_port=rec.port,
        )
        log.info(
            "%s (%s) up in %.1f s (%s)", rec.name, rec.address, time.monotonic() - started, rec.mode
        )

    def _refresh_names(self) -> None:
        """Every host's /etc/hosts and the admin known_hosts list all hosts of this fleet."""
        live = [r for r in self._records if r.host is not None]
        entries = "".join(f"{r.address}\t{r.name}\n" for r in live)
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" + entries
        for rec in live:
            write_file(rec.root, "etc/hosts", hosts)
        lines = "".join(f"{r.address},{r.name} {r.host_key}\n" for r in live)
        tmp = self.known_hosts.with_suffix(".tmp")
        tmp.write_text(lines)
        tmp.replace(self.known_hosts)
