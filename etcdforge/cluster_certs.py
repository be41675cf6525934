"""The certificates one cluster is made of, enumerated once.

Issuing (`up`/`apply`), checking (`certs check`), renewing and CA rotation all walk the same set:
the admin client certificate, and each member's server and peer certificates. Listing it here
keeps the four in step: a member added to the cluster is issued, checked and renewed alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from etcdforge import pki
from etcdforge.layout import StateLayout
from etcdforge.names import is_loopback

ADMIN_COMMON_NAME = "etcdforge-admin"


class MemberAddress(Protocol):
    """What the set needs of a member; the spec's and the deployed record's members both fit."""

    @property
    def name(self) -> str: ...

    @property
    def address(self) -> str: ...

    @property
    def client_port(self) -> int: ...

    @property
    def peer_port(self) -> int: ...


@dataclass(frozen=True)
class ClusterCertificate:
    name: str  # "admin", "<member>/server", "<member>/peer"
    role: pki.Role
    cert: Path
    key: Path
    ca_cert: Path
    ca_key: Path
    common_name: str
    issue_hosts: tuple[str, ...]  # the SANs it is issued with
    required_hosts: tuple[str, ...]  # the SANs it cannot do without (checked)
    member: str | None = None
    address: str | None = None
    port: int | None = None  # where the member serves it

    @property
    def title(self) -> str:
        if self.member is None:
            return "issue the admin client certificate"
        return f"issue {self.role.value} certificate for {self.member}"


def required_hosts(address: str, role: pki.Role) -> tuple[str, ...]:
    """SANs a member cannot do without: its address, and 127.0.0.1 for loopback peers."""
    if role is pki.Role.PEER and is_loopback(address) and address != "127.0.0.1":
        return (address, "127.0.0.1")
    return (address,)


def admin_certificate(layout: StateLayout) -> ClusterCertificate:
    return ClusterCertificate(
        "admin",
        pki.Role.CLIENT,
        layout.admin_cert,
        layout.admin_key,
        layout.ca_cert,
        layout.ca_key,
        ADMIN_COMMON_NAME,
        (),
        (),
    )


def member_certificates(layout: StateLayout, member: MemberAddress) -> list[ClusterCertificate]:
    """A member's server certificate (cluster CA) and peer certificate (peer CA)."""
    files = layout.member(member.name)
    issue = tuple(pki.member_hosts(member.name, member.address))
    planes = (
        (pki.Role.SERVER, files.server_cert, files.server_key, layout.ca_cert, layout.ca_key),
        (pki.Role.PEER, files.peer_cert, files.peer_key, layout.peer_ca_cert, layout.peer_ca_key),
    )
    return [
        ClusterCertificate(
            f"{member.name}/{role.value}",
            role,
            cert,
            key,
            ca_cert,
            ca_key,
            member.name,
            issue,
            required_hosts(member.address, role),
            member.name,
            member.address,
            member.client_port if role is pki.Role.SERVER else member.peer_port,
        )
        for role, cert, key, ca_cert, ca_key in planes
    ]


def cluster_certificates(
    layout: StateLayout, members: Sequence[MemberAddress]
) -> list[ClusterCertificate]:
    certs = [admin_certificate(layout)]
    for member in members:
        certs += member_certificates(layout, member)
    return certs
