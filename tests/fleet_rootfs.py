"""The test fleet's root filesystem: one Debian image, built once per machine and recipe.

Why: every test host boots from the same read-only lower layer, so the expensive part
(``debootstrap --variant=minbase``, ~45 s, ~270 MB) happens once; hosts only add an overlay.

How: debootstrap from the mirror apt already uses here (it may be a proxy), then post-processed
(users ``deploy`` with passwordless sudo and ``nosudo``, sshd key-only, masked units, journal in
memory) and cached in ``$ETCDFORGE_FLEET_CACHE`` (default ``/var/cache/etcdforge-fleet``) under a
name that hashes the recipe. Built in a temp dir and renamed, under a file lock; images of older
recipes are pruned unless a mounted overlay still uses them.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

from tests.fleet_fs import flock_path, safe_rmtree
from tests.fleet_proc import SYSTEM_PATH, CommandError, FleetError, run_command

log = logging.getLogger("etcdforge.tests.fleet")

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


def cache_dir() -> Path:
    """Where the rootfs and the per-run host dirs live ($ETCDFORGE_FLEET_CACHE)."""
    return Path(os.environ.get("ETCDFORGE_FLEET_CACHE") or DEFAULT_CACHE)


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
    with flock_path(cache / ".build.lock", lock_timeout, "fleet rootfs build lock"):
        if (found := rootfs_path(cache)) is not None:
            return found
        for stale in cache.glob(".build-*"):  # we hold the lock: their builder is gone
            log.warning("removing interrupted rootfs build %s", stale)
            safe_rmtree(stale)
        if final.exists():
            safe_rmtree(final)
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
            safe_rmtree(tmp)
        log.info("built %s in %.1f s", final, time.monotonic() - started)
    return final


def _prune_old_rootfs(cache: Path, keep: Path) -> None:
    """Delete images of older recipes (~250 MB each) unless a mounted overlay still uses them."""
    in_use = Path("/proc/self/mounts").read_text()
    for old in cache.glob(f"rootfs-{SUITE}-*"):
        if old != keep and f"lowerdir={old}" not in in_use:
            log.info("removing the rootfs of an older recipe: %s", old)
            with contextlib.suppress(FleetError, OSError):
                safe_rmtree(old)


def _chroot(root: Path, *argv: str) -> None:
    run_command(["chroot", str(root), *argv], env={"PATH": SYSTEM_PATH, "LANG": "C.UTF-8"})


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
