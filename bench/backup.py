"""Benchmark backups, restores and defragmentation on a ~200 MB database (local, 3 members).

A 3-member cluster (etcd 3.5.30 where test-env fetched it, else 3.5.1) is filled with ~200 MB of
live 1 MiB values, then, each measured against a floor in the same run, interleaved, medians of
`--runs`:

- backup: `etcdforge backup` (the CLI, as a user or the systemd timer runs it: follower choice,
  snapshot, fsync, `snapshot status`, sha256, sidecars, retention, the cluster lock) against
  `etcdctl snapshot save` alone from the same member (goal: at most 1.2x);
- restore: `etcdforge restore` of the 3 members (the CLI end to end: checks, stop, restore, start,
  health, HashKV verification) and its restore phase alone, against `etcdutl snapshot restore`
  run 3 times into fresh directories;
- defrag: the longest write stall during `etcdforge defrag --all` (followers first, leader last
  after hand-off) against `etcdctl defrag --cluster` (every member at once), seen by a writer
  that follows the leader and by one that spreads its writes over every member (retrying the
  next member on a failure, as the kube-apiserver's client does); 0 lost writes checked.

Run: .venv/bin/python bench/backup.py [--runs 3] [--mb 200]
"""

from __future__ import annotations

import argparse
import base64
import itertools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from etcdforge.client import EndpointStatus, EtcdClient, run
from etcdforge.ops.backup import backup, pick_source
from etcdforge.ops.cluster_restore import restore_cluster
from etcdforge.ops.down import down
from etcdforge.ops.target import Selection
from etcdforge.ops.up import up
from etcdforge.record import ClusterRecord, read_record
from tests.helpers import etcd_binary, run_cli, spec_data, write_spec
from tests.load import WriteLoad, tls_context

VALUE = 1 << 20


def timed(work: Callable[[], object]) -> float:
    started = time.monotonic()
    work()
    return time.monotonic() - started


def median(values: list[float]) -> str:
    runs = ", ".join(f"{v:.2f}" for v in values)
    return f"{statistics.median(values):6.2f} s (runs: {runs})"


def tools(record: ClusterRecord) -> tuple[Path, Path]:
    binary = Path(record.binary)
    return binary.with_name("etcdctl"), binary.with_name("etcdutl")


def tls_args(record: ClusterRecord) -> list[str]:
    layout = record.layout
    return [
        f"--cacert={layout.ca_cert}",
        f"--cert={layout.admin_cert}",
        f"--key={layout.admin_key}",
    ]


def fill(record: ClusterRecord, megabytes: int) -> None:
    layout = record.layout
    context = tls_context(layout.ca_cert, layout.admin_cert, layout.admin_key)
    value = base64.b64encode(os.urandom(VALUE)).decode()
    endpoint = record.endpoints[0]

    def put(index: int) -> None:
        key = base64.b64encode(f"/bench/big/{index:05d}".encode()).decode()
        with httpx.Client(verify=context, timeout=60) as client:
            reply = client.post(f"{endpoint}/v3/kv/put", json={"key": key, "value": value})
            reply.raise_for_status()

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(put, range(megabytes)))


def cli(selection: Selection, *args: str) -> None:
    assert selection.file is not None and selection.state_dir is not None
    result = run_cli(
        *args, "-f", str(selection.file), "--state-dir", str(selection.state_dir), timeout=900
    )
    if result.code != 0:
        raise SystemExit(f"etcdforge {' '.join(args)} failed: {result.stderr}")


def follower(record: ClusterRecord) -> str:
    """The member `etcdforge backup` snapshots: the same source for the floor."""

    async def statuses() -> list[EndpointStatus]:
        async with EtcdClient(record.endpoints, record.admin_tls) as client:
            return await client.statuses()

    chosen = pick_source(run(statuses()))
    return chosen.endpoint if chosen is not None else record.endpoints[0]


