"""Membership changes on local clusters (real etcd): grow and shrink with `up`, `member replace`,
every case under a write load read back from every member, the CLI killed midway and rerun."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from etcdforge.client import EtcdClient, run
from etcdforge.ops.down import down
from etcdforge.ops.membership import OBSERVE_TIMEOUT, catch_up_view
from etcdforge.ops.target import Selection
from etcdforge.tls import TLSFiles
from tests.conftest import ClusterFactory
from tests.helpers import (
    CLIResult,
    LocalCluster,
    kill_cli_at,
    require_binary,
    run_cli,
    spec_data,
    write_spec,
)
from tests.load import WriteLoad

pytestmark = pytest.mark.slow


def admin_files(state: Path) -> tuple[Path, Path, Path]:
    pki = state / "pki"
    return pki / "ca.crt", pki / "admin.crt", pki / "admin.key"


def endpoint(member: dict[str, Any]) -> str:
    return f"https://{member['address']}:2379"


def rows(cluster: LocalCluster) -> list[dict[str, Any]]:
    return list(json.loads(cluster.cli("status", "-o", "json").stdout))


def live_members(state: Path, endpoints: list[str]) -> list[tuple[str, bool]]:
    async def listed() -> list[tuple[str, bool]]:
        ca, cert, key = admin_files(state)
        async with EtcdClient(endpoints, TLSFiles(ca, cert, key)) as client:
            return sorted((m.name, m.is_learner) for m in await client.member_list())

    return run(listed())


def apiserver_endpoints(cluster: LocalCluster) -> str:
    flags = run_cli("kubeadm", "apiserver-flags", *cluster.args)
    assert flags.code == 0, flags.stderr
    return next(line for line in flags.stdout.split() if line.startswith("--etcd-servers="))


def no_drift(cluster: LocalCluster) -> None:
    dry = cluster.cli("up", "--dry-run")
    assert dry.code == 0, dry.stderr
    assert "0 step(s) would run" in dry.stdout and "membership" not in dry.stdout, dry.stdout
    plan = cluster.cli("plan")
    assert plan.code == 0 and "nothing to change" in plan.stdout, plan.stdout + plan.stderr


def replace(cluster: LocalCluster, name: str, *args: str) -> CLIResult:
    return run_cli("member", "replace", name, *cluster.args, *args, timeout=300)


def ok(result: CLIResult) -> CLIResult:
    assert result.code == 0, result.stdout + result.stderr
    return result


def test_grow_one_three_five_then_shrink_to_three(tmp_path: Path) -> None:
    data = spec_data("grow", 5, require_binary("3.5.30"))
    everyone = data["members"]
    endpoints = [endpoint(m) for m in everyone]
    spec = write_spec(tmp_path, dict(data, members=everyone[:1]))
    cluster = LocalCluster(spec, tmp_path / "state", data)
    try:
        ok(cluster.cli("up"))
        with WriteLoad(endpoints[:1], admin_files(cluster.state_dir), "grow", reload=True) as load:
            # 1 -> 3, killed right after the first `member add`: the rerun finishes that learner.
            write_spec(tmp_path, dict(data, members=everyone[:3]))
            seen = kill_cli_at(["up", *cluster.args], lambda line: "member add m2" in line)
            assert "1. add m2" not in seen  # no confirmation needed to grow
            again = ok(cluster.cli("up"))
            assert "add m3 (" in again.stdout
            assert live_members(cluster.state_dir, endpoints[:1]) == [
                ("m1", False), ("m2", False), ("m3", False),
            ]  # fmt: skip
            no_drift(cluster)
            # 3 -> 5, killed while a learner catches up.
            write_spec(tmp_path, dict(data, members=everyone))
            kill_cli_at(["up", *cluster.args], lambda line: "catching up" in line)
            learners = [r for r in rows(cluster) if r["is_learner"]]
            assert all(r["catch_up"] is None or 0 <= r["catch_up"] <= 1 for r in learners)
            grown = ok(cluster.cli("up"))
            restarts = [line for line in grown.stderr.splitlines() if "restart" in line]
            assert restarts == []  # a member joins with the settings `up` renders: no restart
            assert apiserver_endpoints(cluster).count("https://") == 5
            no_drift(cluster)
            # 5 -> 3: asks first (refused without a terminal or --yes), then killed mid-way.
            write_spec(tmp_path, dict(data, members=everyone[:3]))
            refused = cluster.cli("up")
            assert refused.code == 1 and "pass --yes" in refused.stderr, refused.stderr
            assert len(refused.stderr.strip().splitlines()) == 1
            assert len(live_members(cluster.state_dir, endpoints[:1])) == 5
            kill_cli_at(["up", *cluster.args, "--yes"], lambda line: "member remove" in line)
            shrunk = ok(cluster.cli("up", "--yes"))
            assert "remove member m" in shrunk.stdout or "all healthy" in shrunk.stdout
            time.sleep(0.5)
        assert len(load.acked) > 50
        assert load.missing(endpoints[:3]) == dict.fromkeys(endpoints[:3], 0)
        assert [r["name"] for r in rows(cluster)] == ["m1", "m2", "m3"]
        assert apiserver_endpoints(cluster).count("https://") == 3
        no_drift(cluster)
        for name in ("m4", "m5"):  # stopped, data renamed aside
            files = cluster.state_dir / "members" / name
            assert not (files / "data").exists()
            assert [p.name.startswith("data.removed-") for p in files.glob("data.*")] == [True]
        flags = (cluster.state_dir / "members" / "m3" / "etcd.flags").read_text()
        assert "--initial-cluster-state=existing" in flags
        three = ",".join(f"{m['name']}=https://{m['address']}:2380" for m in everyone[:3])
        assert f"--initial-cluster={three}\n" in flags
    finally:
        down(Selection(file=spec, state_dir=cluster.state_dir), purge=True)


def transfer_leadership(cluster: LocalCluster, to: str) -> None:
    async def move() -> None:
        ca, cert, key = admin_files(cluster.state_dir)
        endpoints = [endpoint(m) for m in cluster.data["members"]]
        async with EtcdClient(endpoints, TLSFiles(ca, cert, key)) as client:
            statuses = await client.statuses()
            leader = next(s for s in statuses if s.is_leader)
            target = next(s for s in statuses if s.endpoint == to)
            if leader.endpoint != to:
                body = {"targetID": target.member_id}
                await client.call(leader.endpoint, "/v3/maintenance/transfer-leadership", body)

    run(move())


def test_replace_a_lost_member_then_the_leader_then_the_first_member(
    cluster_factory: ClusterFactory,
) -> None:
    cluster = cluster_factory("replace", 3, "3.4.23")
    members = cluster.data["members"]
    endpoints = [endpoint(m) for m in members]
    files = cluster.state_dir / "members"
    with WriteLoad(endpoints, admin_files(cluster.state_dir), "rep", reload=True) as load:
        # m2's data dir is deleted while it is down (a lost disk); rebuilt, killed once midway.
        os.kill(int((files / "m2" / "etcd.pid").read_text()), signal.SIGKILL)
        shutil.rmtree(files / "m2" / "data")
        args = ["member", "replace", "m2", *cluster.args, "--yes"]
        kill_cli_at(args, lambda line: "member add m2" in line)
        done = ok(replace(cluster, "m2", "--yes"))
        assert "member m2 replaced" in done.stdout
        # The leader (m3 here): healthy, so only with --force; leadership moves away first.
        transfer_leadership(cluster, endpoints[2])
        healthy = replace(cluster, "m3", "--yes")
        assert healthy.code == 1 and "is healthy" in healthy.stderr and "--force" in healthy.stderr
        led = ok(replace(cluster, "m3", "--yes", "--force"))
        assert "m3 leads: hand leadership to a follower first" in led.stderr
        # The first member of the initial cluster, killed after its old self left: `up` finishes.
        args = ["member", "replace", "m1", *cluster.args, "--yes", "--force"]
        kill_cli_at(args, lambda line: "stop and disable etcd" in line)
        assert (cluster.state_dir / "replace.json").exists()
        finished = ok(cluster.cli("up"))
        assert "add m1 (" in finished.stdout
        assert not (cluster.state_dir / "replace.json").exists()
        time.sleep(0.5)
    assert load.missing(endpoints) == dict.fromkeys(endpoints, 0)
    assert [r["name"] for r in rows(cluster)] == ["m1", "m2", "m3"]
    assert all(r["healthy"] and not r["is_learner"] for r in rows(cluster))
    no_drift(cluster)
    for name in ("m1", "m3"):  # old data renamed aside; m2 had none left
        assert list((files / name).glob("data.removed-*"))


def test_the_catch_up_poll_does_not_wait_on_a_learner_too_busy_to_answer(
    cluster_factory: ClusterFactory,
) -> None:
    """A learner applying a large snapshot answers late: the poll asks it briefly and has the
    voters' view at once, so it notices the moment the learner has caught up."""
    cluster = cluster_factory("busy", 3, "3.5.30")
    endpoints = [endpoint(m) for m in cluster.data["members"]]
    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        learner = f"https://127.0.0.1:{silent.getsockname()[1]}"

        async def view() -> tuple[list[Any], int | None]:
            tls = TLSFiles(*admin_files(cluster.state_dir))
            async with EtcdClient([*endpoints, learner], tls, timeout=OBSERVE_TIMEOUT) as client:
                # Bounded below the client's own timeout: waiting that long is the bug.
                return await asyncio.wait_for(catch_up_view(client, learner), OBSERVE_TIMEOUT - 1)

        voters, index = run(view())
    assert index is None
    assert sorted(s.endpoint for s in voters) == sorted(endpoints)
    assert [s.healthy for s in voters] == [True, True, True]
    assert sum(s.is_leader for s in voters) == 1
