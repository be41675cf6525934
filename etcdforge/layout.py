"""Where a cluster's files live on the admin machine, so every command finds them the same way.

```
<state>/cluster.json            what `up` deployed: token, binary, members (read by status/env/down)
<state>/pki/                    CA keys live here and nowhere else (or the spec's cert_dir)
<state>/members/<name>/pki/     the member's own server/peer keys and the CA certificates
<state>/members/<name>/data/    etcd data dir (0700), unless the spec's data_dir moves it
<state>/members/<name>/etcd.flags, etcd.pid, etcd.log
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


@dataclass(frozen=True)
class MemberFiles:
    """Where a member finds its data and TLS files, on whatever machine it runs."""

    data_dir: Path
    server_cert: Path
    server_key: Path
    peer_cert: Path
    peer_key: Path
    trusted_ca: Path
    peer_trusted_ca: Path

    @classmethod
    def in_dirs(cls, pki_dir: Path, data_dir: Path) -> MemberFiles:
        """The same file names everywhere: the local state dir and every host use this layout."""
        return cls(
            data_dir=data_dir,
            server_cert=pki_dir / "server.crt",
            server_key=pki_dir / "server.key",
            peer_cert=pki_dir / "peer.crt",
            peer_key=pki_dir / "peer.key",
            trusted_ca=pki_dir / "ca.crt",
            peer_trusted_ca=pki_dir / "peer-ca.crt",
        )


@dataclass(frozen=True)
class MemberLayout:
    root: Path
    data_dir: Path

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def files(self) -> MemberFiles:
        return MemberFiles.in_dirs(self.pki_dir, self.data_dir)

    @property
    def server_cert(self) -> Path:
        return self.files.server_cert

    @property
    def server_key(self) -> Path:
        return self.files.server_key

    @property
    def peer_cert(self) -> Path:
        return self.files.peer_cert

    @property
    def peer_key(self) -> Path:
        return self.files.peer_key

    @property
    def trusted_ca(self) -> Path:
        return self.files.trusted_ca

    @property
    def peer_trusted_ca(self) -> Path:
        return self.files.peer_trusted_ca

    @property
    def flags_file(self) -> Path:
        return self.root / "etcd.flags"

    @property
    def pid_file(self) -> Path:
        return self.root / "etcd.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "etcd.log"


@dataclass(frozen=True)
class StateLayout:
    root: Path
    data_root: Path | None = None
    pki_root: Path | None = None  # the spec's cert_dir: CA keys somewhere better guarded

    @property
    def cluster_file(self) -> Path:
        return self.root / "cluster.json"

    @property
    def pki_dir(self) -> Path:
        return self.pki_root if self.pki_root is not None else self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.pki_dir / "ca.key"

    @property
    def peer_ca_cert(self) -> Path:
        return self.pki_dir / "peer-ca.crt"

    @property
    def peer_ca_key(self) -> Path:
        return self.pki_dir / "peer-ca.key"

    @property
    def admin_cert(self) -> Path:
        return self.pki_dir / "admin.crt"

    @property
    def admin_key(self) -> Path:
        return self.pki_dir / "admin.key"

    @property
    def members_dir(self) -> Path:
        return self.root / "members"

    def member(self, name: str) -> MemberLayout:
        root = self.members_dir / name
        data = (self.data_root / name) if self.data_root is not None else root / "data"
        return MemberLayout(root=root, data_dir=data)
