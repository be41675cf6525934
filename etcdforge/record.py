"""The cluster record: what `up` deployed, read back by status/env/down without re-validating.

Kept as JSON in the state dir so that read-only commands stay fast (no spec parsing, no
certificate work) and so that a rerun reuses the same initial-cluster token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from etcdforge.errors import StateError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write
from etcdforge.layout import StateLayout
from etcdforge.names import initial_cluster, require_member
from etcdforge.tls import TLSFiles

RECORD_VERSION = 1


@dataclass(frozen=True)
class MemberRecord:
    name: str
    client_url: str
    peer_url: str
    data_dir: str
    #: etcd's initial-cluster-state: "new" for a member that bootstrapped the cluster, "existing"
    #: for one that joined it later (`member add`); its settings keep saying so.
    initial_state: str = "new"


@dataclass(frozen=True)
class DeployedMember:
    """A member as the cluster was deployed: where it listens and how it is reached."""

    name: str
    address: str
    client_port: int
    peer_port: int
    client_url: str
    peer_url: str
    ssh: dict[str, Any] | None


@dataclass(frozen=True)
class DeployedPKI:
    key_algorithm: str
    ca_validity_days: int
    cert_validity_days: int


@dataclass(frozen=True)
class Deployed:
    """The validated spec a cluster was deployed with, typed, without pydantic.

    The record stores the whole spec as `model_dump` wrote it, every default filled in, so the
    spec module stays the one owner of defaults: nothing here restates a port or a validity.
    """

    members: tuple[DeployedMember, ...]
    pki: DeployedPKI
    data_dir: Path | None
    cert_dir: Path | None

    @property
    def on_hosts(self) -> bool:
        return any(m.ssh for m in self.members)


def _deployed(spec: dict[str, Any], records: tuple[MemberRecord, ...]) -> Deployed:
    urls = {m.name: m for m in records}
    members = []
    for entry in spec["members"]:
        record = urls[entry["name"]]
        members.append(
            DeployedMember(
                name=entry["name"],
                address=entry["address"],
                client_port=int(entry["client_port"]),
                peer_port=int(entry["peer_port"]),
                client_url=record.client_url,
                peer_url=record.peer_url,
                ssh=entry.get("ssh"),
            )
        )
    pki = spec["pki"]
    data_root, pki_root = spec.get("data_dir"), spec.get("cert_dir")
    return Deployed(
        members=tuple(members),
        pki=DeployedPKI(
            str(pki["key_algorithm"]), int(pki["ca_validity_days"]), int(pki["cert_validity_days"])
        ),
        data_dir=Path(data_root) if data_root else None,
        cert_dir=Path(pki_root) if pki_root else None,
    )


@dataclass(frozen=True)
class ClusterRecord:
    name: str
    token: str
    binary: str
    version: str
    members: tuple[MemberRecord, ...]
    spec: dict[str, Any]
    state_dir: str

    @cached_property
    def deployed(self) -> Deployed:
        """The spec as typed fields; read once, so no caller re-parses the raw dict."""
        return _deployed(self.spec, self.members)

    @property
    def layout(self) -> StateLayout:
        return StateLayout(Path(self.state_dir), self.deployed.data_dir, self.deployed.cert_dir)

    @property
    def on_hosts(self) -> bool:
        """Members run on real hosts (deployed by `apply`), not as local processes."""
        return self.deployed.on_hosts

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    @property
    def initial_cluster(self) -> str:
        """The members as etcd's --initial-cluster lists them."""
        return initial_cluster(self.members)

    @property
    def admin_tls(self) -> TLSFiles:
        layout = self.layout
        return TLSFiles(ca=layout.ca_cert, cert=layout.admin_cert, key=layout.admin_key)

    def name_of(self, client_url: str) -> str:
        for member in self.members:
            if member.client_url == client_url:
                return member.name
        return "?"

    def member(self, name: str) -> MemberRecord:
        return require_member(self.members, name, self.name, StateError)

    def to_json(self) -> bytes:
        payload = {"record_version": RECORD_VERSION, **asdict(self)}
        return (json.dumps(payload, indent=2, default=str) + "\n").encode()


def new_token(cluster: str) -> str:
    """Unique per cluster: the same token and peer URLs would give identical cluster IDs."""
    import secrets  # only `up` and `apply` mint tokens; read-only commands skip the import

    return f"{cluster}-{secrets.token_hex(8)}"


def write_record(layout: StateLayout, record: ClusterRecord) -> bool:
    return atomic_write(layout.cluster_file, record.to_json(), PRIVATE_FILE)


def read_record(state_dir: Path) -> ClusterRecord | None:
    path = state_dir / "cluster.json"
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, OSError) as exc:
        raise StateError(
            f"{path}: unreadable cluster record ({exc}); remove it to start over"
        ) from None
    try:
        payload.pop("record_version", None)
        members = tuple(MemberRecord(**m) for m in payload.pop("members"))
        record = ClusterRecord(members=members, **payload)
        record.deployed  # noqa: B018 -- a malformed spec section fails here, with the path
        return record
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(
            f"{path}: malformed cluster record ({exc}); remove it to start over"
        ) from None


def require_record(state_dir: Path, cluster: str) -> ClusterRecord:
    record = read_record(state_dir)
    if record is None:
        raise StateError(
            f"no cluster {cluster!r} at {state_dir}; run `etcdforge up` first "
            "(`etcdforge apply -f` for hosts), or pass -f/--state-dir for another cluster"
        )
    return record
