"""Benchmark the rolling restart: write stall and lost writes, local and on real test hosts.

A 3-member cluster (etcd 3.5.30 where test-env fetched it, else 3.5.1) is restarted member by
member under a writer that records the time of every acknowledged write. Two policies, measured
in the same run and interleaved so machine noise hits both:

- floor ("before"): followers first, the leader last, a plain restart (`systemctl restart` on
  hosts, SIGTERM and start locally) and a health wait between members, no leadership hand-off;
- etcdforge (`ops.rolling.rolling_restart`): the health gate, leadership handed to the caught-up
  follower before the leader restarts, the next member only once all are healthy.

Per policy: the longest gap between two acknowledged writes (the write stall), the roll's
duration, and the acknowledged writes missing on any member afterwards (read from each member
alone). The hosts part needs root (network namespaces, systemd-nspawn); `--local-only` skips it.
Run: .venv/bin/python bench/rolling.py [--runs 3] [--local-only]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etcdforge.client import EtcdClient
from etcdforge.ops.down import down
from etcdforge.ops.health import leader_name, unhealthy_members
from etcdforge.ops.plan import SILENT
from etcdforge.ops.rolling import followers_first, rolling_restart
from etcdforge.ops.runtime import open_runtime
from etcdforge.ops.target import Selection
from etcdforge.ops.up import up
from etcdforge.record import ClusterRecord, read_record
from etcdforge.services.runtime import MemberRuntime
from tests.apply_helpers import host_spec, publish, serve, write_yaml
from tests.fleet import Fleet, Host
from tests.helpers import etcd_binary, release_tarball, run_cli, spec_data, write_spec
from tests.load import WriteLoad

HEALTH_LIMIT = 120.0
RUNS = itertools.count()
Restart = Callable[[str], Awaitable[None]]


@dataclass
class Figures:
    stalls: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    acked: int = 0
    missing: int = 0

    def line(self, name: str) -> str:
        stall, took = statistics.median(self.stalls), statistics.median(self.durations)
        runs = ", ".join(f"{s:.3f}" for s in self.stalls)
        worst = max(self.stalls)
        return (
            f"  {name:<10} stall median {stall:6.3f} s (runs: {runs}), max {worst:.3f} s;"
            f" roll {took:5.2f} s; {self.acked} acknowledged writes, {self.missing} missing"
        )


async def healthy(record: ClusterRecord) -> None:
    """The floor's health wait: every member answers /health (bounded)."""
    deadline = time.monotonic() + HEALTH_LIMIT
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=2.0) as client:
        while await unhealthy_members(client, record):
            if time.monotonic() > deadline:
                raise SystemExit("floor: the cluster did not become healthy")
            await asyncio.sleep(0.1)


async def floor_roll(record: ClusterRecord, restart: Restart) -> None:
    names = followers_first([m.name for m in record.members], await leader_name(record))
    for name in names:
        await healthy(record)
        await restart(name)
    await healthy(record)


async def etcdforge_roll(record: ClusterRecord, runtime: MemberRuntime) -> None:
    reasons = {m.name: "benchmark" for m in record.members}
    await rolling_restart(record, runtime, reasons, SILENT, HEALTH_LIMIT)


def measure(record: ClusterRecord, roll: Callable[[], Awaitable[None]], into: Figures) -> None:
    layout = record.layout
    admin = (layout.ca_cert, layout.admin_cert, layout.admin_key)
    # A prefix of its own per measurement: a write lost in one run must not hide behind the same
    # key written by an earlier one.
    with WriteLoad(record.endpoints, admin, f"roll{next(RUNS)}", reload=True) as load:
        time.sleep(1.0)  # a steady stream before the roll
        started = time.monotonic()
        asyncio.run(roll())
        ended = time.monotonic()
        time.sleep(1.0)
    into.stalls.append(load.longest_stall(started - 0.5, ended + 1.0))
    into.durations.append(ended - started)
    into.acked += len(load.acked)
    into.missing += sum(load.missing(record.endpoints).values())


def bench_local(work: Path, version: str, runs: int) -> tuple[Figures, Figures]:
    binary = etcd_binary(version) or etcd_binary("3.5.1")
    spec = write_spec(work / "local", spec_data("roll", 3, binary))
    selection = Selection(file=spec, state_dir=work / "local" / "state")
    up(selection)
    record = read_record(work / "local" / "state")
    assert record is not None
    floor, ours = Figures(), Figures()
    try:
        for _ in range(runs):

            async def plain() -> None:
                async with open_runtime(record) as runtime:
                    await floor_roll(record, runtime.restart)

            async def policy() -> None:
                async with open_runtime(record) as runtime:
                    await etcdforge_roll(record, runtime)

            measure(record, plain, floor)
            measure(record, policy, ours)
    finally:
        down(selection, purge=True)
    return floor, ours


def bench_hosts(work: Path, version: str, runs: int) -> tuple[Figures, Figures]:
    tarball = release_tarball(version)
    if tarball is None:
        raise SystemExit(f"etcd {version} tarball missing: run scripts/test-env.sh")
    publish(work / "www", version, tarball)
    floor, ours = Figures(), Figures()
    with serve(work / "www") as server, Fleet(user="deploy") as fleet:
        hosts: list[Host] = fleet.start(3)
        data = host_spec("roll", hosts, server.url(version), state_dir=str(work / "hstate"))
        spec = write_yaml(work / "hosts.yaml", data)
        env = {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
        deployed = run_cli("apply", "-f", str(spec), env=env, timeout=600)
        if deployed.code != 0:
            raise SystemExit(f"apply failed: {deployed.stderr}")
        record = read_record(work / "hstate")
        assert record is not None
        by_name = {m.name: h for m, h in zip(record.members, hosts, strict=True)}

        async def systemctl_restart(name: str) -> None:
            await asyncio.to_thread(
                by_name[name].run, "systemctl", "restart", "etcd.service", timeout=120
            )

        async def policy() -> None:
            async with open_runtime(record) as runtime:
                await etcdforge_roll(record, runtime)

        async def plain() -> None:
            await floor_roll(record, systemctl_restart)

        for _ in range(runs):
            measure(record, plain, floor)
            measure(record, policy, ours)
    return floor, ours


def report(where: str, floor: Figures, ours: Figures) -> None:
    print(f"{where}: rolling restart of 3 members under a writer")
    print(floor.line("floor"))
    print(ours.line("etcdforge"))
    base, mine = statistics.median(floor.stalls), statistics.median(ours.stalls)
    ratio = mine / base if base else float("nan")
    took = statistics.median(ours.durations) / statistics.median(floor.durations)
    print(f"  ratio etcdforge/floor: stall {ratio:.2f}x, roll time {took:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description="rolling restart: write stall, lost writes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--version", default="3.5.30")
    parser.add_argument("--local-only", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-roll-") as tmp:
        work = Path(tmp)
        (work / "local").mkdir()
        report("local", *bench_local(work, args.version, args.runs))
        if not args.local_only:
            report("3 hosts", *bench_hosts(work, args.version, args.runs))


if __name__ == "__main__":
    main()
