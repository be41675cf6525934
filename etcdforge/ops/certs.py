"""A cluster's certificates: issue, import, check, renew (CA rotation lives in ops.rotate_ca).

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
import json
import os
import socket
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcdforge import cfssl, pki
from etcdforge.errors import PKIError, ServiceError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write, ensure_dir
from etcdforge.layout import MemberLayout, StateLayout
from etcdforge.names import is_loopback
from etcdforge.ops.plan import PlanResult, Progress, Step, execute
from etcdforge.ops.target import Selection, record_for
from etcdforge.record import ClusterRecord
from etcdforge.services import local
from etcdforge.tls import TLSFiles

if TYPE_CHECKING:  # the spec pulls in pydantic; gencert and check never need it
    from etcdforge.spec import ClusterSpec, MemberSpec

ADMIN_COMMON_NAME = "etcdforge-admin"
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


def _days(days: int) -> dt.timedelta:
    return dt.timedelta(days=days)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- files --------------------------------------------------------------------------------


def _prepare(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a synced temp file beside `path`, ready to be renamed over it."""
    ensure_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


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


def _pair_ok(cert_path: Path, key_path: Path) -> bool:
    try:
        return pki.key_matches(pki.load_cert(cert_path), pki.load_key(key_path))
    except PKIError:
        return False


# --- issuing steps (used by `up`) ----------------------------------------------------------


def _ca_step(spec: ClusterSpec, title: str, cert_path: Path, key_path: Path, cn: str) -> Step:
    def run() -> None:
        if cert_path.exists() or key_path.exists():
            raise PKIError(
                f"{cert_path}: CA certificate and key do not match or one is missing; "
                "restore both from backup (a new CA would lock out every existing certificate)"
            )
        key = pki.generate_key(spec.pki.key_algorithm)
        cert = pki.issue_ca(cn, key, _days(spec.pki.ca_validity_days))
        swap_pair(cert_path, key_path, cert, key)

    return Step(title, lambda: _signing_ok(cert_path, key_path), run)


def chains_to(cert: x509.Certificate, cas: Sequence[x509.Certificate]) -> bool:
    return any(pki.signed_by(cert, ca) for ca in cas)


def _leaf_ok(cert_path: Path, key_path: Path, ca_path: Path, hosts: list[str]) -> bool:
    if not _pair_ok(cert_path, key_path):
        return False
    try:
        cert, cas = pki.load_cert(cert_path), pki.load_certs(ca_path)
    except PKIError:
        return False
    info = pki.inspect_cert(cert)
    return chains_to(cert, cas) and set(hosts) <= set(info.sans) and info.remaining().days > 0


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
        ca_cert, ca_key = signing_ca(ca_cert_path, ca_key_path)
        key = pki.generate_key(spec.pki.key_algorithm)
        cert = pki.issue_role_cert(
            role, ca_cert, ca_key, common_name, key, _days(spec.pki.cert_validity_days), hosts
        )
        swap_pair(cert_path, key_path, cert, key)

    return Step(title, lambda: _leaf_ok(cert_path, key_path, ca_cert_path, hosts), run)


def _copy_step(title: str, source: Path, target: Path, mode: int = PUBLIC_FILE) -> Step:
    def done() -> bool:
        try:
            return target.read_bytes() == source.read_bytes()
        except FileNotFoundError:
            return False

    def run() -> None:
        ensure_dir(target.parent)
        atomic_write(target, source.read_bytes(), mode)

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


def pki_steps(spec: ClusterSpec, layout: StateLayout, pki_dir: Path | None = None) -> list[Step]:
    """What `up` runs for certificates: import a seed PKI, verify an imported one, or issue."""
    if pki_dir is not None:
        return import_steps(spec, layout, pki_dir)
    if import_marker(layout) is not None:
        return imported_verify_steps(spec, layout)
    return cluster_pki_steps(spec, layout)


def peer_allowed_cn(layout: StateLayout, pki_dir: Path | None = None) -> str | None:
    """The CN the peer port accepts when peers and clients share a CA (an imported PKI)."""
    if pki_dir is not None:
        return common_name(pki.load_cert(pki_dir / SEED_FILES["peer"][0]))
    marker = import_marker(layout)
    return str(marker["peer_cn"]) if marker is not None else None


def common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


# --- checking -----------------------------------------------------------------------------

