"""Spec validation: each mistake is one exact line naming file, YAML line and field; nothing is
written or started."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from etcdforge.errors import SpecError
from etcdforge.spec import ClusterSpec, default_spec, is_hostname, load_spec
from tests.helpers import etcd_pids_under, run_cli


def _m(name: str, address: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": address, **extra}


THREE = [_m("a", "127.0.9.1"), _m("b", "127.0.9.2"), _m("c", "127.0.9.3")]

BAD_SPECS: list[tuple[str, Any, str]] = [
    (
        "unknown-top-level-key",
        {"name": "x", "members": THREE, "colour": "red"},
        "{f}:9: colour: unknown key 'colour'; check its spelling (see the README for the fields)",
    ),
    (
        "unknown-member-key",
        {"name": "x", "members": [_m("a", "127.0.9.1", colour="red")]},
        "{f}:5: members[0].colour: unknown key 'colour'; check its spelling "
        "(see the README for the fields)",
    ),
    (
        "even-member-count",
        {"name": "x", "members": THREE[:2]},
        "{f}:2: members: 2 is an even count: it tolerates no more failures than 1; "
        "use an odd count or pass --allow-even",
    ),
    (
        "duplicate-name",
        {"name": "x", "members": [_m("a", "127.0.9.1"), _m("a", "127.0.9.2"), THREE[2]]},
        "{f}:5: members[1].name: 'a' is already used by members[0]; member names must be unique",
    ),
    (
        "duplicate-address",
        {"name": "x", "members": [_m("a", "127.0.9.1"), _m("b", "127.0.9.1"), THREE[2]]},
        "{f}:6: members[1].address: 127.0.9.1:2379 is already used by member a; "
        "give each member its own address or ports",
    ),
    (
        "port-clash-across-members",
        {
            "name": "x",
            "members": [
                _m("a", "127.0.9.1"),
                _m("b", "127.0.9.1", client_port=2380, peer_port=2381),
                THREE[2],
            ],
        },
        "{f}:6: members[1].address: 127.0.9.1:2380 is already used by member a; "
        "give each member its own address or ports",
    ),
    (
        "invalid-ip",
        {"name": "x", "members": [_m("a", "127.0.0.300")]},
        "{f}:4: members[0].address: '127.0.0.300' is not a valid IP address or hostname",
    ),
    (
        "invalid-hostname",
        {"name": "x", "members": [_m("a", "bad_host!")]},
        "{f}:4: members[0].address: 'bad_host!' is not a valid IP address or hostname",
    ),
    (
        "member-name-unsafe-as-file-name",
        {"name": "x", "members": [_m("../etc", "127.0.9.1")]},
        "{f}:3: members[0].name: '../etc' is not a safe member name: use lowercase letters, "
        "digits, '.', '-' or '_', starting and ending with a letter or digit (it becomes a file name)",
    ),
    (
        "port-out-of-range",
        {"name": "x", "members": [_m("a", "127.0.9.1", client_port=70000)]},
        "{f}:5: members[0].client_port: Input should be less than or equal to 65535",
    ),
    (
        "client-and-peer-port-equal",
        {"name": "x", "members": [_m("a", "127.0.9.1", client_port=2380)]},
        "{f}:3: members[0]: client_port and peer_port are both 2380; give them different ports",
    ),
    (
        "non-loopback-address-for-local-cluster",
        {"name": "x", "members": [_m("a", "10.0.0.12")]},
        "{f}:4: members[0].address: 10.0.0.12 is not a loopback address; a local cluster runs on "
        "this machine, so use 127.x.y.z",
    ),
    ("members-missing", {"name": "x"}, "{f}:1: members: Field required"),
    (
        "members-empty",
        {"name": "x", "members": []},
        "{f}:2: members: List should have at least 1 item after validation, not 0",
    ),
    (
        "too-many-members",
        {"name": "x", "members": [_m(f"m{i}", f"127.0.9.{i}") for i in range(1, 10)]},
        "{f}:2: members: 9 members is more than 7; larger etcd clusters are slower and no safer",
    ),
    (
        "cluster-name-unsafe",
        {"name": "My Cluster", "members": THREE},
        "{f}:1: name: 'My Cluster' is not a safe cluster name: use lowercase letters, digits, "
        "'.', '-' or '_', starting and ending with a letter or digit",
    ),
    (
        "unknown-key-algorithm",
        {"name": "x", "members": THREE, "pki": {"key_algorithm": "dsa"}},
        "{f}:10: pki.key_algorithm: Input should be 'ecdsa-p256', 'rsa-2048', 'rsa-3072' or 'rsa-4096'",
    ),
    (
        "leaf-outlives-ca",
        {"name": "x", "members": THREE, "pki": {"cert_validity_days": 4000}},
        "{f}:9: pki: cert_validity_days (4000) exceeds ca_validity_days (3650); "
        "a certificate cannot outlive its CA",
    ),
    (
        "relative-binary-path",
        {"name": "x", "members": THREE, "etcd": {"binary": "bin/etcd"}},
        "{f}:10: etcd.binary: 'bin/etcd' must be an absolute path to the etcd binary",
    ),
    (
        "missing-binary",
        {"name": "x", "members": THREE, "etcd": {"binary": "/nonexistent/etcd"}},
        "/nonexistent/etcd: not an executable file; fix etcd.binary in the spec",
    ),
    (
        "top-level-list",
        [1, 2],
        "{f}: expected a mapping with 'name' and 'members' at the top level",
    ),
    (
        "member-not-a-mapping",
        {"name": "x", "members": ["a"]},
        "{f}:3: members[0]: Input should be a valid dictionary or instance of MemberSpec",
    ),
]


def _assert_refused(result_code: int, stderr: str, expected: str, state: Path) -> None:
    assert result_code == 1
    assert stderr.splitlines() == [f"error: {expected}"]
    assert not state.exists(), "nothing may be written for a bad spec"
    assert etcd_pids_under(state.parent) == [], "nothing may be started for a bad spec"


@pytest.mark.parametrize(
    ("data", "expected"), [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS]
)
def test_bad_spec_is_refused_with_one_exact_line(tmp_path: Path, data: Any, expected: str) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    state = tmp_path / "state"
    result = run_cli("up", "-f", str(spec), "--state-dir", str(state))
    _assert_refused(result.code, result.stderr, expected.format(f=spec), state)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text("name: x\nmembers:\n  - name: a\n   address: 1\n")
    state = tmp_path / "state"
    result = run_cli("up", "-f", str(spec), "--state-dir", str(state))
    expected = (
        f"{spec}:4: expected <block end>, but found '<block mapping start>'; fix the YAML syntax"
    )
    _assert_refused(result.code, result.stderr, expected, state)


def test_missing_spec_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run_cli("up", "-f", str(tmp_path / "nope.yaml"), "--state-dir", str(state))
    expected = f"{tmp_path / 'nope.yaml'}: no such file; pass the cluster YAML with -f PATH"
    _assert_refused(result.code, result.stderr, expected, state)


def test_even_member_flag_needs_allow_even(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run_cli("up", "--members", "4", "--state-dir", str(state))
    expected = (
        "--members 4 is an even count: it tolerates no more failures than 3; "
        "use 1, 3, 5 or 7, or pass --allow-even"
    )
    _assert_refused(result.code, result.stderr, expected, state)


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = run_cli("up", "--members", "9", "--state-dir", str(tmp_path / "state"))
    assert result.code == 2
    assert "Invalid value for '--members'" in result.stderr
    assert run_cli("no-such-command").code == 2


def test_allow_even_accepts_two_members(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "members": THREE[:2]}))
    with pytest.raises(SpecError):
        load_spec(spec)
    assert len(load_spec(spec, allow_even=True).members) == 2


def test_default_spec_shape() -> None:
    spec = default_spec()
    assert [m.name for m in spec.members] == ["etcd-1", "etcd-2", "etcd-3"]
    assert [m.address for m in spec.members] == ["127.0.1.1", "127.0.1.2", "127.0.1.3"]
    assert spec.initial_cluster == (
        "etcd-1=https://127.0.1.1:2380,etcd-2=https://127.0.1.2:2380,etcd-3=https://127.0.1.3:2380"
    )
    assert spec.client_endpoints == [f"https://127.0.1.{i}:2379" for i in (1, 2, 3)]
    assert len(default_spec(5).members) == 5


def test_relative_state_dir_is_relative_to_the_spec_file(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "members": THREE, "state_dir": "st"}))
    assert load_spec(spec).state_dir == tmp_path / "st"


def test_ipv6_loopback_urls_are_bracketed() -> None:
    spec = ClusterSpec.model_validate({"name": "x", "members": [_m("a", "::1")]})
    assert spec.members[0].client_url == "https://[::1]:2379"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("etcd-1.example.com", True),
        ("localhost", True),
        ("-bad", False),
        ("a..b", False),
        ("1.2.3", False),
    ],
)
def test_hostname_rules(value: str, ok: bool) -> None:
    assert is_hostname(value) is ok
