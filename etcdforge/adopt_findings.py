"""What is wrong with a hand-built cluster, each finding with its fix: pure functions of readings.

`plan` prints them for an adopted cluster, read live from every member each time, so a finding
disappears once `apply` (or `certs rotate-ca`, or a newer release) has fixed it. The checks are
the seed runbook's defects: a plain-http client listener, client certificates accepted on the
peer port, the CA key on every member, client-cert-auth/peer-client-cert-auth left implicit (CIS
2.2/2.5), leaves that outlive their CA, a known-bad etcd release, and a unit that names no unit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from etcdforge.adopt_model import HostReading, key_beside, plain_http_urls
from etcdforge.binaries import parse_version, version_problem
from etcdforge.errors import BinaryError

Reading = tuple[str, HostReading]  # member name, what its host shows


@dataclass(frozen=True)
class Finding:
    title: str
    where: tuple[str, ...]  # members (and files) it was found on
    fix: str


def ca_fingerprints(data: bytes) -> str:
    """A CA bundle named by its certificates, so two copies of one CA compare equal."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return "unreadable"
    return ",".join(sorted(c.fingerprint(hashes.SHA256()).hex()[:16] for c in certs))


def _cert(reading: HostReading, flag: str) -> x509.Certificate | None:
    path = reading.settings.get(flag)
    data = reading.files.get(path) if path else None
    if data is None:
        return None
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError:
        return None


def _members(readings: Sequence[Reading], test: Callable[[HostReading], bool]) -> tuple[str, ...]:
    return tuple(name for name, reading in readings if test(reading))


def plain_http(readings: Sequence[Reading]) -> Finding | None:
    where = tuple(
        f"{name} ({', '.join(plain_http_urls(r.settings))})"
        for name, r in readings
        if plain_http_urls(r.settings)
    )
    if not where:
        return None
    return Finding(
        "plain-http client listener: any process on the member reads and writes every key "
        "with no authentication",
        where,
        "apply: https only (listen-client-urls on the member's address)",
    )


def peer_port_open(readings: Sequence[Reading]) -> Finding | None:
    def open_to_clients(reading: HostReading) -> bool:
        settings = reading.settings
        pinned = settings.get("peer-cert-allowed-cn") or settings.get("peer-cert-allowed-hostname")
        files = reading.files
        client_ca = files.get(settings.get("trusted-ca-file", ""))
        peer_ca = files.get(settings.get("peer-trusted-ca-file", ""))
        shared = client_ca is not None and peer_ca is not None
        return not pinned and shared and ca_fingerprints(client_ca) == ca_fingerprints(peer_ca)  # type: ignore[arg-type]

    where = _members(readings, open_to_clients)
    if not where:
        return None
    return Finding(
        "client certificates accepted on the peer port: one CA signs both planes and nothing "
        "pins the peer port (the kube-apiserver's client.pem can talk raft)",
        where,
        "apply: --peer-cert-allowed-cn pinned to the peer certificate's CN; then "
        "`etcdforge certs rotate-ca` gives the peers a CA of their own",
    )


def ca_key_on_members(readings: Sequence[Reading], recorded: Sequence[str] = ()) -> Finding | None:
    where = []
    for name, reading in readings:
        settings = reading.settings
        beside = [key_beside(settings[f]) for f in ("trusted-ca-file", "peer-trusted-ca-file")]
        paths = dict.fromkeys([*recorded, *(p for p in beside if p)])
        where += [f"{name}:{p}" for p in paths if reading.files.get(p) is not None]
    if not where:
        return None
    return Finding(
        "the CA private key is on the members: whoever reads it can sign a certificate for "
        "any member or client",
        tuple(where),
        "apply: copied to the admin state (0600), deleted from every member once all are "
        "converted and healthy",
    )


def implicit_auth(readings: Sequence[Reading]) -> Finding | None:
    def implicit(reading: HostReading) -> bool:
        settings = reading.settings
        return any(settings.get(f) != "true" for f in ("client-cert-auth", "peer-client-cert-auth"))

    where = _members(readings, implicit)
    if not where:
        return None
    return Finding(
        "--client-cert-auth / --peer-client-cert-auth not set (CIS 2.2, 2.5 fail; etcd only "
        "asks for certificates because --trusted-ca-file is set)",
        where,
        "apply: both set to true explicitly",
    )


def leaves_outlive_ca(readings: Sequence[Reading]) -> Finding | None:
    where = []
    for name, reading in readings:
        ca = _cert(reading, "trusted-ca-file")
        if ca is None:
            continue
        for flag in ("cert-file", "peer-cert-file"):
            leaf = _cert(reading, flag)
            if leaf is not None and leaf.not_valid_after_utc > ca.not_valid_after_utc:
                where.append(
                    f"{name}: --{flag} until {leaf.not_valid_after_utc:%Y-%m-%d}, CA until "
                    f"{ca.not_valid_after_utc:%Y-%m-%d}"
                )
    if not where:
        return None
    return Finding(
        "certificates outlive their CA: the cluster stops working the day the CA expires",
        tuple(where),
        "`etcdforge certs rotate-ca` (new CAs, leaves within them, renewable with `certs renew`)",
    )


def known_bad_version(readings: Sequence[Reading]) -> Finding | None:
    where = []
    for name, reading in readings:
        try:
            problem = version_problem(parse_version(reading.version))
        except BinaryError:
            problem = f"etcd version {reading.version or 'unknown'}"
        if problem:
            where.append(f"{name}: {problem}")
    if not where:
        return None
    return Finding(
        "a known-bad etcd release runs",
        tuple(where),
        "set etcd.version to a fixed release (3.5.30) in the cluster YAML and run "
        "`etcdforge apply` (a rolling restart, one member at a time)",
    )


def unit_typo(readings: Sequence[Reading]) -> Finding | None:
    where = tuple(
        f"{name}: {r.unit_path} names {', '.join(r.unknown_units)}"
        for name, r in readings
        if r.unknown_units
    )
    if not where:
        return None
    return Finding(
        "the unit orders itself after units that do not exist (a typo: it never waits for the "
        "network it meant)",
        where,
        "apply: etcdforge's own unit (After=/Wants=network-online.target) replaces it; the "
        "old unit is disabled and masked",
    )


def findings(readings: Sequence[Reading], recorded_keys: Sequence[str] = ()) -> list[Finding]:
    """Every finding on these members, in the order the runbook's defects are usually listed."""
    found = [
        plain_http(readings),
        peer_port_open(readings),
        ca_key_on_members(readings, recorded_keys),
        implicit_auth(readings),
        leaves_outlive_ca(readings),
        known_bad_version(readings),
        unit_typo(readings),
    ]
    return [f for f in found if f is not None]