CA_ROLE = "ca"
EKU_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "server auth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "client auth",
}
KU_NAMES = {
    "digital_signature": "signing",
    "content_commitment": "content commitment",
    "key_encipherment": "key encipherment",
    "data_encipherment": "data encipherment",
    "key_agreement": "key agreement",
    "key_cert_sign": "cert sign",
    "crl_sign": "crl sign",
}


@dataclass(frozen=True)
class CertEntry:
    """One certificate file to check, with what its role demands."""

    name: str
    role: str  # "ca" or a pki.Role value
    cert: Path
    key: Path | None
    trust: Path | None = None  # the CA bundle a leaf must chain to
    hosts: tuple[str, ...] = ()
    index: int = 0  # position in a CA bundle


@dataclass(frozen=True)
class CertRow:
    name: str
    file: str
    subject: str
    sans: tuple[str, ...]
    usages: tuple[str, ...]
    not_after: str | None
    remaining: str | None
    issuer: str
    serial: str
    status: str
    problems: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["ok"] = self.ok
        return data


def key_usage_names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(name for attr, name in KU_NAMES.items() if getattr(ku, attr))


def usage_names(cert: x509.Certificate) -> tuple[str, ...]:
    return key_usage_names(cert) + pki.inspect_cert(cert).extended_usages


def human_remaining(delta: dt.timedelta) -> str:
    sign = "-" if delta.total_seconds() < 0 else ""
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    if days:
        return f"{sign}{days}d{rest // 3600}h" if rest >= 3600 else f"{sign}{days}d"
    if rest >= 3600:
        return f"{sign}{rest // 3600}h{rest % 3600 // 60}m"
    return f"{sign}{rest // 60}m{rest % 60}s"


def cert_problems(
    entry: CertEntry,
    cert: x509.Certificate,
    now: dt.datetime,
    warn_within: dt.timedelta,
) -> list[str]:
    """Everything wrong with one certificate for its role; empty when it is fine."""
    problems: list[str] = []
    info = pki.inspect_cert(cert)
    if cert.not_valid_after_utc <= now:
        problems.append("expired")
    elif cert.not_valid_before_utc > now:
        problems.append("not valid yet")
    elif cert.not_valid_after_utc - now <= warn_within:
        problems.append(f"expires within {human_remaining(warn_within)}")
    public_key = cert.public_key()
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < pki.MIN_RSA_BITS:
        problems.append(f"RSA key of {public_key.key_size} bits is too weak")
    if entry.key is not None:
        if not entry.key.exists():
            if entry.role != CA_ROLE:
                problems.append(f"key file {entry.key.name} missing")
        else:
            try:
                if not pki.key_matches(cert, pki.load_key(entry.key)):
                    problems.append(f"does not match its key {entry.key.name}")
            except PKIError as exc:
                problems.append(str(exc).split(": ", 1)[-1])
    usages = set(usage_names(cert))
    if entry.role == CA_ROLE:
        if not info.is_ca or "cert sign" not in usages:
            problems.append("not a CA certificate (needs CA:TRUE and cert sign)")
        if not pki.signed_by(cert, cert):
            problems.append("not self-signed")
        return problems
    if info.is_ca:
        problems.append("is a CA certificate, not a leaf")
    role = pki.Role(entry.role)
    for oid in pki.ROLE_EXTENDED_USAGES[role]:
        if EKU_NAMES[oid] not in usages:
            problems.append(f"lacks usage '{EKU_NAMES[oid]}' needed by a {role.value} certificate")
    if key_usage_names(cert) and "signing" not in usages:
        problems.append("lacks key usage 'signing' (digital signature) needed for TLS")
    for host in entry.hosts:
        if host not in info.sans:
            problems.append(f"no SAN for {host}")
    if entry.trust is not None:
        try:
            cas = pki.load_certs(entry.trust)
        except PKIError:
            cas = []
        if not chains_to(cert, cas):
            problems.append(f"not signed by the CA in {entry.trust.name}")
    return problems


