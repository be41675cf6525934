"""Which etcd binary one member starts with, switched per member, the old one kept beside it.

An upgrade switches a member right before that member restarts, never every member ahead of
time: a member that crashes meanwhile restarts on the binary it ran, not on one that may not
run at all. Two implementations, like the member runtime:

- `LocalSwitch`: a local member's own `etcd.binary` file, read by the supervisor at start;
- `HostSwitch`: the host's `<releases_dir>/current` symlink, renamed atomically; every release
  stays installed in `<releases_dir>/vX.Y.Z/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from etcdforge import release as releases
from etcdforge.binaries import Version, parse_version, probe_version
from etcdforge.errors import BinaryError
from etcdforge.hosts import Host
from etcdforge.services.local import LocalRuntime, set_member_binary
from etcdforge.spec import HostPathsSpec


class BinarySwitch(Protocol):
    """What a member starts with: a binary path (local) or an installed release tag (hosts)."""

    target: str  # what the upgrade switches members to

    def describe(self, name: str, to: str) -> str:
        """The progress line of switching `name` to `to`."""
        ...

    async def current(self, name: str) -> str | None: ...

    async def point(self, name: str, to: str) -> None: ...

    async def version(self, name: str) -> Version | None:
        """The version the member would start with: for a member that does not answer."""
        ...


class LocalSwitch:
    def __init__(self, runtime: LocalRuntime, target: Path) -> None:
        self.runtime = runtime
        self.target = str(target)

    def describe(self, name: str, to: str) -> str:
        return f"switch {name} to {to}"

    async def current(self, name: str) -> str | None:
        return str(self.runtime.binary(name))

    async def point(self, name: str, to: str) -> None:
        set_member_binary(self.runtime.files(name), Path(to))

    async def version(self, name: str) -> Version | None:
        try:
            return probe_version(self.runtime.binary(name))
        except BinaryError:
            return None


class HostSwitch:
    def __init__(self, hosts: Mapping[str, Host], paths: HostPathsSpec, target: str) -> None:
        self.hosts = hosts
        self.paths = paths
        self.target = target

    def describe(self, name: str, to: str) -> str:
        return f"point {self.paths.releases_dir}/current at {to}"

    async def current(self, name: str) -> str | None:
        return await releases.current_version(self.hosts[name], self.paths)

    async def point(self, name: str, to: str) -> None:
        await releases.point_current(self.hosts[name], self.paths, to)

    async def version(self, name: str) -> Version | None:
        tag = await self.current(name)
        try:
            return parse_version(tag) if tag else None
        except BinaryError:
            return None
