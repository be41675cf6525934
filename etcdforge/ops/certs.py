"""Steps that lay out a cluster's PKI in the admin state dir.

Two CAs: one for the client plane (server certs, admin and apiserver clients) and one for the peer
plane, so that a client certificate is never accepted on the peer port. The CA keys stay in
`<state>/pki`; each member directory receives only its own keys and the CA certificates.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509

from etcdforge import pki
from etcdforge.errors import PKIError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write, ensure_dir
from etcdforge.layout import MemberLayout, StateLayout
from etcdforge.ops.plan import Step
from etcdforge.spec import ClusterSpec, MemberSpec

ADMIN_COMMON_NAME = "etcdforge-admin"


def _days(days: int) -> dt.timedelta:
    return dt.timedelta(days=days)


def _pair_ok(cert_path: Path, key_path: Path) -> bool:
    try:
        return pki.key_matches(pki.load_cert(cert_path), pki.load_key(key_path))
    except PKIError:
        return False


def _write_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: pki.PrivateKey
) -> None:
    ensure_dir(cert_path.parent)
    # Key first: a reader never sees a new certificate next to an old key for long.
    atomic_write(key_path, pki.key_to_pem(key), PRIVATE_FILE)
    atomic_write(cert_path, pki.cert_to_pem(cert), PUBLIC_FILE)


def _ca_step(spec: ClusterSpec, title: str, cert_path: Path, key_path: Path, cn: str) -> Step:
    def run() -> None:
        if cert_path.exists() or key_path.exists():
            raise PKIError(
                f"{cert_path}: CA certificate and key do not match or one is missing; "
                "restore both from backup (a new CA would lock out every existing certificate)"
            )
        key = pki.generate_key(spec.pki.key_algorithm)
        _write_pair(
            cert_path, key_path, pki.issue_ca(cn, key, _days(spec.pki.ca_validity_days)), key
        )

    return Step(title, lambda: _pair_ok(cert_path, key_path), run)


def _leaf_ok(cert_path: Path, key_path: Path, ca_path: Path, hosts: list[str]) -> bool:
    if not _pair_ok(cert_path, key_path):
        return False
    try:
        cert, ca = pki.load_cert(cert_path), pki.load_cert(ca_path)
    except PKIError:
        return False
    info = pki.inspect_cert(cert)
    return pki.signed_by(cert, ca) and set(hosts) <= set(info.sans) and info.remaining().days > 0


def _leaf_step(
    spec: ClusterSpec,
    title: str,
    role: pki.Role,
    ca: tuple[Path, Path],
    out: tuple[Path, Path],
    common_name: str,
    hosts: list[str],
) -> Step:
    ca_cert_path, ca_key_path = ca
    cert_path, key_path = out

    def run() -> None:
        ca_cert, ca_key = pki.load_cert(ca_cert_path), pki.load_key(ca_key_path)
        key = pki.generate_key(spec.pki.key_algorithm)
        cert = pki.issue_role_cert(
            role, ca_cert, ca_key, common_name, key, _days(spec.pki.cert_validity_days), hosts
        )
        _write_pair(cert_path, key_path, cert, key)

    return Step(title, lambda: _leaf_ok(cert_path, key_path, ca_cert_path, hosts), run)


def _copy_step(title: str, source: Path, target: Path) -> Step:
    def done() -> bool:
        try:
            return target.read_bytes() == source.read_bytes()
        except FileNotFoundError:
            return False

    def run() -> None:
        ensure_dir(target.parent)
        atomic_write(target, source.read_bytes(), PUBLIC_FILE)

    return Step(title, done, run)


def member_pki_steps(
    spec: ClusterSpec, layout: StateLayout, member: MemberSpec, files: MemberLayout
) -> list[Step]:
    hosts = pki.member_hosts(member.name, member.address)
    return [
        _leaf_step(
            spec,
            f"issue server certificate for {member.name}",
            pki.Role.SERVER,
            (layout.ca_cert, layout.ca_key),
            (files.server_cert, files.server_key),
            member.name,
            hosts,
        ),
        _leaf_step(
            spec,
            f"issue peer certificate for {member.name}",
            pki.Role.PEER,
            (layout.peer_ca_cert, layout.peer_ca_key),
            (files.peer_cert, files.peer_key),
            member.name,
            hosts,
        ),
        _copy_step(f"install CA certificate for {member.name}", layout.ca_cert, files.trusted_ca),
        _copy_step(
            f"install peer CA certificate for {member.name}",
            layout.peer_ca_cert,
            files.peer_trusted_ca,
        ),
    ]


def cluster_pki_steps(spec: ClusterSpec, layout: StateLayout) -> list[Step]:
    steps = [
        _ca_step(
            spec, "create the cluster CA", layout.ca_cert, layout.ca_key, f"{spec.name}-etcd-ca"
        ),
        _ca_step(
            spec,
            "create the peer CA",
            layout.peer_ca_cert,
            layout.peer_ca_key,
            f"{spec.name}-etcd-peer-ca",
        ),
        _leaf_step(
            spec,
            "issue the admin client certificate",
            pki.Role.CLIENT,
            (layout.ca_cert, layout.ca_key),
            (layout.admin_cert, layout.admin_key),
            ADMIN_COMMON_NAME,
            [],
        ),
    ]
    for member in spec.members:
        steps += member_pki_steps(spec, layout, member, layout.member(member.name))
    return steps
