"""PKI core: usages, SANs, chains and file modes (pure, fast)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from etcdforge import pki
from etcdforge.binaries import check_version, parse_version, version_problem
from etcdforge.errors import BinaryError, PKIError
from etcdforge.fsutil import atomic_write
from etcdforge.spec import KeyAlgorithm

YEAR = dt.timedelta(days=365)


@pytest.fixture(scope="module")
def ca() -> tuple[x509.Certificate, pki.PrivateKey]:
    key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    return pki.issue_ca("test-ca", key, 10 * YEAR), key


def _leaf(
    ca: tuple[x509.Certificate, pki.PrivateKey], role: pki.Role, hosts: list[str]
) -> x509.Certificate:
    key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    return pki.issue_role_cert(role, ca[0], ca[1], "m1", key, YEAR, hosts)


def _eku(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_is_a_path_length_zero_signing_ca(ca: tuple[x509.Certificate, pki.PrivateKey]) -> None:
    cert = ca[0]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    assert pki.signed_by(cert, cert)


@pytest.mark.parametrize(
    ("role", "expected"),
    [
        (pki.Role.SERVER, {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
        (pki.Role.PEER, {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
        (pki.Role.CLIENT, {ExtendedKeyUsageOID.CLIENT_AUTH}),
    ],
)
def test_role_usages(
    ca: tuple[x509.Certificate, pki.PrivateKey],
    role: pki.Role,
    expected: set[x509.ObjectIdentifier],
) -> None:
    cert = _leaf(ca, role, ["127.0.0.1"] if role is not pki.Role.CLIENT else [])
    assert _eku(cert) == expected
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_member_sans_cover_address_name_and_loopback(
    ca: tuple[x509.Certificate, pki.PrivateKey],
) -> None:
    cert = _leaf(ca, pki.Role.SERVER, pki.member_hosts("etcd-1", "10.0.0.12"))
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.0.0.12"),
        ipaddress.ip_address("127.0.0.1"),
    }
    assert set(sans.get_values_for_type(x509.DNSName)) == {"etcd-1", "localhost"}


def test_invalid_host_is_refused_as_a_san() -> None:
    with pytest.raises(PKIError, match="'bad host' is neither an IP address nor a hostname"):
        pki.san_entries(["bad host"])


def test_chain_verifies_with_openssl(
    ca: tuple[x509.Certificate, pki.PrivateKey], tmp_path: Path
) -> None:
    leaf = _leaf(ca, pki.Role.SERVER, ["127.0.0.1"])
    assert pki.signed_by(leaf, ca[0])
    (tmp_path / "ca.pem").write_bytes(pki.cert_to_pem(ca[0]))
    (tmp_path / "leaf.pem").write_bytes(pki.cert_to_pem(leaf))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-purpose",
            "sslserver",
            "-CAfile",
            str(tmp_path / "ca.pem"),
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith(": OK")


def test_signature_from_another_ca_does_not_chain(
    ca: tuple[x509.Certificate, pki.PrivateKey],
) -> None:
    other_key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    other = pki.issue_ca("test-ca", other_key, YEAR)  # same subject, other key
    leaf = _leaf((other, other_key), pki.Role.CLIENT, [])
    assert pki.signed_by(leaf, other)
    assert not pki.signed_by(leaf, ca[0])


def test_leaf_never_outlives_its_ca() -> None:
    key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    short_ca = pki.issue_ca("short", key, dt.timedelta(days=10))
    leaf = pki.issue_role_cert(
        pki.Role.CLIENT, short_ca, key, "c", pki.generate_key(KeyAlgorithm.ECDSA_P256), YEAR
    )
    assert leaf.not_valid_after_utc <= short_ca.not_valid_after_utc


def test_ca_key_mismatch_is_refused(ca: tuple[x509.Certificate, pki.PrivateKey]) -> None:
    wrong = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    with pytest.raises(PKIError, match="CA key does not match"):
        pki.issue_role_cert(pki.Role.CLIENT, ca[0], wrong, "c", wrong, YEAR)
    assert pki.key_matches(ca[0], ca[1]) and not pki.key_matches(ca[0], wrong)


def test_small_rsa_keys_are_refused(ca: tuple[x509.Certificate, pki.PrivateKey]) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(PKIError, match="RSA keys below 2048 bits are refused"):
        pki.issue_role_cert(pki.Role.CLIENT, ca[0], ca[1], "c", weak, YEAR)


@pytest.mark.parametrize("algorithm", list(KeyAlgorithm))
def test_key_algorithms(algorithm: KeyAlgorithm) -> None:
    key = pki.generate_key(algorithm)
    if algorithm is KeyAlgorithm.ECDSA_P256:
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    else:
        assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == int(
            algorithm.value.split("-")[1]
        )


def test_pem_round_trip_and_key_file_mode(
    ca: tuple[x509.Certificate, pki.PrivateKey], tmp_path: Path
) -> None:
    key_path = tmp_path / "sub" / "ca.key"
    assert atomic_write(key_path, pki.key_to_pem(ca[1]))
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not atomic_write(key_path, pki.key_to_pem(ca[1])), "unchanged content is not rewritten"
    cert_path = tmp_path / "ca.crt"
    cert_path.write_bytes(pki.cert_to_pem(ca[0]))
    assert pki.key_matches(pki.load_cert(cert_path), pki.load_key(key_path))
    assert [p.name for p in key_path.parent.iterdir()] == ["ca.key"], "no temp file left behind"


def test_unreadable_pki_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match=f"{tmp_path / 'none.crt'}: certificate file not found"):
        pki.load_cert(tmp_path / "none.crt")
    (tmp_path / "junk.key").write_text("not a key")
    with pytest.raises(PKIError, match="not an unencrypted PEM private key"):
        pki.load_key(tmp_path / "junk.key")


def test_inspect_cert_reports_what_check_needs(ca: tuple[x509.Certificate, pki.PrivateKey]) -> None:
    info = pki.inspect_cert(_leaf(ca, pki.Role.PEER, ["127.0.0.1", "m1"]))
    assert info.sans == ("127.0.0.1", "m1")
    assert info.extended_usages == ("server auth", "client auth")
    assert not info.is_ca and info.subject == "CN=m1"
    assert dt.timedelta(days=364) < info.remaining() <= YEAR + pki.CLOCK_SKEW_ALLOWANCE


@pytest.mark.parametrize(
    ("version", "bad"),
    [
        ("3.5.0", True),
        ("3.5.1", True),
        ("3.5.2", True),
        ("3.5.5", True),
        ("3.5.6", False),
        ("3.5.17", False),
        ("3.4.21", True),
        ("3.4.23", False),
        ("3.3.27", True),
    ],
)
def test_known_bad_versions(version: str, bad: bool) -> None:
    assert (version_problem(parse_version(version)) is not None) is bad


def test_known_bad_version_policy() -> None:
    v351 = parse_version("3.5.1")
    assert "acceptable for a local dev cluster" in str(
        check_version(v351, dev_cluster=True, allow_unsafe=False)
    )
    with pytest.raises(
        BinaryError, match=re.escape("set etcd.allow_unsafe_version: true to override")
    ):
        check_version(v351, dev_cluster=False, allow_unsafe=False)
    assert "allow_unsafe_version is set" in str(
        check_version(v351, dev_cluster=False, allow_unsafe=True)
    )
    assert check_version(parse_version("3.4.23"), dev_cluster=False, allow_unsafe=False) is None