def bench_backup(selection: Selection, record: ClusterRecord, work: Path, runs: int) -> None:
    etcdctl, _ = tools(record)
    floor, operation, command = [], [], []
    for index in range(runs):
        target = work / f"floor-{index}.db"
        argv = [str(etcdctl), *tls_args(record), f"--endpoints={follower(record)}",
                "snapshot", "save", str(target)]  # fmt: skip
        floor.append(timed(lambda argv=argv: subprocess.run(argv, capture_output=True, check=True)))
        target.unlink()
        operation.append(timed(lambda: backup(selection)))
        command.append(timed(lambda: cli(selection, "backup")))
    size = next((work.parent / "state" / "backups").glob("*.db")).stat().st_size
    base = statistics.median(floor)
    print(f"backup of a {size / 1e6:.0f} MB database:")
    print(f"  floor  etcdctl snapshot save                {median(floor)}")
    print(f"  ours   ops.backup.backup (the operation)    {median(operation)}")
    print(f"  ours   etcdforge backup (CLI: + start, lock) {median(command)}")
    print(
        f"  ratio ours/floor: operation {statistics.median(operation) / base:.2f}x (goal <= 1.2x, "
        f"verification included), CLI {statistics.median(command) / base:.2f}x"
    )


class Phases:
    """A Progress that records when each phase starts."""

    def __init__(self) -> None:
        self.starts: dict[str, float] = {}

    def phase(self, name: str) -> None:
        self.starts[name] = time.monotonic()

    def step(self, where: str, message: str) -> None:
        pass


def bench_restore(selection: Selection, record: ClusterRecord, work: Path, runs: int) -> None:
    _, etcdutl = tools(record)
    snapshot = sorted((work.parent / "state" / "backups").glob("*.db"))[-1]
    floor, ours, phase, start, verify = [], [], [], [], []
    for index in range(runs):
        dirs = [work / f"restore-{index}-{i}" for i in range(3)]

        def three(dirs: list[Path] = dirs) -> None:
            for i, directory in enumerate(dirs):
                subprocess.run(
                    [str(etcdutl), "snapshot", "restore", str(snapshot), f"--data-dir={directory}",
                     f"--name=m{i + 1}", f"--initial-cluster={initial(record)}",
                     f"--initial-advertise-peer-urls={record.members[i].peer_url}"],
                    capture_output=True, check=True,
                )  # fmt: skip

        floor.append(timed(three))
        for directory in dirs:
            shutil.rmtree(directory)
        phases = Phases()
        started = time.monotonic()
        restore_cluster(selection, snapshot, progress=phases)
        ended = time.monotonic()
        ours.append(ended - started)
        phase.append(phases.starts["start"] - phases.starts["restore"])
        start.append(phases.starts["verify"] - phases.starts["start"])
        verify.append(ended - phases.starts["verify"])
    print("restore of 3 members:")
    print(f"  floor  etcdutl snapshot restore x3           {median(floor)}")
    print(f"  ours   its restore phase (stop + restore x3) {median(phase)}")
    print(f"         then start to healthy                 {median(start)}")
    print(f"         then verify (HashKV) and finish       {median(verify)}")
    print(f"  ours   etcdforge restore end to end          {median(ours)}")
    base = statistics.median(floor)
    print(
        f"  ratio ours/floor: restore phase {statistics.median(phase) / base:.2f}x, "
        f"end to end (start, health, verify included) {statistics.median(ours) / base:.2f}x"
    )


def initial(record: ClusterRecord) -> str:
    return ",".join(f"{m.name}={m.peer_url}" for m in record.members)


