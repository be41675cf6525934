"""`etcdforge certs renew`: reissue leaves in place; running members serve them at once."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from etcdforge import pki
from etcdforge.cluster_certs import cluster_certificates
from etcdforge.errors import PKIError, ServiceError
from etcdforge.names import require_member
from etcdforge.ops.cert_check import check_entry, state_entries
from etcdforge.ops.certs import (
    DEFAULT_WARN_WITHIN,
    SERVE_CHECK_TIMEOUT,
    day_span,
    pair_ok,
    signing_ca,
    swap_pair,
    utcnow,
)
from etcdforge.ops.plan import SILENT, PlanResult, Progress, Step, execute
from etcdforge.ops.target import Selection, record_to_change
from etcdforge.record import ClusterRecord
from etcdforge.services import local
from etcdforge.tls import TLSFiles

if TYPE_CHECKING:  # the spec pulls in pydantic; gencert and check never need it
    pass


# --- renewal ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A leaf certificate etcdforge can reissue, and how to see it being served."""

    name: str
    role: pki.Role
    cert: Path
    key: Path
    ca_cert: Path
    ca_key: Path
    hosts: tuple[str, ...]
    member: str | None = None
    serve: tuple[str, int, TLSFiles] | None = None  # host, port, TLS files to connect with


def cluster_leaves(record: ClusterRecord) -> list[Leaf]:
    layout = record.layout
    leaves = []
    for cert in cluster_certificates(layout, record.deployed.members):
        serve = None
        if cert.member is not None and cert.address is not None and cert.port is not None:
            files = layout.member(cert.member)
            tls = (
                record.admin_tls
                if cert.role is pki.Role.SERVER
                else TLSFiles(files.peer_trusted_ca, files.peer_cert, files.peer_key)
            )
            serve = (cert.address, cert.port, tls)
        leaves.append(
            Leaf(
                cert.name,
                cert.role,
                cert.cert,
                cert.key,
                cert.ca_cert,
                cert.ca_key,
                cert.required_hosts,
                cert.member,
                serve,
            )
        )
    return leaves


def _same_kind_key(key: pki.PrivateKey) -> pki.PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        return rsa.generate_private_key(public_exponent=65537, key_size=key.key_size)
    return ec.generate_private_key(key.curve)


def reissue(
    leaf: Leaf,
    validity: dt.timedelta,
    new_key: bool = False,
    signer: tuple[x509.Certificate, pki.PrivateKey] | None = None,
) -> x509.Certificate:
    """A fresh certificate for the same subject and SANs, with the usages its role needs.

    The key is kept unless `new_key`, so the swap is one atomic rename (see `swap_pair`).
    """
    old = pki.load_cert(leaf.cert)
    key = pki.load_key(leaf.key)
    ca_cert, ca_key = signer or signing_ca(leaf.ca_cert, leaf.ca_key)
    fresh = _same_kind_key(key) if new_key else key
    sans = list(pki.inspect_cert(old).sans)
    cert = pki.issue_leaf(
        ca_cert,
        ca_key,
        old.subject,
        fresh.public_key(),
        pki.ROLE_EXTENDED_USAGES[leaf.role],
        validity,
        list(dict.fromkeys([*sans, *leaf.hosts])),
    )
    swap_pair(leaf.cert, leaf.key, cert, fresh if new_key else None)
    return cert


def served_serial(host: str, port: int, tls: TLSFiles, timeout: float = 3.0) -> int:
    """The serial of the certificate a listener presents on a new TLS handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(tls.cert), str(tls.key))
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    if der is None:
        raise ServiceError(f"{host}:{port} presented no certificate")
    return x509.load_der_x509_certificate(der).serial_number


def wait_served(leaf: Leaf, serial: int, timeout: float = SERVE_CHECK_TIMEOUT) -> bool:
    """True once the member presents `serial` (etcd re-reads its files on each handshake)."""
    if leaf.serve is None:
        return True
    host, port, tls = leaf.serve
    deadline = time.monotonic() + timeout
    last: int | None = None
    while time.monotonic() < deadline:
        try:
            last = served_serial(host, port, tls)
        except (OSError, ssl.SSLError):
            last = None
        if last == serial:
            return True
        time.sleep(0.05)
    return False


def member_running(record: ClusterRecord, name: str) -> bool:
    files = record.layout.member(name)
    return local.running_pid(files.pid_file, files.data_dir) is not None


def renew_step(
    record: ClusterRecord,
    leaf: Leaf,
    validity: dt.timedelta,
    new_key: bool,
    verb: str = "renew",
    done: Any = None,
    signer: Any = None,
) -> Step:
    """Reissue one leaf; done once its serial changed, so a rerun does not renew twice."""
    try:
        before = pki.load_cert(leaf.cert).serial_number
    except PKIError:
        before = None

    def is_done() -> bool:
        if done is not None:
            return bool(done())
        try:
            current = pki.load_cert(leaf.cert).serial_number
        except PKIError:
            return False
        return current != before and pair_ok(leaf.cert, leaf.key)

    def run() -> None:
        cert = reissue(leaf, validity, new_key, signer() if signer is not None else None)
        if (
            leaf.member
            and member_running(record, leaf.member)
            and not wait_served(leaf, cert.serial_number)
        ):
            raise ServiceError(
                f"member {leaf.member} still serves an old certificate on port "
                f"{leaf.serve[1] if leaf.serve else '?'} after writing {leaf.cert}; "
                "check that etcd can read the file"
            )

    return Step(f"{verb} the {leaf.role.value} certificate {leaf.name}", is_done, run)


@dataclass(frozen=True)
class RenewResult:
    cluster: str
    renewed: tuple[str, ...]
    pending: tuple[str, ...]
    considered: int
    on_hosts: bool = False


def renew(
    selection: Selection,
    *,
    all_leaves: bool = False,
    member: str | None = None,
    new_key: bool = False,
    days: int | None = None,
    warn_within: dt.timedelta = DEFAULT_WARN_WITHIN,
    dry_run: bool = False,
    progress: Progress = SILENT,
) -> RenewResult:
    """Reissue leaves in place: --all, one --member, or (by default) those `check` flags."""
    record = record_to_change(selection, "certs renew")
    leaves = cluster_leaves(record)
    if member is not None:
        require_member(record.members, member, record.name, PKIError)
        leaves = [leaf for leaf in leaves if leaf.member == member]
    elif not all_leaves:
        now = utcnow()
        rows = {
            row.name: row
            for row in (check_entry(e, warn_within, now) for e in state_entries(record))
        }
        leaves = [leaf for leaf in leaves if leaf.name in rows and not rows[leaf.name].ok]
    validity = day_span(days or record.deployed.pki.cert_validity_days)
    steps = [renew_step(record, leaf, validity, new_key) for leaf in leaves]
    result: PlanResult = execute(steps, progress, dry_run)
    return RenewResult(record.name, result.changed, result.pending, len(leaves), record.on_hosts)