def check_entry(entry: CertEntry, warn_within: dt.timedelta, now: dt.datetime) -> CertRow:
    try:
        certs = pki.load_certs(entry.cert) if entry.role == CA_ROLE else [pki.load_cert(entry.cert)]
        cert = certs[entry.index]
    except (PKIError, IndexError) as exc:
        missing = not entry.cert.exists()
        message = "missing" if missing else str(exc).split(": ", 1)[-1]
        return CertRow(
            entry.name, str(entry.cert), "-", (), (), None, None, "-", "-", message, (message,)
        )
    problems = cert_problems(entry, cert, now, warn_within)
    info = pki.inspect_cert(cert)
    return CertRow(
        name=entry.name,
        file=str(entry.cert),
        subject=cert.subject.rfc4514_string(),
        sans=info.sans,
        usages=usage_names(cert),
        not_after=cert.not_valid_after_utc.isoformat(),
        remaining=human_remaining(cert.not_valid_after_utc - now),
        issuer=cert.issuer.rfc4514_string(),
        serial=f"{cert.serial_number:x}",
        status="; ".join(problems) if problems else "ok",
        problems=tuple(problems),
    )


def _member_hosts(address: str, role: pki.Role) -> tuple[str, ...]:
    """SANs a member cannot do without: its address, and 127.0.0.1 for loopback peers."""
    if role is pki.Role.PEER and is_loopback(address) and address != "127.0.0.1":
        return (address, "127.0.0.1")
    return (address,)


def _ca_entries(name: str, cert_path: Path, key_path: Path) -> list[CertEntry]:
    try:
        certs = pki.load_certs(cert_path)
    except PKIError:
        return [CertEntry(name, CA_ROLE, cert_path, key_path)]
    try:
        key: pki.PrivateKey | None = pki.load_key(key_path)
    except PKIError:
        key = None
    entries = []
    for index, cert in enumerate(certs):
        signer = key is not None and pki.key_matches(cert, key)
        label = name if signer or len(certs) == 1 else f"{name} (also trusted)"
        entries.append(
            CertEntry(label, CA_ROLE, cert_path, key_path if signer else None, index=index)
        )
    return entries


def state_entries(record: ClusterRecord) -> list[CertEntry]:
    layout = record.layout
    entries = _ca_entries("ca", layout.ca_cert, layout.ca_key)
    shared = bundle_ids(layout.ca_cert) == bundle_ids(layout.peer_ca_cert)
    if not shared:
        entries += _ca_entries("peer-ca", layout.peer_ca_cert, layout.peer_ca_key)
    entries.append(
        CertEntry("admin", pki.Role.CLIENT, layout.admin_cert, layout.admin_key, layout.ca_cert)
    )
    for member in record.spec.get("members", []):
        name, address = member["name"], member["address"]
        files = layout.member(name)
        entries.append(
            CertEntry(
                f"{name}/server",
                pki.Role.SERVER,
                files.server_cert,
                files.server_key,
                layout.ca_cert,
                _member_hosts(address, pki.Role.SERVER),
            )
        )
        entries.append(
            CertEntry(
                f"{name}/peer",
                pki.Role.PEER,
                files.peer_cert,
                files.peer_key,
                layout.peer_ca_cert,
                _member_hosts(address, pki.Role.PEER),
            )
        )
    return entries


def _role_of(path: Path) -> pki.Role:
    stem = path.name.removesuffix(".pem")
    for role in pki.Role:
        if stem.startswith(role.value):
            return role
    try:
        usages = pki.inspect_cert(pki.load_cert(path)).extended_usages
    except PKIError:
        return pki.Role.CLIENT
    return pki.Role.SERVER if "server auth" in usages else pki.Role.CLIENT


def seed_entries(directory: Path, addresses: Sequence[str] = ()) -> list[CertEntry]:
    """A cfssljson directory (ca.pem, server.pem, peer.pem, client.pem and their keys)."""
    ca_cert, ca_key = (directory / name for name in SEED_FILES["ca"])
    entries = _ca_entries("ca", ca_cert, ca_key)
    leaves = sorted(
        p
        for p in directory.glob("*.pem")
        if not p.name.endswith("-key.pem") and p.name != ca_cert.name
    )
    if not leaves:
        raise PKIError(f"{directory}: no certificates (*.pem) to check beside {ca_cert.name}")
    for path in leaves:
        role = _role_of(path)
        hosts: tuple[str, ...] = ()
        if role is not pki.Role.CLIENT:
            hosts = tuple(h for a in addresses for h in _member_hosts(a, role))
        key = path.with_name(path.name.removesuffix(".pem") + "-key.pem")
        entries.append(CertEntry(path.stem, role, path, key, ca_cert, tuple(dict.fromkeys(hosts))))
    return entries


