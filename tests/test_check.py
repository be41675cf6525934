"""`etcdforge check` on real local etcd 3.5.30 clusters: it passes on an etcdforge cluster, and each
check fails for real on a cluster broken on purpose.

One 3-member cluster is shared by the module and broken one way at a time (each test repairs
what it broke); a 1-member cluster fills a 16 MiB quota; the last test diverges a member's data
for good. The JSON output and the Prometheus textfile are parsed, never grepped.

Diverging a member (the last test): m3 is restored from an older snapshot under its own member
ID. etcd stops such a member by itself when the leader remembers how far it had got: raft
panics with "tocommit(N) is out of range [lastIndex(3)]. Was the raft log corrupted, truncated,
or lost?" (measured on 3.5.30). After a leader change while it was down, the new leader probes it
from scratch, finds the logs agree at the restored index and replays every later entry on top
of the restored data: the member runs, reports healthy, and holds other revisions than the rest.
Nothing in etcd 3.5 notices (its corruption checks are off by default); HashKV does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from etcdforge.client import EtcdClient, EtcdReplyError
from etcdforge.ops.health import hand_off_leadership, leader_name, wait_healthy
from etcdforge.record import ClusterRecord, read_record
from etcdforge.services.local import LocalRuntime, stored_flags
from tests.conftest import ClusterFactory
from tests.helpers import LocalCluster, release_dir, require_binary, run_cli
from tests.load import WriteLoad
from tests.prom import parse_prom

pytestmark = pytest.mark.slow
VERSION = "3.5.30"
BACKUP = ("backup-age", "cluster")
Report = dict[str, Any]
#: etcd 3.5.30 is affected by advisories fixed in 3.5.32/3.5.33 (not packaged for these tests):
#: every member's `version-advisories` row warns, naming them.
ADVISED = {("version-advisories", m): "warn" for m in ("m1", "m2", "m3")}


@pytest.fixture(scope="module")
def cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    """The shared cluster, with one `etcdforge backup` taken (the `backup-age` row reads it)."""
    shared = cluster_factory("check", version=VERSION)
    backup = shared.cli("backup")
    assert backup.code == 0, backup.stderr
    return shared


def record_of(cluster: LocalCluster) -> ClusterRecord:
    record = read_record(cluster.state_dir)
    assert record is not None
    return record


def check(cluster: LocalCluster, *args: str) -> tuple[int, Report]:
    result = cluster.cli("check", "-o", "json", *args)
    assert result.code in (0, 1, 3), result.stderr
    report = json.loads(result.stdout)
    assert report["exit_code"] == result.code
    return result.code, report


def not_passing(report: Report) -> dict[tuple[str, str], str]:
    return {(r["check"], r["member"]): r["result"] for r in report["rows"] if r["result"] != "pass"}


def row(report: Report, check_id: str, member: str) -> dict[str, str]:
    return next(r for r in report["rows"] if (r["check"], r["member"]) == (check_id, member))


@contextmanager
def started_by_hand(
    cluster: LocalCluster, name: str, change: dict[str, str], give_back: bool = True
) -> Iterator[int]:
    """Stop a member and run its etcd by hand from its flags file with `change` applied (the
    way an operator edits a unit), then stop it and, with `give_back`, restart the member as
    etcdforge's supervisor runs it."""
    record = record_of(cluster)
    runtime = LocalRuntime(record)
    files = record.layout.member(name)
    flags = dict(flag[2:].split("=", 1) for flag in stored_flags(files))
    flags.update(change)
    asyncio.run(runtime.stop(name))
    with open(files.log_file, "ab") as log:
        process = subprocess.Popen(
            [record.binary, *(f"--{k}={v}" for k, v in flags.items())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        asyncio.run(wait_healthy(record, runtime, timeout=60, check_down=False))
        yield process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        if give_back:
            asyncio.run(runtime.start(name))
            asyncio.run(wait_healthy(record, runtime, timeout=60))


def test_etcdforge_cluster_passes_under_writes_and_writes_the_textfile(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    record = record_of(cluster)
    admin = (record.layout.ca_cert, record.layout.admin_cert, record.layout.admin_key)
    with WriteLoad(record.endpoints, admin, "check") as load:
        time.sleep(0.3)
        code, report = check(cluster, "--textfile", str(tmp_path))
    assert load.failures == [] and load.missing(record.endpoints) == {
        e: 0 for e in record.endpoints
    }
    assert code == 3 and report["result"] == "warn"
    assert not_passing(report) == ADVISED  # every other check passes
    assert "fixed in 3.5.33" in row(report, "version-advisories", "m1")["seen"]
    assert "h old" in row(report, "backup-age", "cluster")["seen"]
    assert "same as m" in row(report, "consistency-hashkv", "m2")["seen"]
    assert row(report, "cis-2.2", "m1")["source"].startswith("CIS Kubernetes Benchmark v1.8 §2.2")
    prom = (tmp_path / "etcdforge.prom").read_text()
    series = parse_prom(prom)
    assert len(series["etcdforge_check"]) == len(report["rows"])
    assert set(series["etcdforge_check"].values()) == {1.0}
    warned = {dict(k)["check"] for k, v in series["etcdforge_check_warning"].items() if v}
    assert warned == {"version-advisories"}
    assert [p.name for p in tmp_path.iterdir()] == ["etcdforge.prom"]  # no temp file left
    assert (tmp_path / "etcdforge.prom").stat().st_mode & 0o777 == 0o644
    table = cluster.cli("check")
    assert (
        table.code == 3
        and "cluster check:" in table.stdout
        and "version-advisories" in table.stdout
    )


def test_member_started_by_hand_with_weak_flags_and_a_plain_listener_fails(
    cluster: LocalCluster,
) -> None:
    address = cluster.data["members"][0]["address"]
    plain = f"http://{address.rsplit('.', 1)[0]}.99:2379"
    change = {
        "client-cert-auth": "false",
        "auto-tls": "true",
        "peer-client-cert-auth": "false",
        "peer-auto-tls": "true",
        "listen-client-urls": f"https://{address}:2379,{plain}",
    }
    with started_by_hand(cluster, "m1", change):
        answer = httpx.get(f"{plain}/health", timeout=5)  # anyone may talk to it, no TLS
        assert answer.status_code == 200
        code, report = check(cluster)
    assert code == 1
    assert not_passing(report) == {
        ("cis-2.2", "m1"): "fail",
        ("cis-2.3", "m1"): "fail",
        ("cis-2.5", "m1"): "fail",
        ("cis-2.6", "m1"): "fail",
        ("listen-plain-http", "m1"): "fail",
        **ADVISED,
    }
    assert plain in row(report, "listen-plain-http", "m1")["seen"]
    assert row(report, "cis-2.2", "m1")["seen"] == "--client-cert-auth=false"


def test_data_dir_0755_fails_1_1_11(cluster: LocalCluster) -> None:
    data = record_of(cluster).layout.member("m2").data_dir
    os.chmod(data, 0o755)
    try:
        code, report = check(cluster)
    finally:
        os.chmod(data, 0o700)
    assert code == 1
    assert not_passing(report) == {("cis-1.1.11", "m2"): "fail", **ADVISED}
    assert row(report, "cis-1.1.11", "m2")["fix"] == f"chmod 700 {data}"


def test_expiring_certificate_fails_until_renewed(cluster: LocalCluster) -> None:
    short = run_cli("certs", "renew", *cluster.args, "--member", "m3", "--days", "1")
    assert short.code == 0, short.stderr
    code, report = check(cluster)
    assert code == 1
    assert not_passing(report) == {
        ("certificates", "m3/server"): "fail", ("certificates", "m3/peer"): "fail", **ADVISED,
    }  # fmt: skip
    assert "expires within 30d" in row(report, "certificates", "m3/server")["seen"]
    renewed = run_cli("certs", "renew", *cluster.args)
    assert renewed.code == 0, renewed.stderr
    assert check(cluster)[0] == 3


def test_nospace_alarm_from_a_16_mib_quota(cluster_factory: ClusterFactory) -> None:
    small = cluster_factory("nospace", count=1, version=VERSION)
    record = record_of(small)
    quota = {"quota-backend-bytes": str(16 << 20)}
    with started_by_hand(small, "m1", quota, give_back=False):  # the alarm outlives a restart
        filled = asyncio.run(fill(record))
        assert filled, "the 16 MiB quota was never reached"
        code, report = check(small)
    assert code == 1
    failing = not_passing(report)
    assert failing[("storage-alarm", "m1")] == "fail"
    assert "NOSPACE" in row(report, "storage-alarm", "m1")["seen"]
    assert failing[("storage-quota", "m1")] == "fail"
    assert "quota 16.0 MiB" in row(report, "storage-quota", "m1")["seen"]
    # etcd's own /health reports the alarm too.
    assert "ALARM NOSPACE" in row(report, "health", "m1")["seen"]
    assert set(failing) == {
        ("storage-alarm", "m1"),
        ("storage-quota", "m1"),
        ("health", "m1"),
        ("version-advisories", "m1"),
        BACKUP,  # this cluster never had a backup
    }
    assert row(report, "backup-age", "cluster")["seen"] == "no verified backup found"


async def fill(record: ClusterRecord) -> bool:
    """Put 1 MiB values until etcd refuses with "database space exceeded" (bounded)."""
    value = os.urandom(1 << 19).hex()
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=10.0) as client:
        for index in range(64):
            try:
                await client.put(f"fill/{index}", value, endpoint=record.endpoints[0])
            except EtcdReplyError as exc:
                return "database space exceeded" in str(exc)
    return False


def test_diverged_member_fails_hashkv_naming_the_others(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    require_binary(VERSION)
    tools = release_dir(VERSION)
    record = record_of(cluster)
    runtime = LocalRuntime(record)
    asyncio.run(put_many(record, "before", 20))
    snapshot = tmp_path / "old.db"
    saved = cluster.etcdctl("snapshot", "save", str(snapshot), endpoint=record.endpoints[2])
    assert saved.returncode == 0, saved.stderr
    asyncio.run(put_many(record, "after", 20))
    asyncio.run(runtime.stop("m3"))
    files = record.layout.member("m3")
    flags = dict(flag[2:].split("=", 1) for flag in stored_flags(files))
    subprocess.run(["rm", "-rf", "--", str(files.data_dir)], check=True)
    restore = [
        str(tools / "etcdutl"), "snapshot", "restore", str(snapshot),
        f"--data-dir={files.data_dir}", "--name=m3",
        f"--initial-cluster={flags['initial-cluster']}",
        f"--initial-cluster-token={flags['initial-cluster-token']}",
        f"--initial-advertise-peer-urls={flags['initial-advertise-peer-urls']}",
    ]  # fmt: skip
    subprocess.run(restore, check=True, capture_output=True, timeout=60)
    leader = asyncio.run(leader_name(record))
    assert leader is not None and asyncio.run(hand_off_leadership(record, leader))
    asyncio.run(runtime.start("m3"))
    asyncio.run(wait_healthy(record, runtime, timeout=60))
    code, report = check(cluster)
    assert code == 1
    assert not_passing(report) == {("consistency-hashkv", "m3"): "fail", **ADVISED}
    seen = row(report, "consistency-hashkv", "m3")["seen"]
    assert "differs from m1, m2" in seen and "data diverged" in seen
    assert row(report, "health", "m3")["result"] == "pass"  # etcd itself sees nothing wrong


async def put_many(record: ClusterRecord, prefix: str, count: int) -> None:
    async with EtcdClient(record.endpoints, record.admin_tls) as client:
        for index in range(count):
            await client.put(f"{prefix}/{index}", "x" * 100)


def test_unknown_cluster_is_one_line_and_exit_1(tmp_path: Path) -> None:
    result = run_cli("check", "--state-dir", str(tmp_path / "nothing"))
    assert result.code == 1 and result.stderr.startswith("error: no cluster")
