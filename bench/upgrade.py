"""Benchmark `etcdforge upgrade` on 3 real hosts, etcd 3.5.16 -> 3.5.30, under a writer.

Two procedures, measured in the same run and interleaved so machine noise hits both:

- floor: what a careful shell script does: followers first, the leader last, on each host flip
  `/opt/etcd/current` to the new release and `systemctl restart etcd`, waiting until every
  member answers /health between members; no leadership hand-off, no snapshot, no checks;
- etcdforge: `upgrade --to 3.5.30` (the `ops.upgrade` call the CLI makes): path check, preflight,
  health gate, a verified snapshot, each member switched and restarted after a leadership
  hand-off and checked (healthy, caught up, new version), then the cluster version and HashKV.

Both start with the release already installed beside 3.5.16 (a warm-up upgrade installs it), and
after each measured run the floor script takes the cluster back to 3.5.16 (unmeasured). Per
procedure: the total time, the longest gap between two acknowledged writes (the write stall) and
the acknowledged writes missing on any member afterwards (read from each member alone).
Goals: stall < 1 s, 0 lost writes, etcdforge total <= 1.3x the floor. Needs root (the fleet).
Run: .venv/bin/python bench/upgrade.py [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.rolling import Figures, floor_roll, measure
from etcdforge.ops.plan import SILENT
from etcdforge.ops.target import Selection
from etcdforge.ops.upgrade import UpgradeRequest, upgrade
from etcdforge.record import ClusterRecord, read_record
from tests.apply_helpers import ReleaseServer, host_spec, publish, serve, write_yaml
from tests.fleet import Fleet, Host
from tests.helpers import release_tarball, run_cli

OLD, NEW = "3.5.16", "3.5.30"
FLIP = 'ln -sfn "$1" /opt/etcd/current.tmp && mv -Tf /opt/etcd/current.tmp /opt/etcd/current'


def floor(record: ClusterRecord, hosts: dict[str, Host], version: str) -> None:
    """The plain script: flip the link and `systemctl restart`, health waits between members."""

    async def flip_and_restart(name: str) -> None:
        host = hosts[name]
        await asyncio.to_thread(host.run, "sh", "-c", FLIP, "sh", f"v{version}")
        await asyncio.to_thread(host.run, "systemctl", "restart", "etcd.service", timeout=120)

    asyncio.run(floor_roll(record, flip_and_restart))


def in_thread(work: Callable[[], object]) -> Callable[[], Awaitable[None]]:
    """A blocking procedure as the coroutine `bench.rolling.measure` times under its writer."""

    async def run() -> None:
        await asyncio.to_thread(work)

    return run


class Timeline:
    """`--steps`: every phase and step of etcdforge's runs, with its time since the run began."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def phase(self, name: str) -> None:
        print(f"{time.monotonic() - self.started:6.2f} s  {name}", file=sys.stderr)

    def step(self, where: str, message: str) -> None:
        print(f"{time.monotonic() - self.started:6.2f} s    {where}: {message}", file=sys.stderr)


def deploy(work: Path, server: ReleaseServer, hosts: list[Host]) -> Selection:
    data = host_spec("bench", hosts, server.url(OLD), state_dir=str(work / "state"))
    spec = write_yaml(work / "cluster.yaml", data)
    deployed = run_cli("apply", "-f", str(spec), timeout=600)
    if deployed.code != 0:
        raise SystemExit(f"apply failed: {deployed.stderr}")
    return Selection(file=spec)


def etcdforge_run(selection: Selection, request: UpgradeRequest, steps: bool) -> None:
    upgrade(selection, request, progress=Timeline() if steps else SILENT)


def bench(work: Path, runs: int, steps: bool) -> tuple[Figures, Figures]:
    for version in (OLD, NEW):
        tarball = release_tarball(version)
        if tarball is None:
            raise SystemExit(f"etcd {version} tarball missing: run scripts/test-env.sh")
        publish(work / "www", version, tarball)
    plain, ours = Figures(), Figures()
    with serve(work / "www") as server, Fleet(user="deploy", lock_timeout=3600) as fleet:
        hosts = fleet.start(3)
        selection = deploy(work, server, hosts)
        record = read_record(work / "state")
        assert record is not None
        by_name = {m.name: h for m, h in zip(record.members, hosts, strict=True)}
        request = UpgradeRequest(NEW, release=server.url(NEW))
        upgrade(selection, request)  # warm-up: installs 3.5.30 beside 3.5.16 on every host
        floor(record, by_name, OLD)
        for _ in range(runs):
            measure(record, in_thread(lambda: floor(record, by_name, NEW)), plain)
            floor(record, by_name, OLD)
            measure(record, in_thread(lambda: etcdforge_run(selection, request, steps)), ours)
            floor(record, by_name, OLD)
    return plain, ours


def report(plain: Figures, ours: Figures) -> None:
    print(f"3 hosts: etcd {OLD} -> {NEW} under a writer")
    print(plain.line("floor").replace(" roll ", " total "))
    print(ours.line("etcdforge").replace(" roll ", " total "))
    took = statistics.median(ours.durations) / statistics.median(plain.durations)
    stall = max(ours.stalls)
    print(
        f"  etcdforge/floor total {took:.2f}x (goal <= 1.30x); etcdforge longest stall "
        f"{stall:.3f} s (goal < 1 s); lost writes {ours.missing} (goal 0)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="upgrade on 3 hosts: time, stall, lost writes")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", action="store_true", help="print etcdforge's steps, timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-upgrade-") as tmp:
        report(*bench(Path(tmp), args.runs, args.steps))


if __name__ == "__main__":
    main()