@dataclass(frozen=True)
class CheckReport:
    source: str
    rows: tuple[CertRow, ...]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)


def check(
    selection: Selection,
    warn_within: dt.timedelta = DEFAULT_WARN_WITHIN,
    pki_dir: Path | None = None,
    now: dt.datetime | None = None,
) -> CheckReport:
    """Every certificate of a deployed cluster, or of a cfssl directory with `pki_dir`."""
    moment = now or _now()
    if pki_dir is not None:
        if not pki_dir.is_dir():
            raise PKIError(f"{pki_dir}: no such directory; pass the directory with ca.pem")
        addresses: list[str] = []
        if selection.file is not None:
            from etcdforge.spec import load_spec

            spec = load_spec(selection.file, allow_even=True)
            addresses = [m.address for m in spec.members]
        entries = seed_entries(pki_dir, addresses)
        source = str(pki_dir)
    else:
        record = record_for(selection)
        entries = state_entries(record)
        source = f"cluster {record.name} ({record.state_dir})"
    return CheckReport(source, tuple(check_entry(e, warn_within, moment) for e in entries))


# --- importing a seed PKI ------------------------------------------------------------------


def import_marker(layout: StateLayout) -> dict[str, Any] | None:
    path = layout.pki_dir / IMPORT_MARKER
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise PKIError(
            f"{path}: unreadable import marker; remove it and rerun `up --pki-dir`"
        ) from None
    return data if isinstance(data, dict) else None


def validate_seed(spec: ClusterSpec, directory: Path) -> None:
    """Refuse a seed PKI that etcd would reject, before anything is copied or started."""
    if not directory.is_dir():
        raise PKIError(f"{directory}: no such directory; pass the directory that holds ca.pem")
    for role in ("server", "peer", "client", "ca"):
        cert_name, key_name = SEED_FILES[role]
        if not (directory / cert_name).exists():
            raise PKIError(
                f"{directory / cert_name}: missing; the directory needs ca.pem, server.pem, "
                "peer.pem and client.pem with their -key.pem files (cfssljson -bare names)"
            )
        if role != "ca" and not (directory / key_name).exists():
            raise PKIError(f"{directory / key_name}: missing; it is the key of {cert_name}")
    addresses = [m.address for m in spec.members]
    entries = seed_entries(directory, addresses)
    wanted = {SEED_FILES[r][0] for r in ("ca", "server", "peer", "client")}
    now = _now()
    for entry in entries:
        if entry.cert.name not in wanted:
            continue
        row = check_entry(entry, dt.timedelta(0), now)
        if row.problems:
            fix = "reissue it (etcdforge certs gencert)"
            if any(p.startswith("no SAN for") for p in row.problems):
                fix = "reissue it with every member address (and 127.0.0.1) in the CSR's hosts"
            raise PKIError(f"{entry.cert}: {'; '.join(row.problems)}; {fix}")


def _import_pairs(
    layout: StateLayout, spec: ClusterSpec, directory: Path
) -> list[tuple[Path, Path, int]]:
    ca, ca_key = (directory / n for n in SEED_FILES["ca"])
    server, server_key = (directory / n for n in SEED_FILES["server"])
    peer, peer_key = (directory / n for n in SEED_FILES["peer"])
    client, client_key = (directory / n for n in SEED_FILES["client"])
    pairs = [
        (ca, layout.ca_cert, PUBLIC_FILE),
        (ca, layout.peer_ca_cert, PUBLIC_FILE),
        (client, layout.admin_cert, PUBLIC_FILE),
        (client_key, layout.admin_key, PRIVATE_FILE),
    ]
    if ca_key.exists():
        pairs += [(ca_key, layout.ca_key, PRIVATE_FILE), (ca_key, layout.peer_ca_key, PRIVATE_FILE)]
    for member in spec.members:
        files = layout.member(member.name)
        pairs += [
            (server, files.server_cert, PUBLIC_FILE),
            (server_key, files.server_key, PRIVATE_FILE),
            (peer, files.peer_cert, PUBLIC_FILE),
            (peer_key, files.peer_key, PRIVATE_FILE),
            (ca, files.trusted_ca, PUBLIC_FILE),
            (ca, files.peer_trusted_ca, PUBLIC_FILE),
        ]
    return pairs


