"""Maintenance on real local clusters: status shows the database and alarms, `defrag` under a
writer (followers first, the leader last, interrupted and resumed), and a cluster that filled a
16 MiB quota recovered with `defrag --recover-nospace`."""

from __future__ import annotations

import json
import time

import pytest

from tests.backup_helpers import MIB, b64, call, endpoints, http, load, put_big, revision
from tests.conftest import ClusterFactory
from tests.helpers import LocalCluster, kill_cli_at

pytestmark = pytest.mark.slow


def status_rows(cluster: LocalCluster) -> list[dict[str, object]]:
    return list(json.loads(cluster.cli("status", "-o", "json").stdout))


def fragment(cluster: LocalCluster, key: str) -> None:
    """History a compaction frees: pages a defragmentation then gives back. bbolt counts freed
    pages as free only once a later write commits, on each member: nudge until all have."""
    put_big(cluster, key, 256 << 10, count=12)
    call(cluster, "/v3/kv/compaction", {"revision": str(revision(cluster)), "physical": True})
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        put_big(cluster, f"{key}-nudge", 16)
        if all(r["fragmentation"] > 50 for r in status_rows(cluster)):  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"not fragmented after compaction: {status_rows(cluster)}")


@pytest.fixture(scope="module")
def cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    return cluster_factory("mt", version="3.5.30")


def test_status_shows_size_in_use_fragmentation_quota_and_no_alarm(cluster: LocalCluster) -> None:
    fragment(cluster, "/mt/status")
    rows = status_rows(cluster)
    for row in rows:
        assert isinstance(row["db_size"], int) and isinstance(row["db_in_use"], int)
        assert row["db_in_use"] <= row["db_size"]
        assert isinstance(row["fragmentation"], float) and row["fragmentation"] > 30
        assert row["quota"] == 2 << 30 and row["alarms"] == []
    table = cluster.cli("status")
    assert "in use" in table.stdout and "frag" in table.stdout and "2.0 GiB" in table.stdout
    flags = (cluster.state_dir / "members" / "m1" / "etcd.flags").read_text().splitlines()
    assert "--experimental-initial-corrupt-check=true" in flags
    assert "--experimental-compact-hash-check-enabled=true" in flags  # 3.5.5+


def test_defrag_under_a_writer_loses_nothing_and_does_the_leader_last(
    cluster: LocalCluster,
) -> None:
    leader = next(r["name"] for r in status_rows(cluster) if r["is_leader"])
    dry = cluster.cli("defrag", "--dry-run")
    assert dry.code == 0 and dry.stdout.startswith("cluster mt: would defragment ")
    with load(cluster, "/mt/load") as writer:
        result = cluster.cli("defrag")
    assert result.code == 0, result.stderr
    order = result.stdout.split("defragmented ", 1)[1].split(" (in that order)")[0].split(", ")
    assert sorted(order) == ["m1", "m2", "m3"] and order[-1] == leader
    assert "leadership handed to a caught-up follower first" in result.stderr
    assert all(row["fragmentation"] < 30 for row in status_rows(cluster))  # type: ignore[operator]
    assert writer.acked and max(writer.missing(endpoints(cluster)).values()) == 0


def test_defrag_killed_after_its_first_member_resumes_with_the_rest(
    cluster: LocalCluster,
) -> None:
    fragment(cluster, "/mt/again")
    kill_cli_at(
        ["defrag", *cluster.args],
        lambda line: "defragment etcd:" in line,
    )
    rest = cluster.cli("defrag")
    assert rest.code == 0, rest.stderr
    done = rest.stdout.split("defragmented ", 1)[1].split(" (in that order)")[0].split(", ")
    assert 1 <= len(done) <= 3
    assert all(row["fragmentation"] < 30 for row in status_rows(cluster))  # type: ignore[operator]
    again = cluster.cli("defrag")
    assert "nothing to do" in again.stdout


def test_a_full_quota_is_recovered_with_recover_nospace(cluster_factory: ClusterFactory) -> None:
    full = cluster_factory("ns", version="3.5.30", storage={"quota_backend_bytes": 16 * MIB})
    flags = (full.state_dir / "members" / "m2" / "etcd.flags").read_text().splitlines()
    assert f"--quota-backend-bytes={16 * MIB}" in flags
    value = b64(b"x" * (512 << 10))
    with http(full, timeout=30) as client:
        for _ in range(200):  # bounded: 16 MiB fills in ~35 puts
            reply = client.post(
                f"{endpoints(full)[0]}/v3/kv/put", json={"key": b64("/ns/k"), "value": value}
            )
            if reply.status_code != 200:
                break
        assert "database space exceeded" in reply.text
    rows = status_rows(full)
    assert all(row["alarms"] == ["NOSPACE"] and not row["healthy"] for row in rows)
    assert full.cli("status").code == 1
    refused = full.cli("defrag")
    assert refused.code == 1 and "run `etcdforge defrag --recover-nospace`" in refused.stderr
    result = full.cli("defrag", "--recover-nospace")
    assert result.code == 0, result.stderr
    assert "NOSPACE disarmed; all healthy" in result.stdout
    rows = status_rows(full)
    assert all(row["healthy"] and row["alarms"] == [] for row in rows)
    assert all(row["db_size"] < 4 * MIB for row in rows)  # type: ignore[operator]
    with http(full) as client:
        put = client.post(
            f"{endpoints(full)[1]}/v3/kv/put", json={"key": b64("/ns/after"), "value": b64("ok")}
        )
    assert put.status_code == 200, put.text
    again = full.cli("defrag", "--recover-nospace")
    assert again.code == 0 and "no NOSPACE alarm is raised; nothing to do" in again.stdout


def test_a_lone_member_is_defragmented_without_a_hand_off(cluster_factory: ClusterFactory) -> None:
    lone = cluster_factory("lone", count=1, version="3.5.30")
    result = lone.cli("defrag", "--all")
    assert result.code == 0, result.stderr
    assert "defragmented m1" in result.stdout and "handed" not in result.stderr
