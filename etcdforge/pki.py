"""Keys and X.509 certificates for etcd's two TLS planes, with `cryptography`.

Pure functions: they take keys and certificates and return new ones; reading and writing files is
left to the callers. The roles mirror what etcd needs:

- server: presented on the client port, and used by etcd's own JSON gateway to dial its gRPC
  server, so it needs clientAuth as well as serverAuth;
- peer: presented and verified between members on the peer port (serverAuth + clientAuth);
- client: admin tools and the kube-apiserver (clientAuth only).

Peers are signed by their own CA so that no client certificate is ever accepted on the peer port.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcdforge.errors import PKIError
from etcdforge.names import KeyAlgorithm, is_hostname, is_ip

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

#: Certificates are backdated a little so a member whose clock runs slightly behind accepts them.
CLOCK_SKEW_ALLOWANCE = dt.timedelta(minutes=5)
MIN_RSA_BITS = 2048


class Role(StrEnum):
    SERVER = "server"
    PEER = "peer"
    CLIENT = "client"


ROLE_EXTENDED_USAGES: dict[Role, tuple[x509.ObjectIdentifier, ...]] = {
    Role.SERVER: (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    Role.PEER: (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
    Role.CLIENT: (ExtendedKeyUsageOID.CLIENT_AUTH,),
}

EXTENDED_USAGE_NAMES: dict[x509.ObjectIdentifier, str] = {
    ExtendedKeyUsageOID.SERVER_AUTH: "server auth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "client auth",
    ExtendedKeyUsageOID.CODE_SIGNING: "code signing",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "email protection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timestamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "ocsp signing",
}


def generate_key(algorithm: KeyAlgorithm) -> PrivateKey:
    if algorithm is KeyAlgorithm.ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    bits = int(algorithm.value.split("-")[1])
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def subject_name(common_name: str, organization: str | None = None) -> x509.Name:
    attributes = []
    if organization:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attributes)


def san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    """IP literals become IP SANs, everything else DNS SANs; duplicates are dropped."""
    entries: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        if is_ip(host):
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        elif is_hostname(host) or (host.startswith("*.") and is_hostname(host[2:])):
            entries.append(x509.DNSName(host))
        else:
            raise PKIError(f"{host!r} is neither an IP address nor a hostname; it cannot be a SAN")
    return entries


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    validity: dt.timedelta,
    now: dt.datetime | None,
) -> x509.CertificateBuilder:
    start = (now or _utcnow()) - CLOCK_SKEW_ALLOWANCE
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + CLOCK_SKEW_ALLOWANCE + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _sign(builder: x509.CertificateBuilder, key: PrivateKey) -> x509.Certificate:
    return builder.sign(key, hashes.SHA256())


def issue_ca(
    common_name: str, key: PrivateKey, validity: dt.timedelta, now: dt.datetime | None = None
) -> x509.Certificate:
    """A self-signed CA that may sign leaves only (path length 0)."""
    return self_signed_ca(subject_name(common_name), key, validity, path_length=0, now=now)


def self_signed_ca(
    subject: x509.Name,
    key: PrivateKey,
    validity: dt.timedelta,
    path_length: int | None = 0,
    now: dt.datetime | None = None,
    digital_signature: bool = True,
) -> x509.Certificate:
    """A self-signed CA with any subject (cfssl CSRs carry C/ST/L/O/OU as well as CN).

    cfssl's CAs carry only cert sign and CRL sign; `digital_signature=False` matches them.
    """
    builder = (
        _builder(subject, subject, key.public_key(), validity, now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=digital_signature,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return _sign(builder, key)


def leaf_key_usage(public_key: PublicKey) -> x509.KeyUsage:
    """What etcdforge's own leaves carry; keyEncipherment only makes sense for RSA keys."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(public_key, rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def build_csr(subject: x509.Name, key: PrivateKey, hosts: Sequence[str] = ()) -> bytes:
    """A PEM certificate request, as cfssl writes next to each certificate (`NAME.csr`)."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(san_entries(hosts)), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    subject: x509.Name,
    public_key: PublicKey,
    extended_usages: Sequence[x509.ObjectIdentifier],
    validity: dt.timedelta,
    hosts: Sequence[str] = (),
    now: dt.datetime | None = None,
    key_usage: x509.KeyUsage | None = None,
) -> x509.Certificate:
    """Sign an end-entity certificate; never outlives its CA.

    `key_usage` defaults to `leaf_key_usage`; cfssl profiles choose their own. An empty
    `extended_usages` leaves the extension out, as cfssl does for a profile without any.
    """
    if isinstance(public_key, rsa.RSAPublicKey) and public_key.key_size < MIN_RSA_BITS:
        raise PKIError(f"RSA keys below {MIN_RSA_BITS} bits are refused ({public_key.key_size})")
    if not key_matches(ca_cert, ca_key):
        raise PKIError("the CA key does not match the CA certificate")
    ca_end = ca_cert.not_valid_after_utc
    start = (now or _utcnow()) - CLOCK_SKEW_ALLOWANCE
    validity = min(validity, ca_end - start - CLOCK_SKEW_ALLOWANCE)
    builder = (
        _builder(subject, ca_cert.subject, public_key, validity, now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage or leaf_key_usage(public_key), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    if extended_usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(extended_usages)), False)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(san_entries(hosts)), False)
    return _sign(builder, ca_key)


def issue_role_cert(
    role: Role,
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    common_name: str,
    key: PrivateKey,
    validity: dt.timedelta,
    hosts: Sequence[str] = (),
    organization: str | None = None,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    return issue_leaf(
        ca_cert,
        ca_key,
        subject_name(common_name, organization),
        key.public_key(),
        ROLE_EXTENDED_USAGES[role],
        validity,
        hosts,
        now,
    )


def member_hosts(name: str, address: str) -> list[str]:
    """SANs for a member's server and peer certs.

    127.0.0.1 is always present: on a loopback cluster outgoing peer connections come from
    127.0.0.1, and etcd checks the peer certificate against the connecting address.
    """
    return list(dict.fromkeys([address, name, "localhost", "127.0.0.1"]))


def key_matches(cert: x509.Certificate, key: PrivateKey) -> bool:
    return public_key_bytes(cert.public_key()) == public_key_bytes(key.public_key())  # type: ignore[arg-type]


def public_key_bytes(key: PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def signed_by(cert: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True when `ca_cert`'s key made the signature on `cert`."""
    if cert.issuer != ca_cert.subject:
        return False
    public_key = ca_cert.public_key()
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            assert cert.signature_hash_algorithm is not None
            public_key.verify(
                cert.signature,
                cert.tbs_certificate_bytes,
                padding.PKCS1v15(),
                cert.signature_hash_algorithm,
            )
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            assert cert.signature_hash_algorithm is not None
            public_key.verify(
                cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
            )
        else:
            return False
    except InvalidSignature:
        return False
    return True