def import_steps(spec: ClusterSpec, layout: StateLayout, directory: Path) -> list[Step]:
    """Copy a seed PKI into the state dir; refuse to overwrite certificates that differ."""
    directory = directory.absolute()
    validate_seed(spec, directory)
    pairs = _import_pairs(layout, spec, directory)
    for source, target, _ in pairs:
        if target.exists() and target.read_bytes() != source.read_bytes():
            raise PKIError(
                f"{target}: cluster {spec.name} already has other certificates than {directory} "
                "(its own, or renewed since the import); run `etcdforge up` without --pki-dir, "
                "or `etcdforge down --purge` to start over"
            )
    steps = [
        _copy_step(
            f"import {source.name} as {target.relative_to(layout.root)}", source, target, mode
        )
        for source, target, mode in pairs
    ]
    marker = {
        "source": str(directory),
        "peer_cn": common_name(pki.load_cert(directory / SEED_FILES["peer"][0])),
    }
    data = (json.dumps(marker, indent=2) + "\n").encode()
    marker_path = layout.pki_dir / IMPORT_MARKER

    def marker_done() -> bool:
        return marker_path.exists() and json.loads(marker_path.read_text()) == marker

    steps.append(
        Step(
            "record that the PKI is imported",
            marker_done,
            lambda: atomic_write(marker_path, data, PRIVATE_FILE),
        )
    )
    return steps


def _verify_step(name: str, entries: list[CertEntry]) -> Step:
    def problems() -> list[str]:
        now = _now()
        rows = [check_entry(e, dt.timedelta(0), now) for e in entries]
        return [f"{r.file}: {r.status}" for r in rows if not r.ok]

    def fail() -> None:
        raise PKIError(
            f"{problems()[0]}; run `etcdforge certs renew --member {name}` "
            "(or `etcdforge up --pki-dir DIR` with fixed files)"
        )

    return Step(f"check imported certificates of {name}", lambda: not problems(), fail)


def imported_verify_steps(spec: ClusterSpec, layout: StateLayout) -> list[Step]:
    """An imported PKI is the user's: `up` checks it and says what to do, never reissues."""
    steps = []
    for member in spec.members:
        files = layout.member(member.name)
        entries = [
            CertEntry(
                f"{member.name}/server",
                pki.Role.SERVER,
                files.server_cert,
                files.server_key,
                files.trusted_ca,
                _member_hosts(member.address, pki.Role.SERVER),
            ),
            CertEntry(
                f"{member.name}/peer",
                pki.Role.PEER,
                files.peer_cert,
                files.peer_key,
                files.peer_trusted_ca,
                _member_hosts(member.address, pki.Role.PEER),
            ),
        ]

        steps.append(_verify_step(member.name, entries))
    return steps


# --- cfssl gencert --------------------------------------------------------------------------


@dataclass(frozen=True)
class GencertResult:
    files: cfssl.BareFiles
    subject: str
    sans: tuple[str, ...]
    serial: int
    not_after: dt.datetime


