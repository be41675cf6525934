"""A cluster's certificates: the files and the steps that issue them.

Checking, importing, cfssl's gencert, renewal and CA rotation build on this module
(ops.cert_check, ops.cert_import, ops.gencert, ops.renew, ops.rotate_ca).

Two CAs for etcdforge's own PKI: one for the client plane (server certs, admin and apiserver
clients) and one for the peer plane, so that a client certificate is never accepted on the peer
port. The CA keys stay in `<state>/pki`; each member directory receives only its own keys and the
CA certificates. An imported seed PKI has one CA for both planes; `up` then pins the peer port to
the peer certificate's CN.

A CA file may hold several certificates (during a rotation it trusts the old and the new CA);
the one that matches the key file signs, and a leaf is valid if any of them signed it.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from etcdforge import pki
from etcdforge.cluster_certs import ClusterCertificate, admin_certificate, member_certificates
from etcdforge.errors import PKIError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write, ensure_dir, write_temp
from etcdforge.layout import StateLayout
from etcdforge.ops.plan import Step

if TYPE_CHECKING:  # the spec pulls in pydantic; gencert and check never need it
    from etcdforge.spec import ClusterSpec, MemberSpec

DEFAULT_WARN_WITHIN = dt.timedelta(days=30)
#: Marker written by `up --pki-dir`: the PKI is the user's, so `up` verifies it and never reissues.
IMPORT_MARKER = "imported.json"
#: The seed's file names (cfssljson -bare ca/server/peer/client).
SEED_FILES = {
    "ca": ("ca.pem", "ca-key.pem"),
    "server": ("server.pem", "server-key.pem"),
    "peer": ("peer.pem", "peer-key.pem"),
    "client": ("client.pem", "client-key.pem"),
}
SERVE_CHECK_TIMEOUT = 5.0


def day_span(days: int) -> dt.timedelta:
    return dt.timedelta(days=days)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- files --------------------------------------------------------------------------------


def _prepare(path: Path, data: bytes, mode: int) -> Path:
    ensure_dir(path.parent)
    return write_temp(path, data, mode)


def swap_pair(
    cert_path: Path, key_path: Path, cert: x509.Certificate, key: pki.PrivateKey | None
) -> None:
    """Replace a certificate (and its key, when it changes) under a member that is running.

    etcd reads cert-file then key-file on every handshake. With the key unchanged the swap is a
    single rename: every handshake sees a matching pair. With a new key both files are written
    and synced first, then renamed back to back, certificate first: a handshake can only mix
    them if its two reads straddle those two renames exactly (microseconds); the client then
    reconnects once.
    """
    cert_tmp = _prepare(cert_path, pki.cert_to_pem(cert), PUBLIC_FILE)
    key_tmp = _prepare(key_path, pki.key_to_pem(key), PRIVATE_FILE) if key is not None else None
    try:
        os.replace(cert_tmp, cert_path)
        if key_tmp is not None:
            os.replace(key_tmp, key_path)
    finally:
        cert_tmp.unlink(missing_ok=True)
        if key_tmp is not None:
            key_tmp.unlink(missing_ok=True)


def write_bundle(path: Path, certs: Sequence[x509.Certificate]) -> bool:
    return atomic_write(path, b"".join(pki.cert_to_pem(c) for c in certs), PUBLIC_FILE)


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(cert.signature_hash_algorithm or _sha256())


def _sha256() -> Any:
    from cryptography.hazmat.primitives import hashes

    return hashes.SHA256()


def bundle_ids(path: Path) -> frozenset[bytes]:
    """The set of certificates in a PEM bundle (empty when missing or unreadable)."""
    try:
        return frozenset(fingerprint(c) for c in pki.load_certs(path))
    except PKIError:
        return frozenset()


def signing_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, pki.PrivateKey]:
    """The CA in a (possibly multi-CA) file that the key file belongs to."""
    if not key_path.exists():
        raise PKIError(
            f"{key_path}: CA key not found; signing needs it (import it with ca-key.pem, or run "
            "`etcdforge certs rotate-ca` to replace the CA)"
        )
    key = pki.load_key(key_path)
    for cert in pki.load_certs(cert_path):
        if pki.key_matches(cert, key):
            return cert, key
    raise PKIError(
        f"{key_path}: matches no certificate in {cert_path}; restore the CA pair from backup"
    )


def _signing_ok(cert_path: Path, key_path: Path) -> bool:
    try:
        signing_ca(cert_path, key_path)
    except PKIError:
        return False
    return True


def pair_ok(cert_path: Path, key_path: Path) -> bool:
    try:
        return pki.key_matches(pki.load_cert(cert_path), pki.load_key(key_path))
    except PKIError:
        return False


# --- issuing steps (used by `up`) ----------------------------------------------------------


def _ca_step(spec: ClusterSpec, title: str, cert_path: Path, key_path: Path, cn: str) -> Step:
    def run() -> None:
        # The key lands first: a key without its certificate is a creation cut short (nothing
        # can have been signed yet) and is replaced; a certificate without its key is not.
        if cert_path.exists():
            raise PKIError(
                f"{cert_path}: CA certificate and key do not match or one is missing; "
                "restore both from backup (a new CA would lock out every existing certificate)"
            )
        key = pki.generate_key(spec.pki.key_algorithm)
        cert = pki.issue_ca(cn, key, day_span(spec.pki.ca_validity_days))
        ensure_dir(key_path.parent)
        atomic_write(key_path, pki.key_to_pem(key), PRIVATE_FILE)
        atomic_write(cert_path, pki.cert_to_pem(cert), PUBLIC_FILE)

    return Step(title, lambda: _signing_ok(cert_path, key_path), run)


def chains_to(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> bool:
    return any(pki.signed_by(cert, ca) for ca in cas)


def _leaf_ok(cert_path: Path, key_path: Path, ca_path: Path, hosts: list[str]) -> bool:
    if not pair_ok(cert_path, key_path):
        return False
    try:
        cert, cas = pki.load_cert(cert_path), pki.load_certs(ca_path)
    except PKIError:
        return False
    info = pki.inspect_cert(cert)
    return chains_to(cert, cas) and set(hosts) <= set(info.sans) and info.remaining().days > 0


def leaf_step(spec: ClusterSpec, leaf: ClusterCertificate) -> Step:
    """Issue one certificate of the cluster's set, unless a valid one is in place."""
    hosts = list(leaf.issue_hosts)

    def run() -> None:
        ca_cert, ca_key = signing_ca(leaf.ca_cert, leaf.ca_key)
        key = pki.generate_key(spec.pki.key_algorithm)
        validity = day_span(spec.pki.cert_validity_days)
        cert = pki.issue_role_cert(
            leaf.role, ca_cert, ca_key, leaf.common_name, key, validity, hosts
        )
        swap_pair(leaf.cert, leaf.key, cert, key)

    return Step(leaf.title, lambda: _leaf_ok(leaf.cert, leaf.key, leaf.ca_cert, hosts), run)


def copy_step(title: str, source: Path, target: Path, mode: int = PUBLIC_FILE) -> Step:
    def done() -> bool:
        try:
            return target.read_bytes() == source.read_bytes()
        except FileNotFoundError:
            return False

    def run() -> None:
        ensure_dir(target.parent)
        atomic_write(target, source.read_bytes(), mode)

    return Step(title, done, run)


def member_pki_steps(spec: ClusterSpec, layout: StateLayout, member: MemberSpec) -> list[Step]:
    files = layout.member(member.name)
    steps = [leaf_step(spec, leaf) for leaf in member_certificates(layout, member)]
    return [
        *steps,
        copy_step(f"install CA certificate for {member.name}", layout.ca_cert, files.trusted_ca),
        copy_step(
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
        leaf_step(spec, admin_certificate(layout)),
    ]
    for member in spec.members:
        steps += member_pki_steps(spec, layout, member)
    return steps


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