# --- serialisation ------------------------------------------------------------------------


def key_to_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _read_pem(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: {what} file not found") from None


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read_pem(path, "certificate"))
    except ValueError:
        raise PKIError(f"{path}: not a PEM certificate") from None


def load_certs(path: Path) -> list[x509.Certificate]:
    """A trust bundle may hold several CAs (during CA rotation)."""
    try:
        return x509.load_pem_x509_certificates(_read_pem(path, "certificate"))
    except ValueError:
        raise PKIError(f"{path}: not a PEM certificate bundle") from None


def load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PKIError(f"{path}: private key file not found") from None
    except (ValueError, TypeError):
        raise PKIError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise PKIError(f"{path}: only RSA and ECDSA keys are supported")
    return key


# --- inspection ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CertInfo:
    subject: str
    issuer: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    sans: tuple[str, ...]
    extended_usages: tuple[str, ...]
    is_ca: bool

    def remaining(self, now: dt.datetime | None = None) -> dt.timedelta:
        return self.not_after - (now or _utcnow())


def inspect_cert(cert: x509.Certificate) -> CertInfo:
    try:
        sans_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(
            [str(ip) for ip in sans_ext.get_values_for_type(x509.IPAddress)]
            + sans_ext.get_values_for_type(x509.DNSName)
        )
    except x509.ExtensionNotFound:
        sans = ()
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        usages = tuple(EXTENDED_USAGE_NAMES.get(oid, oid.dotted_string) for oid in eku)
    except x509.ExtensionNotFound:
        usages = ()
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    return CertInfo(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        sans=sans,
        extended_usages=usages,
        is_ca=is_ca,
    )
