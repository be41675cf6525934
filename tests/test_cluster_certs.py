"""One enumeration of a cluster's certificates serves issuing, checking and renewing."""

from __future__ import annotations

from pathlib import Path

from etcdforge import pki
from etcdforge.binaries import EtcdBinary
from etcdforge.cluster_certs import cluster_certificates, required_hosts
from etcdforge.layout import StateLayout
from etcdforge.ops.admin_state import build_record
from etcdforge.ops.cert_check import state_entries
from etcdforge.ops.renew import cluster_leaves
from etcdforge.spec import parse_spec


def _spec() -> object:
    members = [
        {"name": "a", "address": "127.0.9.1"},
        {"name": "b", "address": "127.0.9.2", "client_port": 3379, "peer_port": 3380},
        {"name": "c", "address": "127.0.9.3"},
    ]
    return parse_spec({"name": "x", "members": members}, source="<test>")


def test_the_set_is_admin_then_server_and_peer_per_member(tmp_path: Path) -> None:
    spec = _spec()
    layout = StateLayout(tmp_path)
    certs = cluster_certificates(layout, spec.members)  # type: ignore[attr-defined]
    assert [c.name for c in certs] == [
        "admin", "a/server", "a/peer", "b/server", "b/peer", "c/server", "c/peer",
    ]  # fmt: skip
    admin, b_server, b_peer = certs[0], certs[3], certs[4]
    assert admin.role is pki.Role.CLIENT and admin.member is None
    assert admin.ca_key == layout.ca_key
    assert (b_server.role, b_server.ca_cert, b_server.port) == (
        pki.Role.SERVER,
        layout.ca_cert,
        3379,
    )
    assert (b_peer.role, b_peer.ca_cert, b_peer.port) == (pki.Role.PEER, layout.peer_ca_cert, 3380)
    assert b_server.cert == layout.member("b").server_cert
    assert set(b_server.required_hosts) <= set(b_server.issue_hosts)
    assert b_peer.required_hosts == ("127.0.9.2", "127.0.0.1")  # loopback peers dial from .1
    assert b_server.title == "issue server certificate for b"


def test_issue_check_and_renew_walk_the_same_set(tmp_path: Path) -> None:
    spec = _spec()
    layout = StateLayout(tmp_path)
    record = build_record(spec, layout, EtcdBinary(Path("/usr/bin/etcd"), (3, 5, 30)), "tok")  # type: ignore[arg-type]
    names = [c.name for c in cluster_certificates(layout, record.deployed.members)]
    assert [leaf.name for leaf in cluster_leaves(record)] == names
    checked = [e.name for e in state_entries(record) if e.role != "ca"]
    assert checked == names


def test_required_hosts() -> None:
    assert required_hosts("10.0.0.1", pki.Role.PEER) == ("10.0.0.1",)
    assert required_hosts("127.0.0.1", pki.Role.PEER) == ("127.0.0.1",)
    assert required_hosts("127.1.1.1", pki.Role.SERVER) == ("127.1.1.1",)