def _read(path: Path, what: str, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PKIError(f"{path}: {what} not found; check the path given to {option}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PKIError(f"{path}: cannot read the {what} ({exc.__class__.__name__})") from None


def _parse_hostnames(text: str) -> list[str]:
    hosts = [h.strip() for h in text.split(",") if h.strip()]
    for host in hosts:
        try:
            pki.san_entries([host])
        except PKIError:
            raise PKIError(
                f"-hostname: {host!r} is neither an IP address nor a DNS name; fix or remove it"
            ) from None
    return hosts


def gencert(
    csr_file: Path,
    out_dir: Path,
    *,
    initca: bool = False,
    ca: Path | None = None,
    ca_key: Path | None = None,
    config: Path | None = None,
    profile: str | None = None,
    bare: str | None = None,
    hostname: str | None = None,
    force: bool = False,
) -> GencertResult:
    """`cfssl gencert ... | cfssljson -bare NAME` in one step: NAME.pem, NAME-key.pem, NAME.csr."""
    request = cfssl.parse_csr(_read(csr_file, "CSR file", "gencert"), str(csr_file))
    if initca:
        if ca is not None or ca_key is not None:
            raise PKIError("-initca creates a new self-signed CA; drop -ca and -ca-key")
        files = cfssl.BareFiles.of(out_dir, bare or "ca")
        if files.key.exists() and not force:
            raise PKIError(
                f"{files.key}: a CA key already exists; replacing it would orphan every "
                "certificate it signed: choose another -bare NAME or pass --force"
            )
        issued = cfssl.init_ca(request)
    else:
        if ca is None:
            raise PKIError(
                f"{csr_file}: no CA to sign with; pass -ca ca.pem -ca-key ca-key.pem "
                "(or -initca to create a CA)"
            )
        if ca_key is None:
            raise PKIError(f"{ca}: no CA key given; pass -ca-key with the key of {ca.name}")
        if not ca_key.exists():
            raise PKIError(f"{ca_key}: CA key not found; pass the key of {ca.name} with -ca-key")
        ca_cert, key = pki.load_cert(ca), pki.load_key(ca_key)
        if not pki.key_matches(ca_cert, key):
            raise PKIError(
                f"{ca_key}: does not match the CA certificate {ca}; pass the key made with it"
            )
        if not pki.inspect_cert(ca_cert).is_ca:
            raise PKIError(f"{ca}: not a CA certificate (no CA:TRUE); pass the CA's ca.pem")
        if config is not None:
            signing = cfssl.parse_config(_read(config, "config file", "-config"), str(config))
        else:
            signing = cfssl.parse_config('{"signing": {}}', "<cfssl default policy>")
        chosen = signing.profile(profile)
        hosts = _parse_hostnames(hostname) if hostname is not None else None
        issued = cfssl.sign(request, chosen, ca_cert, key, hosts)
        files = cfssl.BareFiles.of(out_dir, bare or profile or csr_file.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(files.key, issued.key_pem, PRIVATE_FILE)
    atomic_write(files.cert, issued.cert_pem, PUBLIC_FILE)
    atomic_write(files.csr, issued.csr_pem, PUBLIC_FILE)
    info = pki.inspect_cert(issued.cert)
    return GencertResult(files, info.subject, info.sans, info.serial, info.not_after)


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
    leaves = [
        Leaf(
            "admin",
            pki.Role.CLIENT,
            layout.admin_cert,
            layout.admin_key,
            layout.ca_cert,
            layout.ca_key,
            (),
        )
    ]
    for member in record.spec.get("members", []):
        name, address = member["name"], member["address"]
        files = layout.member(name)
        client_port = int(member.get("client_port", 2379))
        peer_port = int(member.get("peer_port", 2380))
        peer_tls = TLSFiles(files.peer_trusted_ca, files.peer_cert, files.peer_key)
        leaves.append(
            Leaf(
                f"{name}/server",
                pki.Role.SERVER,
                files.server_cert,
                files.server_key,
                layout.ca_cert,
                layout.ca_key,
                _member_hosts(address, pki.Role.SERVER),
                name,
                (address, client_port, record.admin_tls),
            )
        )
        leaves.append(
            Leaf(
                f"{name}/peer",
                pki.Role.PEER,
                files.peer_cert,
                files.peer_key,
                layout.peer_ca_cert,
                layout.peer_ca_key,
                _member_hosts(address, pki.Role.PEER),
                name,
                (address, peer_port, peer_tls),
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
        return current != before and _pair_ok(leaf.cert, leaf.key)

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


def renew(
    selection: Selection,
    *,
    all_leaves: bool = False,
    member: str | None = None,
    new_key: bool = False,
    days: int | None = None,
    warn_within: dt.timedelta = DEFAULT_WARN_WITHIN,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> RenewResult:
    """Reissue leaves in place: --all, one --member, or (by default) those `check` flags."""
    record = record_for(selection)
    leaves = cluster_leaves(record)
    if member is not None:
        names = [m["name"] for m in record.spec.get("members", [])]
        if member not in names:
            raise PKIError(
                f"no member named {member!r} in cluster {record.name} (members: {', '.join(names)})"
            )
        leaves = [leaf for leaf in leaves if leaf.member == member]
    elif not all_leaves:
        now = _now()
        rows = {
            row.name: row
            for row in (check_entry(e, warn_within, now) for e in state_entries(record))
        }
        leaves = [leaf for leaf in leaves if leaf.name in rows and not rows[leaf.name].ok]
    validity = _days(days or int(record.spec.get("pki", {}).get("cert_validity_days", 365)))
    steps = [renew_step(record, leaf, validity, new_key) for leaf in leaves]
    result: PlanResult = execute(steps, progress, dry_run)
    return RenewResult(record.name, result.changed, result.pending, len(leaves))
