"""Benchmark adopting and converting the seed runbook's cluster on 3 real test hosts.

The runbook's cluster is built literally (tests/runbook.py: cfssl, scp, its unit and sed lines,
etcd 3.5.1) and loaded by a writer that uses the runbook's client.pem (the kube-apiserver's) and
records the time of every acknowledged write. Measured in the same run, on the same cluster:

- floor: a plain rolling restart of the runbook's own units, what an operator does by hand
  (`systemctl restart etcd` on each member, followers first, the leader last, waiting for every
  member to answer /health in between; no leadership hand-off);
- etcdforge: `adopt` then `apply --yes`, the live conversion (runbook unit masked, etcdforge's
  unit started on the same data, health-gated, leader last after handing leadership off, CA keys
  deleted at the end), timed end to end from the command line.

Per phase: the longest gap between two acknowledged writes (the write stall; goal < 1 s), the
duration, and the acknowledged writes missing on any member afterwards (read from each member
alone; goal 0). Needs root (network namespaces, systemd-nspawn).
Run: .venv/bin/python bench/adopt.py [--runs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rolling import Figures
from etcdforge.client import EtcdClient
from etcdforge.ops.rolling import followers_first
from etcdforge.tls import TLSFiles
from tests.apply_helpers import build_tarball, publish, release_sources, serve
from tests.fleet import Fleet, Host
from tests.helpers import run_cli
from tests.load import WriteLoad
from tests.runbook import RunbookCluster, build

HEALTH_LIMIT = 120.0


async def _healthy(client: EtcdClient, endpoints: list[str]) -> None:
    """The floor's health wait: every member answers /health (bounded)."""
    for _ in range(int(HEALTH_LIMIT / 0.1)):
        answers = await asyncio.gather(*(client.health(e) for e in endpoints))
        if all(ok for ok, _ in answers):
            return
        await asyncio.sleep(0.1)
    raise SystemExit("floor: the runbook cluster did not become healthy")


def floor_roll(cluster: RunbookCluster) -> None:
    """The runbook's units restarted by hand: followers first, the leader last, health between."""
    tls = TLSFiles(*cluster.client_files)

    async def roll() -> None:
        async with EtcdClient(cluster.endpoints, tls, timeout=2.0) as client:
            statuses = await client.statuses()
            leader = next((s.endpoint for s in statuses if s.is_leader), None)
            order = followers_first(cluster.endpoints, leader)
            by_endpoint = dict(zip(cluster.endpoints, cluster.hosts, strict=True))
            for endpoint in order:
                await _healthy(client, cluster.endpoints)
                host = by_endpoint[endpoint]
                await asyncio.to_thread(host.run, "systemctl", "restart", "etcd", timeout=120)
            await _healthy(client, cluster.endpoints)

    asyncio.run(roll())


def measure(cluster: RunbookCluster, work: Callable[[], None], into: Figures, tag: str) -> None:
    with WriteLoad(cluster.endpoints, cluster.client_files, tag, reload=True) as load:
        time.sleep(1.0)  # a steady stream first
        started = time.monotonic()
        work()
        ended = time.monotonic()
        time.sleep(1.0)
    into.stalls.append(load.longest_stall(started - 0.5, ended + 1.0))
    into.durations.append(ended - started)
    into.acked += len(load.acked)
    into.missing += sum(load.missing(cluster.endpoints).values())


def adopt_and_apply(
    cluster: RunbookCluster, work: Path, release: str, split: dict[str, list[float]]
) -> Callable[[], None]:
    spec, env = work / "cluster.yaml", {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
    first = cluster.hosts[0]
    hosts = [a for h in cluster.hosts for a in ("--host", f"root@{h.address}")]
    login = ["--ssh-key", str(first.key_path), "--known-hosts", str(first.known_hosts)]

    def run() -> None:
        started = time.monotonic()
        adopted = run_cli(
            "adopt", *hosts, *login, "-o", str(spec), "--state-dir", str(work / "state"),
            "--release", release, env=env,
        )  # fmt: skip
        if adopted.code != 0:
            raise SystemExit(f"adopt failed: {adopted.stderr}")
        middle = time.monotonic()
        applied = run_cli("apply", "-f", str(spec), "--yes", env=env, timeout=600)
        if applied.code != 0:
            raise SystemExit(f"apply failed: {applied.stderr}")
        split["adopt"].append(middle - started)
        split["apply"].append(time.monotonic() - middle)

    return run


def one_run(
    fleet: Fleet,
    work: Path,
    release: str,
    figures: tuple[Figures, Figures],
    split: dict[str, list[float]],
) -> None:
    floor, ours = figures
    hosts: list[Host] = fleet.start(3)
    cluster = build(hosts, work / "runbook")
    measure(cluster, lambda: floor_roll(cluster), floor, f"floor{len(floor.stalls)}")
    convert = adopt_and_apply(cluster, work, release, split)
    measure(cluster, convert, ours, f"adopt{len(ours.stalls)}")


def main() -> None:
    parser = argparse.ArgumentParser(description="adopt + convert the runbook cluster")
    parser.add_argument("--runs", type=int, default=1, help="fresh hosts and cluster per run")
    args = parser.parse_args()
    floor, ours = Figures(), Figures()
    split: dict[str, list[float]] = {"adopt": [], "apply": []}
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-adopt-") as tmp:
        root = Path(tmp)
        tarball = build_tarball(root, "3.5.1", release_sources()["3.5.1"])
        publish(root / "www", "3.5.1", tarball)
        with serve(root / "www") as server, Fleet() as fleet:
            for index in range(args.runs):
                work = root / f"run{index}"
                work.mkdir()
                one_run(fleet, work, server.url("3.5.1"), (floor, ours), split)
    print("runbook cluster, 3 hosts, etcd 3.5.1, writer with the runbook's client.pem")
    print(floor.line("floor"))
    print(ours.line("etcdforge"))
    stall = statistics.median(ours.stalls) / (statistics.median(floor.stalls) or float("nan"))
    took = statistics.median(ours.durations) / statistics.median(floor.durations)
    adopt_s, apply_s = (statistics.median(split[k]) for k in ("adopt", "apply"))
    print(f"  etcdforge split: adopt {adopt_s:.2f} s (reads only), apply {apply_s:.2f} s")
    print(f"  ratio etcdforge/floor: stall {stall:.2f}x, time {took:.2f}x")
    goal = max(ours.stalls) < 1.0 and ours.missing == 0
    print(f"  goal (stall < 1 s, 0 lost writes): {'met' if goal else 'NOT met'}")


if __name__ == "__main__":
    main()
