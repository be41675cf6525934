"""The secure defaults, proved against a real cluster: each check has a positive control."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import httpx
import pytest

from etcdforge import pki
from etcdforge.spec import KeyAlgorithm
from tests.helpers import LocalCluster

pytestmark = pytest.mark.slow


def _context(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None and key is not None:
        context.load_cert_chain(str(cert), str(key))
    return context


def _get(url: str, verify: ssl.SSLContext | bool = True) -> int | str:
    """HTTP status, or the kind of failure: the test asserts on which one it got."""
    try:
        return httpx.get(url, verify=verify, timeout=5).status_code
    except httpx.HTTPError as exc:
        return exc.__class__.__name__


def _post(url: str, verify: ssl.SSLContext | bool) -> int | str:
    try:
        return httpx.post(url, json={"key": "YQ=="}, verify=verify, timeout=5).status_code
    except httpx.HTTPError as exc:
        return exc.__class__.__name__


def _member(cluster: LocalCluster, index: int = 0) -> tuple[str, Path]:
    member = cluster.data["members"][index]
    return member["address"], cluster.state_dir / "members" / member["name"]


def _admin(cluster: LocalCluster) -> ssl.SSLContext:
    pki_dir = cluster.state_dir / "pki"
    return _context(pki_dir / "ca.crt", pki_dir / "admin.crt", pki_dir / "admin.key")


def test_admin_cert_is_accepted_on_the_client_port(cluster: LocalCluster) -> None:
    address, _ = _member(cluster)
    assert _get(f"https://{address}:2379/health", _admin(cluster)) == 200
    assert _post(f"https://{address}:2379/v3/kv/range", _admin(cluster)) == 200


def test_no_client_certificate_is_rejected(cluster: LocalCluster) -> None:
    address, _ = _member(cluster)
    anonymous = _context(cluster.state_dir / "pki" / "ca.crt")
    assert _get(f"https://{address}:2379/health", anonymous) not in (200, 503)
    assert _post(f"https://{address}:2379/v3/kv/range", anonymous) != 200


def test_client_certificate_from_a_foreign_ca_is_rejected(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    address, _ = _member(cluster)
    key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    foreign_ca = pki.issue_ca("intruder-ca", key, dt.timedelta(days=1))
    client_key = pki.generate_key(KeyAlgorithm.ECDSA_P256)
    client = pki.issue_role_cert(
        pki.Role.CLIENT, foreign_ca, key, "etcdforge-admin", client_key, dt.timedelta(days=1)
    )
    (tmp_path / "c.crt").write_bytes(pki.cert_to_pem(client))
    (tmp_path / "c.key").write_bytes(pki.key_to_pem(client_key))
    forged = _context(cluster.state_dir / "pki" / "ca.crt", tmp_path / "c.crt", tmp_path / "c.key")
    assert _post(f"https://{address}:2379/v3/kv/range", forged) != 200
    assert _get(f"https://{address}:2379/health", forged) not in (200, 503)


def test_plain_http_is_rejected(cluster: LocalCluster) -> None:
    address, _ = _member(cluster)
    for port in (2379, 2380):
        assert _get(f"http://{address}:{port}/health", verify=False) != 200
        assert _post(f"http://{address}:{port}/v3/kv/range", verify=False) != 200


def test_admin_client_cert_is_rejected_on_the_peer_port(cluster: LocalCluster) -> None:
    address, member_dir = _member(cluster)
    peer_ca = cluster.state_dir / "pki" / "peer-ca.crt"
    peer = _context(peer_ca, member_dir / "pki" / "peer.crt", member_dir / "pki" / "peer.key")
    assert _get(f"https://{address}:2380/version", peer) == 200  # positive control
    pki_dir = cluster.state_dir / "pki"
    admin_on_peer = _context(peer_ca, pki_dir / "admin.crt", pki_dir / "admin.key")
    assert _get(f"https://{address}:2380/version", admin_on_peer) != 200


def test_private_keys_0600_directories_0700(cluster: LocalCluster) -> None:
    keys = list(cluster.state_dir.rglob("*.key"))
    assert len(keys) == 3 + 2 * 3  # two CAs, admin, server+peer per member
    for key in keys:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    dirs = [cluster.state_dir, cluster.state_dir / "pki"]
    for member in cluster.data["members"]:
        member_dir = cluster.state_dir / "members" / member["name"]
        dirs += [member_dir / "data", member_dir / "pki"]
    for directory in dirs:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


def test_ca_keys_stay_in_the_admin_pki_dir(cluster: LocalCluster) -> None:
    ca_key = (cluster.state_dir / "pki" / "ca.key").read_bytes()
    peer_ca_key = (cluster.state_dir / "pki" / "peer-ca.key").read_bytes()
    for path in (cluster.state_dir / "members").rglob("*"):
        if path.is_file():
            content = path.read_bytes()
            assert ca_key not in content and peer_ca_key not in content, path
            assert "ca.key" not in path.name and "ca-key" not in path.name


def test_members_run_with_mutual_tls_and_no_plain_listener(cluster: LocalCluster) -> None:
    for member in cluster.data["members"]:
        flags = (cluster.state_dir / "members" / member["name"] / "etcd.flags").read_text()
        assert "--client-cert-auth=true" in flags
        assert "--peer-client-cert-auth=true" in flags
        assert "http://" not in flags
        assert "--enable-v2=false" in flags
