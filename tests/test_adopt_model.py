"""`adopt`'s pure side: reading a runbook member's process, refusing what it cannot adopt, and
the findings `plan` prints, all from recorded readings (no host, no etcd)."""

from __future__ import annotations

import base64
import datetime as dt
from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from etcdforge import pki
from etcdforge.adopt_findings import ca_fingerprints, findings
from etcdforge.adopt_model import (
    AdoptError,
    HostReading,
    Listing,
    adopted_cluster,
    cmdline_settings,
    parse_listing,
    plain_http_clients,
    required_files,
    same_cluster,
    spec_data,
    unit_dependencies,
)
from etcdforge.names import KeyAlgorithm
from etcdforge.ops.adopt_probe import parse_files, parse_process
from tests.runbook import seed_unit

ADDRESSES = ["10.0.0.12", "10.0.0.13", "10.0.0.14"]
SSL = "/etc/etcd/ssl"


def _argv(index: int) -> list[str]:
    """The runbook's ExecStart on member index+1, as /proc/PID/cmdline shows it."""
    address = ADDRESSES[index]
    text = seed_unit(ADDRESSES).replace(f"https://{ADDRESSES[0]}:", f"https://{address}:")
    text = text.replace("--name=kubernetes-master1", f"--name=kubernetes-master{index + 1}")
    text = text.replace(f"kubernetes-master{index + 1}=https://{address}", "KEEP", 1)
    start = text.index("ExecStart=") + len("ExecStart=")
    body = text[start : text.index("Restart=")].replace("\\\n", " ")
    return body.replace("KEEP", f"kubernetes-master{index + 1}=https://{address}").split()


def _pem(cert: object) -> bytes:
    return pki.cert_to_pem(cert)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def pki_files() -> dict[str, bytes]:
    """A runbook-shaped PKI: one CA (5 years) and 50-year leaves, like cfssl with the seed."""
    key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    ca = pki.issue_ca("etcd", key, dt.timedelta(days=5 * 365))
    leaf_key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    now = dt.datetime.now(dt.UTC)
    leaf = (  # etcdforge never issues this; cfssl does, with the seed's 438000h profile
        x509.CertificateBuilder()
        .subject_name(pki.subject_name("etcd"))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=50 * 365))
        .sign(key, hashes.SHA256())
    )
    return {
        f"{SSL}/ca.pem": _pem(ca),
        f"{SSL}/ca-key.pem": pki.key_to_pem(key),
        f"{SSL}/server.pem": _pem(leaf),
        f"{SSL}/peer.pem": _pem(leaf),
        f"{SSL}/server-key.pem": b"k",
        f"{SSL}/peer-key.pem": b"k",
        f"{SSL}/client.pem": b"c",
        f"{SSL}/client-key.pem": b"k",
    }


def _reading(index: int, files: dict[str, bytes]) -> HostReading:
    return HostReading(
        label=ADDRESSES[index],
        pid=100 + index,
        unit="etcd.service",
        unit_path="/usr/lib/systemd/system/etcd.service",
        unknown_units=("neCNork.target",),
        argv=tuple(_argv(index)),
        exe="/usr/local/bin/etcd",
        version="3.5.1",
        files=dict(files),
        has_member_data=True,
    )


def _listing(cluster: str = "c1") -> Listing:
    return parse_listing(
        {
            "header": {"cluster_id": str(int(cluster, 16)), "member_id": "1"},
            "members": [
                {
                    "ID": str(i + 1),
                    "name": f"kubernetes-master{i + 1}",
                    "peerURLs": [f"https://{a}:2380"],
                    "clientURLs": [f"https://{a}:2379"],
                }
                for i, a in enumerate(ADDRESSES)
            ],
        }
    )


def test_the_runbook_flags_are_read_from_the_command_line() -> None:
    settings = cmdline_settings(_argv(1))
    assert settings["name"] == "kubernetes-master2"
    assert settings["listen-client-urls"] == "https://10.0.0.13:2379,http://127.0.0.1:2379"
    assert settings["data-dir"] == "/var/lib/etcd/default.etcd"
    assert "client-cert-auth" not in settings
    spaced = cmdline_settings(["etcd", "--name", "a", "--client-cert-auth", "-data-dir=/d"])
    assert spaced == {"name": "a", "client-cert-auth": "true", "data-dir": "/d"}
    reading = HostReading("h", argv=("etcd", "--name=flag"), environ={"ETCD_NAME": "env"})
    assert reading.settings["name"] == "flag"  # a flag wins over ETCD_*, as in etcd


def test_the_probe_output_is_parsed(pki_files: dict[str, bytes]) -> None:
    argv = "\0".join(_argv(0)).encode()
    environ = b"PATH=/usr/bin\0ETCD_LOG_LEVEL=info\0"
    text = (
        "pid=115\nunit=etcd.service\nexe=/usr/local/bin/etcd\nversion=3.5.1\n"
        f"cmdline={base64.b64encode(argv).decode()}\n"
        f"environ={base64.b64encode(environ).decode()}\n"
        "unit_path=/usr/lib/systemd/system/etcd.service\nunknown_unit=neCNork.target\n"
        "connections<<\n"
        'ESTAB 0 0 127.0.0.1:2379 127.0.0.1:37464 users:(("etcd",pid=115,fd=27))\n'
        'ESTAB 0 0 127.0.0.1:37464 127.0.0.1:2379 users:(("etcd",pid=115,fd=24))\n'
        'ESTAB 0 0 127.0.0.1:40100 127.0.0.1:2379 users:(("kube-apiserver",pid=900,fd=9))\n'
        'ESTAB 0 0 10.0.0.12:2379 10.0.0.1:5555 users:(("etcd",pid=115,fd=30))\n'
        ">>\n"
    )
    reading = parse_process("10.0.0.12", text)
    assert (reading.pid, reading.unit, reading.version) == (115, "etcd.service", "3.5.1")
    assert reading.settings["log-level"] == "info"
    assert reading.unknown_units == ("neCNork.target",)
    clients = plain_http_clients(reading)  # etcd's own gateway connection is not a client
    assert [(c.process, c.pid, c.local) for c in clients] == [
        ("kube-apiserver", 900, "127.0.0.1:40100")
    ]
    member, files = parse_files(
        "member_data=yes\nfile\t/a\tYQ==\nmissing\t/etc/etcd/ssl/peer.pem\n"
    )
    assert member and files == {"/a": b"a", "/etc/etcd/ssl/peer.pem": None}
    assert unit_dependencies(seed_unit(ADDRESSES)) == [
        "neCNork.target", "network-online.target"
    ]  # fmt: skip


