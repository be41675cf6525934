"""cfssl's JSON formats (ca-config.json, CSR JSON) and cfssljson's `-bare` files, over `pki`.

Platform engineers arrive with cfssl files; these functions accept them unchanged and issue the
same certificates cfssl would (usages, SANs, subject, expiry), so the seed's commands keep
working with `etcdforge certs gencert`. Pure: callers pass the text of the files they read and
write the PEM bytes returned. Every error names the file and the JSON line:column of the value
at fault, because a wrong usage or host buried in a JSON file otherwise surfaces months later as
a TLS failure.

Deliberate differences from cfssl: unknown usages, keys and hosts are errors (cfssl ignores
them), a leaf never outlives its CA, and a CA defaults to 10 years (cfssl: 5).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from etcdforge import pki
from etcdforge.errors import PKIError
from etcdforge.jsondoc import (
    JSONDoc,
    JSONPath,
    check_keys,
    expect,
    get,
    parse_json,
    positive_duration,
)

#: cfssl's key usage strings (config.go KeyUsage), including its "content committment" typo.
KEY_USAGES: dict[str, str] = {
    "signing": "digital_signature",
    "digital signature": "digital_signature",
    "content committment": "content_commitment",
    "content commitment": "content_commitment",
    "key encipherment": "key_encipherment",
    "key agreement": "key_agreement",
    "data encipherment": "data_encipherment",
    "cert sign": "key_cert_sign",
    "crl sign": "crl_sign",
    "encipher only": "encipher_only",
    "decipher only": "decipher_only",
}

#: cfssl's extended key usage strings (config.go ExtKeyUsage).
EXT_KEY_USAGES: dict[str, x509.ObjectIdentifier] = {
    "any": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "s/mime": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "ipsec end system": x509.ObjectIdentifier("1.3.6.1.5.5.7.3.5"),
    "ipsec tunnel": x509.ObjectIdentifier("1.3.6.1.5.5.7.3.6"),
    "ipsec user": x509.ObjectIdentifier("1.3.6.1.5.5.7.3.7"),
    "timestamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp signing": ExtendedKeyUsageOID.OCSP_SIGNING,
    "microsoft sgc": x509.ObjectIdentifier("1.3.6.1.4.1.311.10.3.3"),
    "netscape sgc": x509.ObjectIdentifier("2.16.840.1.113730.4.1"),
}

#: cfssl's defaults: a profile-less config signs for TLS both ways for a year (config.go).
DEFAULT_USAGES = ("signing", "key encipherment", "server auth", "client auth")
DEFAULT_EXPIRY = dt.timedelta(hours=8760)
#: etcdforge's CA default (cfssl's initca uses 43800h); a CSR's `ca.expiry` overrides it.
DEFAULT_CA_EXPIRY = dt.timedelta(days=3650)

#: Known keys; others are refused so a typo ("usage") cannot silently drop a usage.
PROFILE_KEYS = frozenset(
    {
        "usages",
        "expiry",
        "backdate",
        "issuer_urls",
        "ocsp_url",
        "crl_url",
        "ca_constraint",
        "ocsp_no_check",
        "auth_key",
        "remote",
        "not_before",
        "not_after",
        "name_whitelist",
        "auth_remote",
        "ct_log_servers",
        "allowed_extensions",
        "cert_store",
    }
)
CONFIG_KEYS = frozenset({"signing", "auth_keys", "remotes", "ocsp"})
SIGNING_KEYS = frozenset({"default", "profiles"})
CSR_KEYS = frozenset(
    {"CN", "hosts", "key", "names", "ca", "serialnumber", "delegation_enabled", "crl_url"}
)
NAME_ATTRIBUTES: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "E": NameOID.EMAIL_ADDRESS,
    "SerialNumber": NameOID.SERIAL_NUMBER,
}
EC_CURVES: dict[int, ec.EllipticCurve] = {
    256: ec.SECP256R1(),
    384: ec.SECP384R1(),
    521: ec.SECP521R1(),
}
MAX_RSA_BITS = 8192


# --- ca-config.json ------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    usages: tuple[str, ...]
    key_usage: x509.KeyUsage | None
    extended_usages: tuple[x509.ObjectIdentifier, ...]
    expiry: dt.timedelta


@dataclass(frozen=True)
class SigningConfig:
    source: str
    default: Profile
    profiles: Mapping[str, Profile]
    profiles_where: str

    def profile(self, name: str | None) -> Profile:
        if name is None or name == "default":
            profile = self.default
        elif name in self.profiles:
            profile = self.profiles[name]
        else:
            known = ", ".join(sorted(self.profiles)) or "none"
            raise PKIError(
                f"{self.profiles_where}: no profile {name!r} in signing.profiles "
                f"(profiles: {known}); pass one of them with -profile"
            )
        if profile.key_usage is None and not profile.extended_usages:
            raise PKIError(
                f'{self.source}: profile {profile.name!r} has no usages; add "usages": '
                '["signing", "key encipherment", "server auth", "client auth"]'
            )
        return profile


def key_usage_from(names: Sequence[str]) -> x509.KeyUsage | None:
    flags = {field: False for field in set(KEY_USAGES.values())}
    for name in names:
        if name in KEY_USAGES:
            flags[KEY_USAGES[name]] = True
    if not any(flags.values()):
        return None
    if (flags["encipher_only"] or flags["decipher_only"]) and not flags["key_agreement"]:
        flags["encipher_only"] = flags["decipher_only"] = False
    return x509.KeyUsage(**flags)


def _profile(doc: JSONDoc, path: JSONPath, name: str, fallback: dt.timedelta) -> Profile:
    expect(doc, path, dict, "an object with usages and expiry")
    check_keys(doc, path, PROFILE_KEYS, "profile")
    profile = get(doc, path)
    usages: list[str] = []
    if "usages" in profile:
        expect(doc, (*path, "usages"), list, "a list of usage strings")
        for index, usage in enumerate(profile["usages"]):
            item = (*path, "usages", index)
            expect(doc, item, str, "a usage string")
            if usage not in KEY_USAGES and usage not in EXT_KEY_USAGES:
                raise doc.error(
                    item,
                    f"unknown usage {usage!r}; use one of: "
                    + ", ".join(sorted({*KEY_USAGES, *EXT_KEY_USAGES})),
                )
            usages.append(usage)
    ca_constraint = profile.get("ca_constraint")
    if isinstance(ca_constraint, dict) and ca_constraint.get("is_ca"):
        raise doc.error(
            (*path, "ca_constraint"),
            "signing intermediate CAs is not supported; etcd needs only a root CA and leaves",
        )
    expiry = positive_duration(doc, (*path, "expiry")) if "expiry" in profile else fallback
    return Profile(
        name=name,
        usages=tuple(usages),
        key_usage=key_usage_from(usages),
        extended_usages=tuple(
            dict.fromkeys(EXT_KEY_USAGES[u] for u in usages if u in EXT_KEY_USAGES)
        ),
        expiry=expiry,
    )


def parse_config(text: str, source: str) -> SigningConfig:
    """A cfssl ca-config.json: `signing.default` and `signing.profiles` with usages and expiry."""
    doc = parse_json(text, source)
    expect(doc, (), dict, 'an object with a "signing" section')
    check_keys(doc, (), CONFIG_KEYS, "config")
    if "signing" not in doc.data:
        raise doc.error((), 'no "signing" section; add {"signing": {"default": {...}}}')
    expect(doc, ("signing",), dict, "an object with default and profiles")
    check_keys(doc, ("signing",), SIGNING_KEYS, "signing")
    signing = doc.data["signing"]
    if "default" in signing:
        # As in cfssl, a default without usages only lends its expiry to the profiles.
        default = _profile(doc, ("signing", "default"), "default", DEFAULT_EXPIRY)
    else:
        default = Profile(
            "default",
            DEFAULT_USAGES,
            key_usage_from(DEFAULT_USAGES),
            (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
            DEFAULT_EXPIRY,
        )
    profiles: dict[str, Profile] = {}
    profiles_path: JSONPath = ("signing", "profiles") if "profiles" in signing else ("signing",)
    if "profiles" in signing:
        expect(doc, profiles_path, dict, "an object of named profiles")
        for name in signing["profiles"]:
            profile = _profile(doc, (*profiles_path, name), name, default.expiry)
            if not profile.usages:
                raise doc.error(
                    (*profiles_path, name),
                    'profile has no usages; add "usages", e.g. ["signing", "key encipherment", '
                    '"server auth", "client auth"]',
                )
            profiles[name] = profile
    return SigningConfig(source, default, profiles, doc.where(profiles_path))


# --- CSR JSON ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CSRRequest:
    source: str
    common_name: str
    hosts: tuple[str, ...]
    key_algo: str
    key_size: int
    subject: x509.Name
    ca_expiry: dt.timedelta | None
    ca_path_length: int | None


def _subject(doc: JSONDoc, common_name: str) -> x509.Name:
    """As Go's pkix.Name: C, ST, L, O, OU (and E, SerialNumber) from every entry, then CN."""
    attributes: dict[str, list[str]] = {key: [] for key in NAME_ATTRIBUTES}
    if "names" in doc.data:
        expect(doc, ("names",), list, "a list of name objects")
        for index, entry in enumerate(doc.data["names"]):
            expect(doc, ("names", index), dict, 'an object such as {"O": "k8s"}')
            check_keys(doc, ("names", index), frozenset(NAME_ATTRIBUTES), "names")
            for key, value in entry.items():
                expect(doc, ("names", index, key), str, "a string")
                if value:
                    attributes[key].append(value)
    order = ("C", "ST", "L", "O", "OU", "E", "SerialNumber")
    names = [x509.NameAttribute(NAME_ATTRIBUTES[k], v) for k in order for v in attributes[k]]
    try:
        return x509.Name([*names, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    except ValueError as exc:
        raise doc.error(("names",), f"invalid subject attribute ({exc})") from None


def _key_request(doc: JSONDoc) -> tuple[str, int]:
    if "key" not in doc.data:
        return "ecdsa", 256
    expect(doc, ("key",), dict, 'an object such as {"algo": "ecdsa", "size": 256}')
    check_keys(doc, ("key",), frozenset({"algo", "size"}), "key")
    algo = doc.data["key"].get("algo", "ecdsa")
    if "algo" in doc.data["key"]:
        expect(doc, ("key", "algo"), str, '"rsa" or "ecdsa"')
    if algo not in ("rsa", "ecdsa"):
        raise doc.error(
            ("key", "algo"), f'unsupported key algorithm {algo!r}; use "rsa" or "ecdsa"'
        )
    size = doc.data["key"].get("size", 2048 if algo == "rsa" else 256)
    if "size" in doc.data["key"]:
        expect(doc, ("key", "size"), int, "a key size in bits")
    if algo == "rsa" and size < pki.MIN_RSA_BITS:
        raise doc.error(
            ("key", "size"),
            f"RSA key of {size} bits is too weak; use 2048 or more (or ecdsa 256)",
        )
    if algo == "rsa" and size > MAX_RSA_BITS:
        raise doc.error(("key", "size"), f"RSA key of {size} bits is too large; use 2048-8192")
    if algo == "ecdsa" and size not in EC_CURVES:
        raise doc.error(("key", "size"), f"ECDSA size {size} is invalid; use 256, 384 or 521")
    return algo, size


def _hosts(doc: JSONDoc) -> tuple[str, ...]:
    if "hosts" not in doc.data or doc.data["hosts"] is None:
        return ()
    expect(doc, ("hosts",), list, "a list of IP addresses and DNS names")
    hosts = []
    for index, host in enumerate(doc.data["hosts"]):
        expect(doc, ("hosts", index), str, "an IP address or DNS name")
        try:
            pki.san_entries([host])
        except PKIError:
            raise doc.error(
                ("hosts", index),
                f"{host!r} is neither an IP address nor a DNS name; fix or remove it",
            ) from None
        hosts.append(host)
    return tuple(hosts)


def parse_csr(text: str, source: str) -> CSRRequest:
    """A cfssl CSR JSON: CN, hosts, key {algo, size}, names [C, ST, L, O, OU], ca {expiry}."""
    doc = parse_json(text, source)
    expect(doc, (), dict, "a CSR object with CN, hosts, key and names")
    check_keys(doc, (), CSR_KEYS, "CSR")
    common_name = doc.data.get("CN")
    if not common_name:
        raise doc.error(() if "CN" not in doc.data else ("CN",), 'the CSR has no CN; add "CN"')
    expect(doc, ("CN",), str, "a common name string")
    algo, size = _key_request(doc)
    ca_expiry: dt.timedelta | None = None
    path_length: int | None = None
    if "ca" in doc.data and doc.data["ca"] is not None:
        expect(doc, ("ca",), dict, 'an object such as {"expiry": "87600h"}')
        check_keys(doc, ("ca",), frozenset({"expiry", "pathlen", "pathlenzero", "backdate"}), "ca")
        ca = doc.data["ca"]
        if "expiry" in ca:
            ca_expiry = positive_duration(doc, ("ca", "expiry"))
        if "pathlen" in ca:
            path_length = expect(doc, ("ca", "pathlen"), int, "a path length") or None
        if path_length is None and ca.get("pathlenzero"):
            path_length = 0
    return CSRRequest(
        source=source,
        common_name=common_name,
        hosts=_hosts(doc),
        key_algo=algo,
        key_size=size,
        subject=_subject(doc, common_name),
        ca_expiry=ca_expiry,
        ca_path_length=path_length,
    )


# --- issuing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: pki.PrivateKey
    csr_pem: bytes

    @property
    def cert_pem(self) -> bytes:
        return pki.cert_to_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_to_pem(self.key)


def generate_key(algo: str, size: int) -> pki.PrivateKey:
    if algo == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=size)
    return ec.generate_private_key(EC_CURVES[size])


def key_to_pem(key: pki.PrivateKey) -> bytes:
    """PKCS#1 for RSA, SEC1 for ECDSA: the formats cfssljson writes."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def init_ca(request: CSRRequest, now: dt.datetime | None = None) -> Issued:
    """`cfssl gencert -initca`: a self-signed CA (cert sign + CRL sign), no SANs."""
    key = generate_key(request.key_algo, request.key_size)
    cert = pki.self_signed_ca(
        request.subject,
        key,
        request.ca_expiry or DEFAULT_CA_EXPIRY,
        path_length=request.ca_path_length,
        now=now,
        digital_signature=False,
    )
    return Issued(cert, key, pki.build_csr(request.subject, key))


def sign(
    request: CSRRequest,
    profile: Profile,
    ca_cert: x509.Certificate,
    ca_key: pki.PrivateKey,
    hosts: Sequence[str] | None = None,
    now: dt.datetime | None = None,
) -> Issued:
    """`cfssl gencert -ca -ca-key -config -profile`: a new key and a leaf signed by the CA."""
    chosen = tuple(hosts) if hosts is not None else request.hosts
    key = generate_key(request.key_algo, request.key_size)
    cert = pki.issue_leaf(
        ca_cert,
        ca_key,
        request.subject,
        key.public_key(),
        profile.extended_usages,
        profile.expiry,
        chosen,
        now,
        key_usage=profile.key_usage,
    )
    return Issued(cert, key, pki.build_csr(request.subject, key, chosen))


@dataclass(frozen=True)
class BareFiles:
    """cfssljson -bare NAME: NAME.pem, NAME-key.pem, NAME.csr."""

    cert: Path
    key: Path
    csr: Path

    @classmethod
    def of(cls, directory: Path, name: str) -> BareFiles:
        return cls(
            directory / f"{name}.pem", directory / f"{name}-key.pem", directory / f"{name}.csr"
        )
