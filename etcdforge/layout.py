"""Where a cluster's files live on the admin machine, so every command finds them the same way.

```
<state>/cluster.json            what `up` deployed: token, binary, members (read by status/env/down)
<state>/pki/                    CA keys live here and nowhere else (or the spec's cert_dir)
<state>/members/<name>/pki/     the member's own server/peer keys and the CA certificates
<state>/members/<name>/data/    etcd data dir (0700), unless the spec's data_dir moves it
<state>/members/<name>/etcd.flags, etcd.pid, etcd.log
<state>/members/<name>/etcd.binary  only during an upgrade: the etcd this member starts with
<state>/upgrade.json            only during an upgrade: its target and the snapshot taken first
<state>/snapshots/              verified snapshots taken before upgrades (kept)
```
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

STATE_HOME_ENV = "ETCDFORGE_STATE_HOME"


def state_home() -> Path:
    """The per-user directory that holds one sub-directory per cluster."""
    explicit = os.environ.get(STATE_HOME_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "etcdforge"


def resolve_state_dir(cluster: str, explicit: Path | None = None) -> Path:
    return (explicit if explicit is not None else state_home() / cluster).absolute()


class InDir:
    """A file at a fixed name inside one of the owner's directories (a read-only attribute)."""

    def __init__(self, directory: str, name: str) -> None:
        self.directory = directory
        self.name = name

    def __get__(self, owner: object, kind: type | None = None) -> Path:
        if owner is None:
            raise AttributeError(f"{self.name} is a path of a layout instance")
        directory: Path = getattr(owner, self.directory)
        return directory / self.name


@dataclass(frozen=True)
class MemberFiles:
    """Where a member finds its data and TLS files, on whatever machine it runs.

    The same file names everywhere: the local state dir and every host use this layout.
    """

    data_dir: Path
    pki_dir: Path

    server_cert, server_key = InDir("pki_dir", "server.crt"), InDir("pki_dir", "server.key")
    peer_cert, peer_key = InDir("pki_dir", "peer.crt"), InDir("pki_dir", "peer.key")
    trusted_ca, peer_trusted_ca = InDir("pki_dir", "ca.crt"), InDir("pki_dir", "peer-ca.crt")


@dataclass(frozen=True)
class MemberLayout(MemberFiles):
    """A local member: its files under `<state>/members/<name>/`."""

    root: Path = Path()

    flags_file = InDir("root", "etcd.flags")
    pid_file = InDir("root", "etcd.pid")
    log_file = InDir("root", "etcd.log")
    binary_file = InDir("root", "etcd.binary")  # the member's own etcd while an upgrade rolls


@dataclass(frozen=True)
class StateLayout:
    root: Path
    data_root: Path | None = None
    pki_root: Path | None = None  # the spec's cert_dir: CA keys somewhere better guarded

    cluster_file = InDir("root", "cluster.json")
    members_dir = InDir("root", "members")
    upgrade_file = InDir("root", "upgrade.json")
    snapshots_dir = InDir("root", "snapshots")
    # The CA keys live here and nowhere else: members get the CA certificates only.
    ca_cert, ca_key = InDir("pki_dir", "ca.crt"), InDir("pki_dir", "ca.key")
    peer_ca_cert, peer_ca_key = InDir("pki_dir", "peer-ca.crt"), InDir("pki_dir", "peer-ca.key")
    admin_cert, admin_key = InDir("pki_dir", "admin.crt"), InDir("pki_dir", "admin.key")

    @property
    def pki_dir(self) -> Path:
        return self.pki_root if self.pki_root is not None else self.root / "pki"

    def member(self, name: str) -> MemberLayout:
        root = self.members_dir / name
        data = (self.data_root / name) if self.data_root is not None else root / "data"
        return MemberLayout(data_dir=data, pki_dir=root / "pki", root=root)
