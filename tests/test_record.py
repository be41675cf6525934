"""The deployed-cluster record: typed once from cluster.json, with the spec owning defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from etcdforge.binaries import EtcdBinary
from etcdforge.errors import StateError
from etcdforge.layout import StateLayout
from etcdforge.ops.admin_state import build_record
from etcdforge.record import read_record, write_record
from etcdforge.spec import parse_spec


def _record(tmp_path: Path, **extra: object) -> object:
    data = {"name": "x", "members": [{"name": "a", "address": "127.0.9.1"}], **extra}
    spec = parse_spec(data, source="<test>")
    layout = StateLayout(tmp_path)
    record = build_record(spec, layout, EtcdBinary(Path("/usr/bin/etcd"), (3, 4, 23)), "x-1")
    write_record(layout, record)
    return read_record(tmp_path)


def test_the_record_reads_back_typed(tmp_path: Path) -> None:
    record = _record(tmp_path, pki={"cert_validity_days": 90}, data_dir="/srv/etcd")
    deployed = record.deployed  # type: ignore[attr-defined]
    assert deployed.pki.cert_validity_days == 90 and deployed.pki.ca_validity_days == 3650
    (member,) = deployed.members
    assert (member.client_port, member.peer_port, member.ssh) == (2379, 2380, None)
    assert member.client_url == "https://127.0.9.1:2379"
    assert not deployed.on_hosts
    assert record.layout.member("a").data_dir == Path("/srv/etcd/a")  # type: ignore[attr-defined]


def test_a_damaged_record_names_its_file(tmp_path: Path) -> None:
    _record(tmp_path)
    path = tmp_path / "cluster.json"
    payload = json.loads(path.read_text())
    del payload["spec"]["pki"]
    path.write_text(json.dumps(payload))
    with pytest.raises(StateError, match=f"{path}: malformed cluster record"):
        read_record(tmp_path)


def test_unknown_member_names_the_members(tmp_path: Path) -> None:
    record = _record(tmp_path)
    with pytest.raises(StateError, match=r"no member named 'z' in cluster x \(members: a\)"):
        record.member("z")  # type: ignore[attr-defined]
