"""A fleet of real little Debian hosts for tests: systemd-nspawn containers on a private bridge.

Why: etcdforge deploys over SSH onto machines that run systemd, so the honest test target is a
real sshd and a real systemd (``Type=notify`` units, ``sudo``, partitions), not mocks. On these
machines a bookworm rootfs boots under ``systemd-nspawn`` in well under a second (see
shared/DESIGN.md, "Facts measured on these machines").

How it is built:

- rootfs: ``debootstrap --variant=minbase`` once, post-processed (users, sshd key-only, masked
  units), cached in ``$ETCDFORGE_FLEET_CACHE`` (default ``/var/cache/etcdforge-fleet``) under a
  name that hashes the recipe. Built in a temp dir and renamed, under a file lock.
- host n: an overlayfs over the cached rootfs (``cp -a --reflink=auto`` if overlay fails), its own
  network namespace ``efh-<runid>-<n>`` whose ``eth0`` has 10.254.0.(10+n)/24 and no default
  route, a veth into bridge ``efbr-<runid>`` that lives in namespace ``efnet-<runid>``.
- admin: one veth ``efa-<runid>`` in the root namespace with 10.254.0.1/24 — the only change to
  the root namespace. Nothing is routed beyond 10.254.0.0/24.

Differences from real hosts (measured here): the open-files hard limit inside every host is the
one this process has (20000 on these machines, which lack CAP_SYS_RESOURCE to raise it), so
``LimitNOFILE=65536`` in a unit starts fine but yields 20000. No DNS (names are in /etc/hosts),
no IPv6 on eth0, no default route, journal in memory, gettys/timers masked.

There is one 10.254.0.0/24 per machine, so processes take turns on a machine-wide lock
(``/run/lock/etcdforge-fleet.lock``); inside one process every Fleet shares one network.
Import this module as ``tests.fleet`` everywhere: a second copy under another name would not
share that network and would wait for its own lock forever.

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
import contextlib
import dataclasses
import fcntl
import hashlib
import inspect
import logging
import os
import queue
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger("etcdforge.tests.fleet")

SUBNET = "10.254.0.0/24"
ADMIN_ADDRESS = "10.254.0.1"
FIRST_HOST_OCTET = 10  # host n gets 10.254.0.(10 + n)
MAX_HOSTS = 254 - FIRST_HOST_OCTET
SSH_PORT = 22

SUITE = "bookworm"
VARIANT = "minbase"
INCLUDE = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "iproute2",
    "sudo",
    "ca-certificates",
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_CACHE = Path("/var/cache/etcdforge-fleet")
MACHINE_LOCK = Path("/run/lock/etcdforge-fleet.lock")
IMAGE_MARK = "etc/etcdforge-fleet-image"  # written last: a rootfs without it is not finished

SUDO_USER = "deploy"
NOSUDO_USER = "nosudo"

# Units that cost boot time or have no business in a test host. Masked, not disabled, so that
# nothing (a package, a wants/ symlink) can pull them back in.
MASKED_UNITS = (
    "apt-daily.service",
    "apt-daily.timer",
    "apt-daily-upgrade.service",
    "apt-daily-upgrade.timer",
    "console-getty.service",
    "container-getty@.service",
    "dpkg-db-backup.service",
    "dpkg-db-backup.timer",
    "e2scrub_all.service",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.service",
    "fstrim.timer",
    "getty@.service",
    "serial-getty@.service",
    "systemd-firstboot.service",
    "systemd-networkd-wait-online.service",
    "systemd-networkd.service",
    "systemd-networkd.socket",
    "systemd-pstore.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
)

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_RUNID_RE = r"[0-9a-f]{6}"
_STALE_NETNS = re.compile(rf"^(?:efh-{_RUNID_RE}-\d+|efnet-{_RUNID_RE})$")
_STALE_LINK = re.compile(rf"^efa-{_RUNID_RE}$")
_STALE_MOUNT = re.compile(rf"/runs/[^/]+/efh-{_RUNID_RE}-\d+/root$")
_CGROUP_DIR = "etcdforge-fleet"


class FleetError(RuntimeError):
    """Something about the fleet itself failed; the message says what and where to look."""


class CommandError(subprocess.CalledProcessError):
    """A command exited non-zero; unlike CalledProcessError, str() shows its output."""

    def __str__(self) -> str:
        def tail(text: str | bytes | None) -> str:
            if not text:
                return ""
            if isinstance(text, bytes):
                text = text.decode(errors="replace")
            return text.strip()[-2000:]

        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(map(str, self.cmd))
        parts = [f"command exited {self.returncode}: {cmd}"]
        if out := tail(self.stdout):
            parts.append(f"stdout: {out}")
        if err := tail(self.stderr):
            parts.append(f"stderr: {err}")
        return "\n".join(parts)


def run_command(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """subprocess.run in a process group of its own, so a timeout also kills grandchildren.

    ``nsenter --pid`` and ``ssh`` fork; killing only the direct child would leave the command
    running inside the host and the pipes open.
    """
    args = [str(a) for a in argv]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        try:
            out, err = proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:  # a daemon outside our group holds the pipes
            out, err = "", ""
        raise subprocess.TimeoutExpired(args, timeout, out, err) from None
    except BaseException:  # Ctrl-C, pytest-timeout: never leave the command running
        _kill_group(proc)
        raise
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, args, out, err)
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the process group that run_command created for proc (ours alone), and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


# --------------------------------------------------------------------------------------------
# availability, cache, rootfs


def cache_dir() -> Path:
    """Where the rootfs and the per-run host dirs live ($ETCDFORGE_FLEET_CACHE)."""
    return Path(os.environ.get("ETCDFORGE_FLEET_CACHE") or DEFAULT_CACHE)


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


def debian_mirror(apt_dir: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses on this machine (it may be a proxy), else deb.debian.org."""
    parts = apt_dir / "sources.list.d"
    files = [
        *sorted(parts.glob("*.sources")),
        apt_dir / "sources.list",
        *sorted(parts.glob("*.list")),
    ]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n[ \t]*\n", text):
                fields: dict[str, str] = {}
                key = ""
                for line in stanza.splitlines():
                    if line.startswith("#") or not line.strip():
                        continue
                    if line[0] in " \t" and key:
                        fields[key] += " " + line.strip()
                    elif ":" in line:
                        key, _, value = line.partition(":")
                        key = key.strip().lower()
                        fields[key] = value.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if (
                    "deb" in fields.get("types", "").split()
                    and SUITE in fields.get("suites", "").split()
                ):
                    for uri in fields.get("uris", "").split():
                        if uri.startswith(("http://", "https://")):
                            return uri.rstrip("/")
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(https?://\S+)\s+(\S+)", line)
                if m and m.group(2) == SUITE:
                    return m.group(1).rstrip("/")
    return DEFAULT_MIRROR


def _recipe_id() -> str:
    """Hash of everything that shapes the image: change the recipe and a new cache dir is built."""
    try:
        post = inspect.getsource(_postprocess_rootfs)
    except OSError:  # no source (zipapp): fall back to the constants
        post = ""
    blob = "\n".join([SUITE, VARIANT, ",".join(INCLUDE), ",".join(MASKED_UNITS), post])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def rootfs_path(cache: Path | None = None) -> Path | None:
    """The finished cached rootfs, or None if it has not been built yet."""
    path = (cache or cache_dir()) / f"rootfs-{SUITE}-{_recipe_id()}"
    return path if (path / IMAGE_MARK).is_file() else None


@contextlib.contextmanager
def _flock(path: Path, timeout: float, what: str) -> Iterator[int]:
    """Hold an exclusive flock on path; the kernel drops it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        _flock_fd(fd, timeout, what)
        yield fd
    finally:
        os.close(fd)


def _flock_fd(fd: int, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    for attempt in range(int(timeout / 0.5) + 2):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt == 0:
                log.warning(
                    "waiting up to %.0f s for the %s (another process holds it)", timeout, what
                )
            if time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    raise FleetError(
        f"gave up after {timeout:.0f} s waiting for the {what}; another process holds it"
    )


def ensure_rootfs(cache: Path | None = None, *, lock_timeout: float = 500) -> Path:
    """Return the cached rootfs, building it first if needed (once per machine and recipe).

    The build happens in ``CACHE/.build-*`` and is renamed into place, so an interrupted build
    never looks finished; the flock makes concurrent callers wait for one builder.
    """
    cache = cache or cache_dir()
    if (found := rootfs_path(cache)) is not None:
        return found
    final = cache / f"rootfs-{SUITE}-{_recipe_id()}"
    cache.mkdir(parents=True, exist_ok=True)
    with _flock(cache / ".build.lock", lock_timeout, "fleet rootfs build lock"):
        if (found := rootfs_path(cache)) is not None:
            return found
        for stale in cache.glob(".build-*"):  # we hold the lock: their builder is gone
            log.warning("removing interrupted rootfs build %s", stale)
            _safe_rmtree(stale)
        if final.exists():
            _safe_rmtree(final)
        _prune_old_rootfs(cache, keep=final)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache))
        try:
            root = tmp / "rootfs"
            mirror = debian_mirror()
            log.info("debootstrap %s from %s into %s", SUITE, mirror, root)
            argv = [
                *("setpriv", "--pdeathsig", "KILL", "--"),  # dies with us, even on SIGKILL
                "debootstrap",
                f"--variant={VARIANT}",
                f"--include={','.join(INCLUDE)}",
                SUITE,
                str(root),
                mirror,
            ]
            try:
                run_command(argv, timeout=1800)
            except (CommandError, subprocess.TimeoutExpired) as exc:
                raise FleetError(f"debootstrap failed; is {mirror} reachable?\n{exc}") from exc
            _postprocess_rootfs(root)
            os.rename(root, final)
        finally:
            _safe_rmtree(tmp)
        log.info("built %s in %.1f s", final, time.monotonic() - started)
    return final


def _prune_old_rootfs(cache: Path, keep: Path) -> None:
    """Delete images of older recipes (~250 MB each) unless a mounted overlay still uses them."""
    in_use = Path("/proc/self/mounts").read_text()
    for old in cache.glob(f"rootfs-{SUITE}-*"):
        if old != keep and f"lowerdir={old}" not in in_use:
            log.info("removing the rootfs of an older recipe: %s", old)
            with contextlib.suppress(FleetError, OSError):
                _safe_rmtree(old)


def _chroot(root: Path, *argv: str) -> None:
    run_command(["chroot", str(root), *argv], env={"PATH": _PATH, "LANG": "C.UTF-8"})


def _postprocess_rootfs(root: Path) -> None:
    """Turn a fresh debootstrap into the shared, read-only lower layer of every host."""
    etc = root / "etc"
    # Empty machine-id and dbus pointing at it: systemd would otherwise reuse the id baked in by
    # debootstrap (it even falls back to /var/lib/dbus/machine-id). Hosts get their own id.
    (etc / "machine-id").write_text("")
    dbus_id = root / "var/lib/dbus/machine-id"
    dbus_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_id.unlink(missing_ok=True)
    dbus_id.symlink_to("/etc/machine-id")
    # No DNS in the fleet (and debootstrap copied this machine's resolver): names are in /etc/hosts.
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text(
        "# etcdforge test fleet: no DNS; host names are in /etc/hosts\n"
    )
    (etc / "hostname").write_text("localhost\n")
    (etc / "default/locale").write_text("")  # sshd's pam_env warns on every login without it
    # sshd: keys only, one host key type (each host replaces it with its own at creation).
    (etc / "ssh/sshd_config.d/etcdforge-fleet.conf").write_text(
        "# etcdforge test fleet\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\n"
        "PubkeyAuthentication yes\n"
        "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        "UseDNS no\n"
    )
    for old in (etc / "ssh").glob("ssh_host_*"):
        old.unlink()
    run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "etcdforge-fleet-image",
                 "-f", str(etc / "ssh/ssh_host_ed25519_key")])  # fmt: skip
    # Users: '*' = no password but not locked (a locked account may be refused by sshd).
    _chroot(root, "usermod", "--password", "*", "root")
    for user in (SUDO_USER, NOSUDO_USER):
        _chroot(root, "useradd", "--create-home", "--user-group", "--shell", "/bin/bash", user)
        _chroot(root, "usermod", "--password", "*", user)
    sudoers = etc / f"sudoers.d/{SUDO_USER}"
    sudoers.write_text(f"{SUDO_USER} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)
    _chroot(root, "visudo", "--check", "--quiet", "--file", f"/etc/sudoers.d/{SUDO_USER}")
    # Boot only what a test host needs; keep the journal in memory (small, fast upper dirs).
    for unit in MASKED_UNITS:
        link = etc / "systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    journald = etc / "systemd/journald.conf.d"
    journald.mkdir(parents=True, exist_ok=True)
    (journald / "etcdforge-fleet.conf").write_text(
        "[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n"
    )
    for junk in ("var/cache/apt", "var/lib/apt/lists"):
        for item in (root / junk).glob("*"):
            if item.is_file() and not item.is_symlink():
                item.unlink()
    (root / IMAGE_MARK).write_text(f"suite={SUITE} recipe={_recipe_id()} built={time.time():.0f}\n")


# --------------------------------------------------------------------------------------------
# small system helpers


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _mounts() -> list[str]:
    lines = Path("/proc/self/mounts").read_text().splitlines()
    return [_unescape_mount(line.split()[1]) for line in lines if len(line.split()) > 1]


def _mounts_under(path: Path) -> list[str]:
    top = os.path.realpath(path)
    found = [m for m in _mounts() if m == top or m.startswith(top + "/")]
    return sorted(set(found), key=len, reverse=True)


def _umount(mountpoint: str, attempts: int = 10) -> None:
    """Unmount, retrying while busy (a container's last process may still be exiting).

    Falls back to a lazy unmount so teardown never hangs.
    """
    for _ in range(attempts):
        if mountpoint not in _mounts():
            return
        if run_command(["umount", mountpoint], check=False, timeout=30).returncode == 0:
            return
        time.sleep(0.2)
    run_command(["umount", "--lazy", mountpoint], check=False, timeout=30)


def _safe_rmtree(path: Path) -> None:
    """rmtree that first unmounts everything below path and refuses if anything stays mounted.

    An interrupted debootstrap can leave /proc, /sys or a bind-mounted /dev inside its target;
    a plain rmtree would walk into them.
    """
    if not os.path.lexists(path):
        return
    for mountpoint in _mounts_under(path):
        _umount(mountpoint)
    if left := _mounts_under(path):
        raise FleetError(f"refusing to delete {path}: still mounted: {', '.join(left)}")
    if path.is_symlink() or not path.is_dir():
        path.unlink()
    else:
        shutil.rmtree(path)


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_command(["ip", *argv], check=check, timeout=30)


def _netns_names() -> list[str]:
    out = _ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _link_names(netns: str | None = None) -> list[str]:
    prefix = ["-n", netns] if netns else []
    out = _ip(*prefix, "-o", "link", "show", check=netns is not None).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]


def _proc_starttime(pid: int) -> int | None:
    """Start time (clock ticks since boot) of pid, to tell it apart from a reused PID."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None  # a zombie has done all it will ever do
    return int(fields[19])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for line in Path(entry.path, "status").read_text().splitlines():
                if line.startswith("PPid:"):
                    if int(line.split()[1]) == pid:
                        found.append(int(entry.name))
                    break
    return found


def _container_leader(nspawn_pid: int) -> int | None:
    """The container's PID 1 (as seen from here): the child of nspawn that is 1 in its pid ns."""
    for child in _children(nspawn_pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    if len(ids) >= 2 and ids[-1] == "1":
                        return child
    return None


def _cgroup_roots() -> list[Path]:
    """Hierarchies in which systemd inside a container needs a cgroup of its own."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():  # pure cgroup v2
        return [base]
    return [p for p in (base / "systemd", base / "unified") if (p / "cgroup.procs").exists()]


def _rmdir_cgroup_tree(path: Path) -> bool:
    """Remove an (empty of processes) cgroup subtree bottom-up; True if it is gone."""
    if not path.exists():
        return True
    for dirpath, _dirnames, _files in os.walk(path, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)
    return not path.exists()


def _ssh_banner(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout) as sock:
            return sock.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def _write_file(
    root: Path, rel: str, content: str, mode: int = 0o644, uid: int = 0, gid: int = 0
) -> None:
    """Write root/rel without following symlinks: a symlink in the image must never make us
    write outside the host's tree (e.g. /etc/resolv.conf -> /run/... on this machine)."""
    parts = Path(rel).parts
    current = root
    for part in parts[:-1]:
        current = current / part
        st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            raise FleetError(f"{current} is not a real directory")
    target = current / parts[-1]
    if os.path.lexists(target) and (target.is_symlink() or not target.is_file()):
        target.unlink()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.write(fd, content.encode())
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _mkdir(root: Path, rel: str, mode: int, uid: int, gid: int) -> None:
    path = root / rel
    if path.is_symlink():
        raise FleetError(f"{path} is a symlink")
    path.mkdir(mode=mode, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def _passwd(root: Path) -> dict[str, tuple[int, int, str]]:
    users = {}
    for line in (root / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if len(f) >= 7:
            users[f[0]] = (int(f[2]), int(f[3]), f[5])
    return users


# --------------------------------------------------------------------------------------------
# launching containers


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
# lacks CAP_SYS_RESOURCE); see "Differences from real hosts" at the top.
_NSPAWN_WRAPPER = """
n=$1; shift
while [ "$n" -gt 0 ]; do echo $$ > "$1"; shift; n=$((n - 1)); done
ulimit -H -n 524288 2>/dev/null || true
exec setpriv --pdeathsig TERM -- "$@"
"""


# --------------------------------------------------------------------------------------------
# network


class _Network:
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
            _flock_fd(fd, lock_timeout, "fleet network lock (10.254.0.0/24 is one per machine)")
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        try:
            _clean_stale(cache)
            in_use = _ip("-4", "-o", "addr", "show", "to", SUBNET).stdout.strip()
            in_use += _ip("-4", "route", "show", "to", "root", SUBNET).stdout.strip()
            if "10.254.0." in in_use:
                raise FleetError(
                    f"{SUBNET} is already used in the root network namespace:\n{in_use}"
                )
            _ip("netns", "add", self.netns)
            no_v6 = ["net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"]
            run_command(["ip", "netns", "exec", self.netns, "sysctl", "-qw", *no_v6])
            _ip("-n", self.netns, "link", "add", self.bridge, "type", "bridge",
                "stp_state", "0", "forward_delay", "0")  # fmt: skip
            _ip("-n", self.netns, "link", "set", self.bridge, "up")
            _ip("link", "add", self.admin_link, "type", "veth", "peer", "name", f"efb-{self.runid}",
                "netns", self.netns)  # fmt: skip
            v6 = Path(f"/proc/sys/net/ipv6/conf/{self.admin_link}/disable_ipv6")
            if v6.exists():
                v6.write_text("1\n")
            _ip("-n", self.netns, "link", "set", f"efb-{self.runid}", "master", self.bridge, "up")
            _ip("addr", "add", f"{ADMIN_ADDRESS}/24", "dev", self.admin_link)
            _ip("link", "set", self.admin_link, "up")
        except BaseException:
            self.teardown()
            raise

    def teardown(self) -> list[str]:
        """Delete everything setup() made and drop the lock; returns what could not be removed."""
        problems = []
        if self.admin_link in _link_names():
            _ip("link", "del", self.admin_link, check=False)
        if self.netns in _netns_names():
            _ip("netns", "del", self.netns, check=False)
        for root in _cgroup_roots():
            _rmdir_cgroup_tree(root / _CGROUP_DIR / self.runid)
            with contextlib.suppress(OSError):
                (root / _CGROUP_DIR).rmdir()  # fails harmlessly if another run still uses it
        if self.admin_link in _link_names():
            problems.append(f"link {self.admin_link}")
        if self.netns in _netns_names():
            problems.append(f"netns {self.netns}")
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return problems

    def alloc(self) -> int:
        for n in range(1, MAX_HOSTS + 1):
            if n not in self.used:
                self.used.add(n)
                return n
        raise FleetError(f"no free address left in {SUBNET}")


_net_guard = threading.Lock()
_network: _Network | None = None


def _acquire_network(lock_timeout: float, cache: Path) -> _Network:
    global _network
    with _net_guard:
        if _network is None:
            net = _Network(secrets.token_hex(3))
            net.setup(lock_timeout, cache)
            _network = net
        _network.users += 1
        return _network


def _release_network(net: _Network) -> list[str]:
    global _network
    with _net_guard:
        net.users -= 1
        if net.users > 0:
            return []
        _network = None
        return net.teardown()


def _clean_stale(cache: Path) -> None:
    """Remove what a previous run that died (SIGKILL, power loss) left behind.

    Called only while holding the machine lock, so no live fleet owns any of these names. Only
    names, mounts and directories are removed; processes we did not start are never signalled
    (its nspawn processes got SIGTERM from ``setpriv --pdeathsig`` when their parent died).
    """
    for mountpoint in sorted(
        (m for m in _mounts() if _STALE_MOUNT.search(m)), key=len, reverse=True
    ):
        log.warning("unmounting stale fleet mount %s", mountpoint)
        _umount(mountpoint, attempts=3)
    for name in _netns_names():
        if _STALE_NETNS.match(name):
            log.warning("deleting stale fleet netns %s", name)
            _ip("netns", "del", name, check=False)
    for name in _link_names():
        if _STALE_LINK.match(name):
            log.warning("deleting stale fleet link %s", name)
            _ip("link", "del", name, check=False)
    runs = cache / "runs"
    if runs.is_dir():
        for rundir in runs.iterdir():
            m = re.match(r"fleet-(\d+)-", rundir.name)
            if m and not Path(f"/proc/{m.group(1)}").exists():  # its process is gone
                with contextlib.suppress(FleetError, OSError):
                    _safe_rmtree(rundir)
    for root in _cgroup_roots():
        top = root / _CGROUP_DIR
        if top.is_dir():
            for sub in top.iterdir():
                if sub.is_dir():
                    _rmdir_cgroup_tree(sub)


# --------------------------------------------------------------------------------------------
# hosts and fleets


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
        env = {"PATH": _PATH, "LANG": "C.UTF-8", "HOME": "/root", "TERM": "dumb"}
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
        _ip("-n", self.bridge_netns, "link", "set", self.bridge_port, "down")

    def restore_network(self) -> None:
        """Undo cut_network (the bridge has STP off, so the port forwards at once).

        Also forgets the ARP failures the cut caused, in every fleet namespace and on the admin
        side: otherwise the first connection after the restore fails at once with "No route to
        host" until the kernel re-probes (measured: ~0.5 s), which makes tests flaky.
        """
        _ip("-n", self.bridge_netns, "link", "set", self.bridge_port, "up")
        # The kernel applies carrier changes asynchronously (linkwatch, up to ~1 s): until both
        # ends are operationally UP, frames are still dropped and ARP probes wasted.
        deadline = time.monotonic() + 5
        for _ in range(100):
            ends = [("-n", self.netns, "eth0"), ("-n", self.bridge_netns, self.bridge_port)]
            if all(
                " state UP " in _ip(n, ns, "-o", "link", "show", dev).stdout for n, ns, dev in ends
            ):
                break
            if time.monotonic() >= deadline:
                raise FleetError(f"{self.name}: network did not come back within 5 s")
            time.sleep(0.05)
        runid = self.bridge_netns.removeprefix("efnet-")
        flush = ["neigh", "flush", "nud", "failed", "nud", "incomplete"]
        for ns in _netns_names():
            if ns.startswith(f"efh-{runid}-"):
                _ip("-n", ns, *flush, check=False)
        _ip(*flush, "dev", f"efa-{runid}", check=False)

    @contextlib.contextmanager
    def network_cut(self) -> Iterator[Host]:
        """``with host.network_cut():`` — partitioned inside the block, restored after it."""
        self.cut_network()
        try:
            yield self
        finally:
            self.restore_network()


@dataclass
class _Record:
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
        return self.dir / "root"

    @property
    def console_log(self) -> Path:
        return self.dir / "console.log"

    def console_tail(self, lines: int = 25) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "(no console log)"
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
        return "\n".join(text.splitlines()[-lines:])


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
        self._records: list[_Record] = []
        self._net: _Network | None = None
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
                rec = _Record(n, name, address, self._workdir() / name)
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
                self._stop(batch)
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
        problems = self._stop(list(self._records))
        if self._net is not None:
            problems += _release_network(self._net)
        if self._dir is not None:
            try:
                _safe_rmtree(self._dir)
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

    def _boot(self, rec: _Record, lower: Path, net: _Network) -> None:
        started = time.monotonic()
        self._prepare_root(rec, lower)
        self._prepare_network(rec, net)
        self._launch(rec, net)
        self._wait_ready(rec, started)
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

    def _prepare_root(self, rec: _Record, lower: Path) -> None:
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
                log.warning(
                    "overlay mount failed (%s); copying the rootfs instead", res.stderr.strip()
                )
        if not rec.mode:
            run_command(["cp", "-a", "--reflink=auto", f"{lower}/.", str(rec.root)], timeout=600)
            rec.mode = "copy"
        root = rec.root
        _write_file(root, "etc/machine-id", secrets.token_hex(16) + "\n", 0o444)
        _write_file(root, "etc/hostname", rec.name + "\n")
        keydir = rec.dir / "hostkey"
        keydir.mkdir(mode=0o700)
        run_command(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{rec.name}",
                     "-f", str(keydir / "key")])  # fmt: skip
        _write_file(root, "etc/ssh/ssh_host_ed25519_key", (keydir / "key").read_text(), 0o600)
        host_pub = (keydir / "key.pub").read_text()
        rec.host_key = " ".join(host_pub.split()[:2])
        _write_file(root, "etc/ssh/ssh_host_ed25519_key.pub", host_pub, 0o644)
        pub = self.ssh_key.with_suffix(".pub").read_text()
        users = _passwd(root)
        for user in ("root", SUDO_USER, NOSUDO_USER):
            uid, gid, home = users[user]
            rel_home = home.lstrip("/")
            _mkdir(root, f"{rel_home}/.ssh", 0o700, uid, gid)
            _write_file(root, f"{rel_home}/.ssh/authorized_keys", pub, 0o600, uid, gid)

    def _prepare_network(self, rec: _Record, net: _Network) -> None:
        _ip("netns", "add", rec.name)
        rec.netns_created = True
        # IPv6 off for interfaces created from now on (eth0), lo keeps ::1.
        no_v6 = "net.ipv6.conf.default.disable_ipv6=1"
        run_command(["ip", "netns", "exec", rec.name, "sysctl", "-qw", no_v6])
        rec.port = f"efp-{net.runid}-{rec.index}"
        # A MAC derived from the address: a later host reusing the address stays reachable
        # through neighbour caches that still hold the old entry.
        mac = f"02:ef:0a:fe:00:{FIRST_HOST_OCTET + rec.index:02x}"
        _ip("-n", net.netns, "link", "add", rec.port, "type", "veth",
            "peer", "name", "eth0", "address", mac, "netns", rec.name)  # fmt: skip
        _ip("-n", net.netns, "link", "set", rec.port, "master", net.bridge, "up")
        _ip("-n", rec.name, "addr", "add", f"{rec.address}/24", "dev", "eth0")
        _ip("-n", rec.name, "link", "set", "lo", "up")
        _ip("-n", rec.name, "link", "set", "eth0", "up")

    def _launch(self, rec: _Record, net: _Network) -> None:
        procs = []
        for root in _cgroup_roots():
            group = root / _CGROUP_DIR / net.runid / rec.name
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

    def _wait_ready(self, rec: _Record, started: float) -> None:
        assert rec.proc is not None
        deadline = started + self.boot_timeout
        banner = False
        state = "unknown"
        for _ in range(int(self.boot_timeout / 0.1) + 10):
            if rec.proc.poll() is not None:
                raise FleetError(
                    f"systemd-nspawn exited with {rec.proc.returncode} during boot; "
                    f"console ({rec.console_log}):\n{rec.console_tail()}"
                )
            if rec.leader is None:
                rec.leader = _container_leader(rec.proc.pid)
                if rec.leader is not None:
                    rec.leader_start = _proc_starttime(rec.leader)
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
                    env={"PATH": _PATH},
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
                        env={"PATH": _PATH},
                    ).stdout.strip()
                    log.warning("%s booted degraded; failed units:\n%s", rec.name, failed)
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        raise FleetError(
            f"not ready after {self.boot_timeout:.0f} s (leader pid {rec.leader}, "
            f"sshd banner {banner}, system state {state!r}); "
            f"console ({rec.console_log}):\n{rec.console_tail()}"
        )

    def _refresh_names(self) -> None:
        """Every host's /etc/hosts and the admin known_hosts list all hosts of this fleet."""
        live = [r for r in self._records if r.host is not None]
        entries = "".join(f"{r.address}\t{r.name}\n" for r in live)
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n" + entries
        for rec in live:
            _write_file(rec.root, "etc/hosts", hosts)
        lines = "".join(f"{r.address},{r.name} {r.host_key}\n" for r in live)
        tmp = self.known_hosts.with_suffix(".tmp")
        tmp.write_text(lines)
        tmp.replace(self.known_hosts)

    def _stop(self, records: list[_Record]) -> list[str]:
        """Tear down the given hosts: all of them in parallel, each wait bounded."""
        problems: list[str] = []
        live = [r for r in records if r.proc is not None and r.proc.poll() is None]
        for rec in live:
            assert rec.proc is not None
            rec.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
        deadline = time.monotonic() + self.stop_timeout
        for _ in range(int(self.stop_timeout / 0.1) + 10):
            if all(r.proc is not None and r.proc.poll() is not None for r in live):
                break
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        for rec in live:
            assert rec.proc is not None
            if rec.proc.poll() is None:
                log.warning("%s did not power off in %.0f s; SIGKILL", rec.name, self.stop_timeout)
                rec.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    rec.proc.wait(timeout=5)
        for rec in records:
            problems += self._cleanup_record(rec)
        return problems

    def _cleanup_record(self, rec: _Record) -> list[str]:
        problems = []
        if rec.proc is not None and rec.proc.poll() is None:
            problems.append(f"{rec.name}: systemd-nspawn pid {rec.proc.pid} still running")
        if rec.leader is not None and rec.leader_start is not None:
            problems += _kill_orphaned_init(rec.name, rec.leader, rec.leader_start)
        if rec.mode == "overlay":
            _umount(str(rec.root))
            if str(rec.root) in _mounts():
                problems.append(f"{rec.name}: {rec.root} still mounted")
            else:
                rec.mode = ""
        if rec.netns_created:
            _ip("netns", "del", rec.name, check=False)
            rec.netns_created = rec.name in _netns_names()
            if rec.netns_created:
                problems.append(f"{rec.name}: netns still present")
        net = self._net
        bridge_alive = net is not None and net.netns in _netns_names()
        if net is not None and bridge_alive and rec.port in _link_names(net.netns):
            _ip("-n", net.netns, "link", "del", rec.port, check=False)
        for group in rec.cgroups:
            for _ in range(20):
                if _rmdir_cgroup_tree(group):
                    break
                time.sleep(0.1)
            else:
                problems.append(f"{rec.name}: cgroup {group} not removable")
        if not problems:
            if net is not None:
                net.used.discard(rec.index)
            with contextlib.suppress(FleetError, OSError):
                _safe_rmtree(rec.dir)
        rec.host = None
        return problems


def _kill_orphaned_init(name: str, pid: int, starttime: int) -> list[str]:
    """SIGKILL a container init that outlived its nspawn (only happens after nspawn's SIGKILL).

    It is a process we started (through nspawn); the start time check makes sure a reused PID
    is never hit.
    """
    if _proc_starttime(pid) != starttime:
        return []
    log.warning("%s: container init %d outlived systemd-nspawn; SIGKILL", name, pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    for _ in range(50):
        if _proc_starttime(pid) != starttime:
            return []
        time.sleep(0.1)
    return [f"{name}: container init {pid} survived SIGKILL"]
