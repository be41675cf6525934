"""Host facts parsed once from the probe's recorded output, and the checks as pure functions.

The fixtures are the real probe's output on a fresh test host and on one whose data dir holds
another cluster's member (recorded from `tests/fleet.py` hosts).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from etcdforge.errors import PreflightError
from etcdforge.hosts import LocalHost
from etcdforge.ops.preflight import DataDirOwner, HostFacts, check, data_dir_owner, parse_probe
from etcdforge.spec import HostPathsSpec, MemberSpec

FIXTURES = Path(__file__).parent / "fixtures" / "facts"
PATHS = HostPathsSpec()
MEMBER = MemberSpec(name="etcd-1", address="10.0.0.11")


def _parse(text: str) -> HostFacts:
    """As if this machine's clock read the host's time around the probe."""
    stamp = float(next(x for x in text.splitlines() if x.startswith("time=")).split("=")[1])
    return parse_probe(text, stamp - 0.01, stamp + 0.01)


def _facts(name: str) -> HostFacts:
    return _parse((FIXTURES / name).read_text())


def _check(facts: HostFacts, token: str | None = None) -> None:
    check(LocalHost("etcd-1 (10.0.0.11)"), MEMBER, PATHS, facts, token)


def test_fresh_host_facts() -> None:
    facts = _facts("fresh-host.txt")
    assert (facts.uid, facts.arch, facts.has_systemd) == ("0", "x86_64", True)
    assert facts.free_data > 1 << 30 and not facts.has_member_data and facts.env_token is None
    assert not facts.unit.running and facts.unit.active == "inactive" and not facts.unit.fragment
    assert not facts.distro.switched_on
    assert [(x.port, x.process) for x in facts.listeners] == [(22, "sshd"), (22, "sshd")]
    assert abs(facts.skew) < 0.1
    _check(facts)  # a fresh host passes every check


def test_foreign_data_dir_is_refused_with_its_token() -> None:
    facts = _facts("foreign-data.txt")
    assert facts.has_member_data and facts.env_token == "other-1234"
    assert facts.data_owner("mine-1") is DataDirOwner.OTHER
    assert facts.data_owner("other-1234") is DataDirOwner.THIS_CLUSTER
    with pytest.raises(PreflightError) as raised:
        _check(facts, "mine-1")
    assert str(raised.value) == (
        "etcd-1 (10.0.0.11): /var/lib/etcd already holds an etcd member of another cluster "
        "(token other-1234); move it away, or `etcdforge reset --purge-data` if it is this "
        "cluster's"
    )
    _check(facts, "other-1234")  # our own data: a rerun of apply goes ahead


def test_data_dir_owner_rule() -> None:
    assert data_dir_owner(False, None, None) is DataDirOwner.NONE
    assert data_dir_owner(False, "x", "y") is DataDirOwner.NONE
    assert data_dir_owner(True, None, "t") is DataDirOwner.OTHER  # no etcdforge config: not ours
    assert data_dir_owner(True, "t", None) is DataDirOwner.OTHER  # a new cluster owns nothing
    assert data_dir_owner(True, "t", "t") is DataDirOwner.THIS_CLUSTER


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"uid": "1000"}, "commands do not run as root (uid 1000)"),
        ({"has_systemd": False}, "no systemctl here"),
        ({"arch": "aarch64"}, "architecture aarch64 is not x86_64"),
        ({"skew": 95.0}, "clock differs from this machine's by +95 s"),
        ({"free_data": 10 << 20}, "only 10 MiB free for /var/lib/etcd"),
    ],
)
def test_each_refusal_names_the_host_and_the_fix(change: dict[str, object], message: str) -> None:
    facts = dataclasses.replace(_facts("fresh-host.txt"), **change)  # type: ignore[arg-type]
    with pytest.raises(PreflightError) as raised:
        _check(facts)
    assert str(raised.value).startswith("etcd-1 (10.0.0.11): " + message)


def test_port_taken_by_another_process() -> None:
    facts = _facts("fresh-host.txt")
    nginx = 'LISTEN 0 4096 0.0.0.0:2379 0.0.0.0:* users:(("nginx",pid=77,fd=6))\n>>'
    taken = _parse((FIXTURES / "fresh-host.txt").read_text().replace(">>", nginx))
    assert len(taken.listeners) == len(facts.listeners) + 1
    with pytest.raises(PreflightError, match=r"port 2379 on 0.0.0.0 is taken by nginx \(pid 77\)"):
        _check(taken)
