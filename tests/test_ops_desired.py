"""What one host should hold, rendered without a host: env file, unit, and which files are keys."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from etcdforge.layout import StateLayout
from etcdforge.ops.desired import desired, host_member_files
from etcdforge.services import systemd
from etcdforge.spec import parse_spec


def _spec() -> object:
    ssh = {"user": "deploy"}
    members = [{"name": f"etcd-{i}", "address": f"10.0.0.1{i}", "ssh": ssh} for i in (1, 2, 3)]
    return parse_spec({"name": "prod", "members": members}, source="<test>")


def test_desired_files_for_one_host(tmp_path: Path) -> None:
    spec = _spec()
    layout = StateLayout(tmp_path)
    member = spec.members[1]  # type: ignore[attr-defined]
    want = desired(spec, layout, member, "prod-abc")  # type: ignore[arg-type]
    env = systemd.env_pairs(want.env_text)
    assert env["ETCD_NAME"] == "etcd-2"
    assert env["ETCD_LISTEN_CLIENT_URLS"] == "https://10.0.0.12:2379"
    assert env["ETCD_INITIAL_CLUSTER_TOKEN"] == "prod-abc"
    assert env["ETCD_CLIENT_CERT_AUTH"] == env["ETCD_PEER_CLIENT_CERT_AUTH"] == "true"
    assert env["ETCD_DATA_DIR"] == "/var/lib/etcd"
    assert "ExecStart=/usr/local/bin/etcd" in want.unit_text
    secrets = {str(host) for host, _, secret in want.pki if secret}
    assert secrets == {"/etc/etcd/pki/server.key", "/etc/etcd/pki/peer.key"}
    sources = {str(host): src for host, src, _ in want.pki}
    assert sources["/etc/etcd/pki/server.crt"] == layout.member("etcd-2").server_cert
    assert sources["/etc/etcd/pki/peer-ca.crt"] == layout.member("etcd-2").peer_trusted_ca
    assert all(not str(src).endswith(("ca.key", "peer-ca.key")) for src in sources.values())


def test_the_unit_fingerprint_follows_the_ca_certificates(tmp_path: Path) -> None:
    spec = _spec()
    layout = StateLayout(tmp_path)
    member = spec.members[0]  # type: ignore[attr-defined]
    before = desired(spec, layout, member, "t").unit_text  # type: ignore[arg-type]
    files = layout.member("etcd-1")
    files.pki_dir.mkdir(parents=True)
    files.trusted_ca.write_bytes(b"a new CA")
    after = desired(spec, layout, member, "t").unit_text  # type: ignore[arg-type]
    assert systemd.unit_fingerprint(before) != systemd.unit_fingerprint(after)


def test_host_and_local_members_use_one_file_layout(tmp_path: Path) -> None:
    on_host = host_member_files(_spec().host_paths)  # type: ignore[attr-defined]
    local = StateLayout(tmp_path).member("etcd-1")
    for field in ("server_cert", "server_key", "peer_cert", "peer_key", "trusted_ca"):
        assert PurePosixPath(getattr(on_host, field)).name == getattr(local, field).name
    assert str(on_host.data_dir) == "/var/lib/etcd"