def test_a_cluster_adopt_understands(pki_files: dict[str, bytes]) -> None:
    readings = [_reading(i, pki_files) for i in range(3)]
    adopted = adopted_cluster(readings, _listing(), ca_fingerprints)
    assert [m.name for m in adopted.members] == [f"kubernetes-master{i}" for i in (1, 2, 3)]
    assert [m.address for m in adopted.members] == ADDRESSES
    assert (adopted.token, adopted.data_dir, adopted.bin_dir) == (
        "etcd-cluster", "/var/lib/etcd/default.etcd", "/usr/local/bin",
    )  # fmt: skip
    assert adopted.ca_keys["kubernetes-master2"] == (f"{SSL}/ca-key.pem",)
    logins = {a: {"host": a, "identity_file": "/k"} for a in ADDRESSES}
    data = spec_data(adopted, "etcd-cluster", logins, {"version": "3.5.1"})
    assert data["members"][0] == {
        "name": "kubernetes-master1", "address": "10.0.0.12", "ssh": {"identity_file": "/k"},
    }  # fmt: skip
    assert data["host_paths"]["data_dir"] == "/var/lib/etcd/default.etcd"


def test_what_adopt_refuses(pki_files: dict[str, bytes]) -> None:
    readings = [_reading(i, pki_files) for i in range(3)]
    with pytest.raises(AdoptError, match=r"belong to 2 clusters .*10.0.0.14 in cluster c2"):
        same_cluster({"10.0.0.12": _listing(), "10.0.0.14": _listing("c2")})
    with pytest.raises(AdoptError, match=r"3 members but 2 hosts were given; no --host runs "):
        adopted_cluster(readings[:2], _listing(), ca_fingerprints)
    stranger = replace(readings[2], argv=(*readings[2].argv, "--name=other"))
    with pytest.raises(AdoptError, match=r"10.0.0.14: runs etcd member 'other', which is not in"):
        adopted_cluster([*readings[:2], stranger], _listing(), ca_fingerprints)
    other_ca = {**pki_files, f"{SSL}/ca.pem": pki_files[f"{SSL}/server.pem"]}
    odd = replace(readings[1], files=other_ca)
    with pytest.raises(AdoptError, match=r"disagree on the CA \(--trusted-ca-file\)"):
        adopted_cluster([readings[0], odd, readings[2]], _listing(), ca_fingerprints)
    peers_apart = [
        replace(r, argv=(*r.argv, f"--peer-trusted-ca-file={SSL}/peer.pem")) for r in readings
    ]
    with pytest.raises(AdoptError, match=r"the peers have a CA of their own"):
        adopted_cluster(peers_apart, _listing(), ca_fingerprints)
    gone = replace(readings[0], files={**pki_files, f"{SSL}/peer.pem": None})
    with pytest.raises(AdoptError, match=r"/etc/etcd/ssl/peer.pem \(--peer-cert-file of the run"):
        required_files(gone)


def test_findings_of_a_runbook_member_and_of_a_converted_one(pki_files: dict[str, bytes]) -> None:
    readings = [(f"m{i}", _reading(i, pki_files)) for i in range(3)]
    titles = [f.title.split(":")[0] for f in findings(readings)]
    assert titles == [
        "plain-http client listener",
        "client certificates accepted on the peer port",
        "the CA private key is on the members",
        "--client-cert-auth / --peer-client-cert-auth not set (CIS 2.2, 2.5 fail; etcd only "
        "asks for certificates because --trusted-ca-file is set)",
        "certificates outlive their CA",
        "a known-bad etcd release runs",
        "the unit orders itself after units that do not exist (a typo",
    ]
    converted = HostReading(
        "10.0.0.12",
        pid=1,
        argv=("etcd",),
        environ={
            "ETCD_LISTEN_CLIENT_URLS": "https://10.0.0.12:2379",
            "ETCD_TRUSTED_CA_FILE": f"{SSL}/ca.pem",
            "ETCD_PEER_TRUSTED_CA_FILE": f"{SSL}/ca.pem",
            "ETCD_CERT_FILE": f"{SSL}/server.pem",
            "ETCD_CLIENT_CERT_AUTH": "true",
            "ETCD_PEER_CLIENT_CERT_AUTH": "true",
            "ETCD_PEER_CERT_ALLOWED_CN": "etcd",
        },
        version="3.5.30",
        files={k: v for k, v in pki_files.items() if "ca-key" not in k},
    )
    left = findings([("m1", converted)], [f"{SSL}/ca-key.pem"])
    assert [f.title.split(":")[0] for f in left] == ["certificates outlive their CA"]
    assert "rotate-ca" in left[0].fix
