"""The test fleet's network: one private 10.254.0.0/24 per machine, on a bridge of its own.

Layout, for run id <runid> (6 hex digits, one per process):

- bridge ``efbr-<runid>`` lives in network namespace ``efnet-<runid>``.
- host n: its own network namespace ``efh-<runid>-<n>`` whose ``eth0`` has 10.254.0.(10+n)/24 and
  no default route, a veth ``efp-<runid>-<n>`` into the bridge (set up in tests/fleet_boot.py).
- admin: one veth ``efa-<runid>`` in the root namespace with 10.254.0.1/24 — the only change to
  the root namespace. Nothing is routed beyond 10.254.0.0/24.

There is one 10.254.0.0/24 per machine, so processes take turns on a machine-wide lock
(``/run/lock/etcdforge-fleet.lock``); whoever takes it first removes what a run that died left
behind (names, mounts, run dirs, cgroups; never processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from pathlib import Path

from tests.fleet_fs import flock_fd, mounts, safe_rmtree, umount
from tests.fleet_proc import (
    CGROUP_DIR,
    FleetError,
    cgroup_roots,
    rmdir_cgroup_tree,
    run_command,
)

log = logging.getLogger("etcdforge.tests.fleet")

SUBNET = "10.254.0.0/24"
ADMIN_ADDRESS = "10.254.0.1"
FIRST_HOST_OCTET = 10  # host n gets 10.254.0.(10 + n)
MAX_HOSTS = 254 - FIRST_HOST_OCTET
MACHINE_LOCK = Path("/run/lock/etcdforge-fleet.lock")

# Names a run that died may have left behind (its run id is 6 hex digits).
_RUNID_RE = r"[0-9a-f]{6}"
_STALE_NETNS = re.compile(rf"^(?:efh-{_RUNID_RE}-\d+|efnet-{_RUNID_RE})$")
_STALE_LINK = re.compile(rf"^efa-{_RUNID_RE}$")
_STALE_MOUNT = re.compile(rf"/runs/[^/]+/efh-{_RUNID_RE}-\d+/root$")


def ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip argv`` (bounded to 30 s)."""
    return run_command(["ip", *argv], check=check, timeout=30)


def netns_names() -> list[str]:
    """Names of every named network namespace (``ip netns list``)."""
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def link_names(netns: str | None = None) -> list[str]:
    """Interface names in netns, or in the root namespace when netns is None."""
    prefix = ["-n", netns] if netns else []
    out = ip(*prefix, "-o", "link", "show", check=netns is not None).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


class Network:
    """The fleet network of this process: bridge efbr-<runid> in netns efnet-<runid>, and the
    admin veth efa-<runid> (10.254.0.1/24) in the root netns. Shared by all Fleets of the process
    and held under the machine lock, because 10.254.0.0/24 exists once per machine."""

    def __init__(self, runid: str) -> None:
        self.runid = runid
        self.netns = f"efnet-{runid}"
        self.bridge = f"efbr-{runid}"
        self.admin_link = f"efa-{runid}"
        self.users = 0
        self.used: set[int] = set()
        self._lock_fd: int | None = None

    def setup(self, lock_timeout: float, cache: Path) -> None:
        lock = MACHINE_LOCK if MACHINE_LOCK.parent.is_dir() else Path("/run/etcdforge-fleet.lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            flock_fd(fd, lock_timeout, "fleet network lock (10.254.0.0/24 is one per machine)")
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        try:
            _clean_stale(cache)
            in_use = ip("-4", "-o", "addr", "show", "to", SUBNET).stdout.strip()
            in_use += ip("-4", "route", "show", "to", "root", SUBNET).stdout.strip()
            if "10.254.0." in in_use:
                raise FleetError(
                    f"{SUBNET} is already used in the root network namespace:\n{in_use}"
                )
            ip("netns", "add", self.netns)
            no_v6 = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
            run_command(["ip", "netns", "exec", self.netns, "sysctl", "-qw", *no_v6])
            ip("-n", self.netns, "link", "add", self.bridge, "type", "bridge",
                "stp_state", "0", "forward_delay", "0")  # fmt: skip
            ip("-n", self.netns, "link", "set", self.bridge, "up")
            ip("link", "add", self.admin_link, "type", "veth", "peer", "name", f"efb-{self.runid}",
                "netns", self.netns)  # fmt: skip
            v6 = Path(f"/proc/sys/net/ipv6/conf/{self.admin_link}/disable_ipv6")
            if v6.exists():
                v6.write_text("1\n")
            ip("-n", self.netns, "link", "set", f"efb-{self.runid}", "master", self.bridge, "up")
            ip("addr", "add", f"{ADMIN_ADDRESS}/24", "dev", self.admin_link)
            ip("link", "set", self.admin_link, "up")
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> list[str]:
        """Delete everything setup() made and drop the lock; returns what could not be removed."""
        problems = []
        if self.admin_link in link_names():
            ip("link", "del", self.admin_link, check=False)
        if self.netns in netns_names():
            ip("netns", "del", self.netns, check=False)
        for root in cgroup_roots():
            rmdir_cgroup_tree(root / CGROUP_DIR / self.runid)
            with contextlib.suppress(OSError):
                (root / CGROUP_DIR).rmdir()  # fails harmlessly if another run still uses it
        if self.admin_link in link_names():
            problems.append(f"link {self.admin_link}")
        if self.netns in netns_names():
            problems.append(f"netns {self.netns}")
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return problems

    def alloc(self) -> int:
        """Reserve the lowest free host number n (address 10.254.0.(10 + n))."""
        for n in range(1, MAX_HOSTS + 1):
            if n not in self.used:
                self.used.add(n)
                return n
        raise FleetError(f"no free address left in {SUBNET}")


def _clean_stale(cache: Path) -> None:
    """Remove what a previous run that died (SIGKILL, power loss) left behind.

    Called only while holding the machine lock, so no live fleet owns any of these names. Only
    names, mounts and directories are removed; processes we did not start are never signalled
    (its nspawn processes got SIGTERM from ``setpriv --pdeathsig`` when their parent died).
    """
    for mountpoint in sorted(
        (m for m in mounts() if _STALE_MOUNT.search(m)), key=len, reverse=True
    ):
        log.warning("unmounting stale fleet mount %s", mountpoint)
        umount(mountpoint, attempts=3)
    for name in netns_names():
        if _STALE_NETNS.match(name):
            log.warning("deleting stale fleet netns %s", name)
            ip("netns", "del", name, check=False)
    for name in link_names():
        if _STALE_LINK.match(name):
            log.warning("deleting stale fleet link %s", name)
            ip("link", "del", name, check=False)
    runs = cache / "runs"
    if runs.is_dir():
        for rundir in runs.iterdir():
            m = re.match(r"fleet-(\d+)-", rundir.name)
            if m and not Path(f"/proc/{m.group(1)}").exists():  # its process is gone
                with contextlib.suppress(FleetError, OSError):
                    safe_rmtree(rundir)
    for root in cgroup_roots():
        top = root / CGROUP_DIR
        if top.is_dir():
            for sub in top.iterdir():
                if sub.is_dir():
                    rmdir_cgroup_tree(sub)
