"""`etcdforge certs check`: every certificate's usages, SANs, chain, key and time left."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from etcdforge import pki
from etcdforge.cluster_certs import cluster_certificates, required_hosts
from etcdforge.errors import PKIError
from etcdforge.ops.certs import DEFAULT_WARN_WITHIN, SEED_FILES, bundle_ids, chains_to, utcnow
from etcdforge.ops.target import Selection, record_for
from etcdforge.record import ClusterRecord

if TYPE_CHECKING:  # the spec pulls in pydantic; gencert and check never need it
    pass


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
    """One row of `certs check`: what a certificate is, and everything wrong with it."""

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
    entries += [
        CertEntry(c.name, c.role, c.cert, c.key, c.ca_cert, c.required_hosts)
        for c in cluster_certificates(layout, record.deployed.members)
    ]
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
            hosts = tuple(h for a in addresses for h in required_hosts(a, role))
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
    moment = now or utcnow()
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
