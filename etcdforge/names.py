"""Address and key-algorithm vocabulary shared by the spec and the PKI.

Kept free of pydantic and YAML so that certificate code (and `etcdforge certs gencert`, run once
per certificate like cfssl) starts without loading the spec machinery.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from enum import StrEnum
from typing import Protocol, TypeVar

from etcdforge.errors import EtcdforgeError

HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
#: Cluster and member names become file and directory names.
SAFE_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")


class KeyAlgorithm(StrEnum):
    ECDSA_P256 = "ecdsa-p256"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"


def is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def is_hostname(value: str) -> bool:
    if not value or len(value) > 253 or is_ip(value):
        return False
    labels = value.rstrip(".").split(".")
    # An all-numeric last label is a malformed IP, not a hostname.
    return all(HOSTNAME_LABEL.match(label) for label in labels) and not labels[-1].isdigit()


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class Named(Protocol):
    @property
    def name(self) -> str: ...


N = TypeVar("N", bound=Named)


class Peer(Named, Protocol):
    @property
    def peer_url(self) -> str: ...


def initial_cluster(members: Iterable[Peer]) -> str:
    """etcd's --initial-cluster value: `name=peer-url` for each member, comma-separated."""
    return ",".join(f"{m.name}={m.peer_url}" for m in members)


def find_member(members: Sequence[N], name: str) -> N | None:
    return next((m for m in members if m.name == name), None)


def unknown_member(members: Sequence[Named], name: str, cluster: str) -> str:
    """The one message for a member name that is not in the cluster."""
    known = ", ".join(m.name for m in members)
    return f"no member named {name!r} in cluster {cluster} (members: {known})"


def require_member(members: Sequence[N], name: str, cluster: str, error: type[EtcdforgeError]) -> N:
    found = find_member(members, name)
    if found is None:
        raise error(unknown_member(members, name, cluster))
    return found