class LeaderWriter:
    """Writes through the member that leads, as a leader-aware client does: it looks the leader
    up again when a reply's raft term changes (a new leader), on an error, or when a write takes
    longer than a second; it never loses a write (the same key is retried)."""

    def __init__(self, record: ClusterRecord) -> None:
        layout = record.layout
        self.context = tls_context(layout.ca_cert, layout.admin_cert, layout.admin_key)
        self.endpoints = record.endpoints
        self.acks: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _leader(self, client: httpx.Client) -> str:
        for endpoint in self.endpoints:
            try:
                status = client.post(f"{endpoint}/v3/maintenance/status", json={}).json()
            except httpx.HTTPError:
                continue
            if status.get("leader") == status.get("header", {}).get("member_id"):
                return endpoint
        return self.endpoints[0]

    def _run(self) -> None:
        with httpx.Client(verify=self.context, timeout=1.0) as client:
            leader, term, index = self._leader(client), "", 0
            while not self.stop.is_set() and index < 200_000:
                key = base64.b64encode(f"/bench/lw/{index:06d}".encode()).decode()
                try:
                    reply = client.post(f"{leader}/v3/kv/put", json={"key": key, "value": "dg=="})
                    reply.raise_for_status()
                except httpx.HTTPError:
                    leader = self._leader(client)
                    continue
                self.acks.append(time.monotonic())
                index += 1
                now = reply.json().get("header", {}).get("raft_term", "")
                if term and now != term:
                    leader = self._leader(client)
                term = now

    def longest_stall(self, start: float, end: float) -> float:
        times = [t for t in self.acks if start <= t <= end]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def stalls(
    record: ClusterRecord, defrag: Callable[[], object], tag: str
) -> tuple[float, float, int]:
    layout = record.layout
    admin = (layout.ca_cert, layout.admin_cert, layout.admin_key)
    leader_writer = LeaderWriter(record)
    prefix = f"/bench/{tag}{time.monotonic_ns()}"
    with WriteLoad(record.endpoints, admin, prefix, reload=True) as spread:
        leader_writer.thread.start()
        time.sleep(1.0)
        started = time.monotonic()
        defrag()
        ended = time.monotonic()
        time.sleep(1.0)
        leader_writer.stop.set()
        leader_writer.thread.join(timeout=30)
    missing = sum(spread.missing(record.endpoints).values())
    return (
        leader_writer.longest_stall(started - 0.5, ended + 1.0),
        spread.longest_stall(started - 0.5, ended + 1.0),
        missing,
    )


def bench_defrag(selection: Selection, record: ClusterRecord, runs: int) -> None:
    etcdctl, _ = tools(record)
    argv = [str(etcdctl), *tls_args(record), f"--endpoints={','.join(record.endpoints)}",
            "defrag", "--cluster", "--command-timeout=300s"]  # fmt: skip
    results: dict[str, list[tuple[float, float, int]]] = {"floor": [], "ours": []}
    for _ in range(runs):
        plain = stalls(record, lambda: subprocess.run(argv, capture_output=True, check=True), "f")
        results["floor"].append(plain)
        ours = stalls(record, lambda: cli(selection, "defrag", "--all"), "o")
        results["ours"].append(ours)
    print("longest write stall while 3 members of the ~200 MB database are defragmented:")
    for name, label in (("floor", "etcdctl defrag --cluster"), ("ours", "etcdforge defrag --all")):
        leader = [r[0] for r in results[name]]
        spread = [r[1] for r in results[name]]
        lost = sum(r[2] for r in results[name])
        print(f"  {name:<5}  {label}")
        print(f"         writer through the leader:      {median(leader)}")
        print(f"         writer spread over every member: {median(spread)}; {lost} lost")
    ours_leader = statistics.median(r[0] for r in results["ours"])
    print(f"  goal: under 1 s through the leader (ours: {ours_leader:.2f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description="backup, restore and defrag on ~200 MB")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--version", default="3.5.30")
    args = parser.parse_args()
    binary = etcd_binary(args.version) or etcd_binary("3.5.1")
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-backup-") as tmp:
        work = Path(tmp) / "local"
        work.mkdir()
        spec = write_spec(work, spec_data("bench", 3, binary, backup={"keep_last": 2}))
        selection = Selection(file=spec, state_dir=work / "state")
        up(selection)
        record = read_record(work / "state")
        assert record is not None
        try:
            took = timed(lambda: fill(record, args.mb))
            print(f"filled {args.mb} x 1 MiB values in {took:.1f} s (etcd {record.version})")
            scratch = work / "scratch"
            scratch.mkdir()
            bench_backup(selection, record, scratch, args.runs)
            bench_restore(selection, read_record(work / "state") or record, scratch, args.runs)
            bench_defrag(selection, read_record(work / "state") or record, args.runs)
        finally:
            down(selection, purge=True)


if __name__ == "__main__":
    main()
