"""Membership changes refused on a live local cluster (etcd 3.5.16): each one line, exit 1,
nothing changed. And a promotion on 3.5.16 warns about etcd #19557."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from etcdforge.client import EtcdClient, EtcdReplyError, run
from etcdforge.tls import TLSFiles
from tests.conftest import ClusterFactory
from tests.helpers import CLIResult, LocalCluster, loopback_addresses, run_cli, write_spec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    return cluster_factory("refuse", 3, "3.5.16")


def tls(cluster: LocalCluster) -> TLSFiles:
    pki = cluster.state_dir / "pki"
    return TLSFiles(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")


def endpoints(cluster: LocalCluster) -> list[str]:
    return [f"https://{m['address']}:2379" for m in cluster.data["members"]]


def members(cluster: LocalCluster) -> list[tuple[str, bool]]:
    async def listed() -> list[tuple[str, bool]]:
        async with EtcdClient(endpoints(cluster), tls(cluster)) as client:
            return sorted((m.name, m.is_learner) for m in await client.member_list())

    return run(listed())


def with_members(cluster: LocalCluster, extra: list[dict[str, Any]], keep: int = 3) -> None:
    data = dict(cluster.data, members=cluster.data["members"][:keep] + extra)
    write_spec(cluster.spec_path.parent, data)


def refused(cluster: LocalCluster, result: CLIResult, *phrases: str) -> None:
    """Exit 1, one line naming what is wrong, and the live members untouched."""
    assert result.code == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    assert members(cluster) == [("m1", False), ("m2", False), ("m3", False)]


def new_members(count: int) -> list[dict[str, Any]]:
    return [
        {"name": f"m{4 + i}", "address": address}
        for i, address in enumerate(loopback_addresses(count))
    ]


def test_bad_membership_changes_are_refused(cluster: LocalCluster) -> None:
    four = new_members(1)[0]
    try:
        with_members(cluster, [], keep=1)
        refused(cluster, cluster.cli("up", "--yes"), "removing 2 of 3 voting members")
        with_members(cluster, [dict(four, name="m2")])
        refused(cluster, cluster.cli("up", "--allow-even"), "'m2' is already used by members[1]")
        third = cluster.data["members"][2]["address"]
        with_members(cluster, [dict(four, address=third)], keep=3)
        refused(cluster, cluster.cli("up", "--allow-even"), f"{third}:2379 is already used")
        with_members(cluster, [])
        refused(cluster, run_cli("member", "replace", "m9", *cluster.args, "--yes"), "'m9'")
        refused(
            cluster, run_cli("member", "replace", "m2", *cluster.args, "--yes"), "m2 is healthy"
        )
    finally:
        with_members(cluster, [])


def test_a_new_member_on_another_clusters_data_is_refused(cluster: LocalCluster) -> None:
    data = cluster.state_dir / "members" / "m4" / "data" / "member"
    data.mkdir(parents=True)
    try:
        with_members(cluster, new_members(2))
        refused(cluster, cluster.cli("up"), "already holds etcd data", "move it away")
    finally:
        data.parent.rename(data.parent.with_name("foreign"))
        with_members(cluster, [])


def test_a_second_learner_is_refused(cluster: LocalCluster) -> None:
    async def add_learner() -> str:
        async with EtcdClient(endpoints(cluster), tls(cluster)) as client:
            peer = f"https://{loopback_addresses(1)[0]}:2380"
            body = {"peerURLs": [peer], "isLearner": True}
            for _ in range(40):  # etcd refuses "unhealthy cluster" for 5 s after a member start
                try:
                    reply = await client.call(endpoints(cluster)[0], "/v3/cluster/member/add", body)
                    return str(reply["member"]["ID"])
                except EtcdReplyError as exc:
                    if "unhealthy cluster" not in str(exc):
                        raise
                    await asyncio.sleep(0.5)
            raise AssertionError("etcd kept refusing the member add: unhealthy cluster")

    async def remove(member_id: str) -> None:
        async with EtcdClient(endpoints(cluster), tls(cluster)) as client:
            await client.call(endpoints(cluster)[0], "/v3/cluster/member/remove", {"ID": member_id})

    learner = run(add_learner())
    try:
        with_members(cluster, new_members(2))
        result = cluster.cli("up")
        assert result.code == 1 and "is a learner that etcdforge did not add" in result.stderr
        assert f"etcdctl member remove {learner}" in result.stderr
        replace = run_cli("member", "replace", "m2", *cluster.args, "--yes", "--force")
        assert replace.code == 1 and "did not add" in replace.stderr
    finally:
        run(remove(learner))
        with_members(cluster, [])
    assert members(cluster) == [("m1", False), ("m2", False), ("m3", False)]


def test_adding_to_an_unhealthy_cluster_is_refused(cluster: LocalCluster) -> None:
    pid = int((cluster.state_dir / "members" / "m3" / "etcd.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    try:
        with_members(cluster, new_members(2))
        result = cluster.cli("up")
        assert result.code == 1, result.stderr
        assert "not adding m4: the cluster is not healthy (m3 not healthy)" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        with_members(cluster, [])
        restarted = cluster.cli("up")
        assert restarted.code == 0, restarted.stderr
    assert members(cluster) == [("m1", False), ("m2", False), ("m3", False)]


def test_a_promotion_on_3_5_16_warns_about_etcd_19557(cluster: LocalCluster) -> None:
    four = new_members(1)
    with_members(cluster, four)
    grown = cluster.cli("up", "--allow-even")
    assert grown.code == 0, grown.stderr
    assert "promoted on etcd 3.5.16" in grown.stderr and "etcd #19557" in grown.stderr
    assert "upgrade to 3.5.32 or later before any upgrade to 3.6" in grown.stderr
    with_members(cluster, [])
    shrunk = cluster.cli("up", "--yes")
    assert shrunk.code == 0, shrunk.stderr
    assert members(cluster) == [("m1", False), ("m2", False), ("m3", False)]
    assert "remove member m4" in shrunk.stdout
    assert list(Path(cluster.state_dir / "members" / "m4").glob("data.removed-*"))
