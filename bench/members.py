"""Benchmark `member replace` on 3 real hosts holding ~100 MB of keys, against a plain script.

A 3-host cluster (etcd 3.5.30) is filled with ~100 MB of keys. One follower is then lost (its
etcd stopped, its data dir deleted) and rebuilt, alternately by:

- floor: a shell script doing the same as the runbook, with etcdctl and systemctl over ssh:
  `member remove`, data dir recreated and the environment file switched to
  initial-cluster-state=existing, `member add --learner`, `systemctl start`, `member promote`
  retried until etcd accepts it, `endpoint health` until the member answers;
- etcdforge: `etcdforge member replace NAME -f cluster.yaml --yes` (its health gates, preflight,
  plan, and the files and services phases that follow included).

Per run, under a writer that records every acknowledged write (to the two members that stay):
the time from the start of the command until the new member is a healthy voter (polled from
outside), the command's whole duration, the longest gap between two acknowledged writes, and
the acknowledged writes missing on any member afterwards. Needs root (the test fleet).

For etcdforge, each run also times the interpreter and the imports the command needs, started
the same way under the same writer just before the command: what a Python CLI pays before its
first step, and the floor (bash and etcdctl) does not.

Run: .venv/bin/python bench/members.py [--runs 3] [--mb 100]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etcdforge.client import EtcdClient
from etcdforge.record import read_record
from etcdforge.tls import TLSFiles
from tests.apply_helpers import host_spec, publish, serve, write_yaml
from tests.fleet import Fleet, Host
from tests.helpers import release_dir, release_tarball, run_cli
from tests.load import WriteLoad, tls_context

VERSION = "3.5.30"
VALUE_SIZE = 64 * 1024
LIMIT = 600.0

FLOOR = r"""
set -euo pipefail
remote() { ssh -F /dev/null -i "$KEY" -o IdentitiesOnly=yes -o BatchMode=yes \
  -o UserKnownHostsFile="$KNOWN" "root@$ADDRESS" "$@"; }
id=$(etcdctl member list | awk -F', ' -v n="$NAME" '$3 == n {print $1}')
etcdctl member remove "$id" >/dev/null
remote 'systemctl stop etcd && install -d -m 0700 -o etcd -g etcd /var/lib/etcd &&
  sed -i "s/^ETCD_INITIAL_CLUSTER_STATE=.*/ETCD_INITIAL_CLUSTER_STATE=existing/" /etc/etcd/etcd.env'
new=$(etcdctl member add "$NAME" --peer-urls="$PEER" --learner | awk 'NR == 1 {print $2}')
remote 'systemctl start --no-block etcd'
for i in $(seq 3000); do  # a promote that timed out client-side may still have happened
  etcdctl member promote "$new" >/dev/null 2>&1 && break
  etcdctl member list | grep -q "^$new, started, .*, false$" && break
  [ "$i" -lt 3000 ] || { echo "$NAME was never promoted" >&2; exit 1; }
  sleep 0.2
done
for i in $(seq 3000); do
  ETCDCTL_ENDPOINTS="$ENDPOINT" etcdctl endpoint health >/dev/null 2>&1 && break
  [ "$i" -lt 3000 ] || { echo "$NAME never became healthy" >&2; exit 1; }
  sleep 0.2
done
"""


@dataclass
class Figures:
    voter: list[float] = field(default_factory=list)  # start -> healthy voter
    command: list[float] = field(default_factory=list)
    stalls: list[float] = field(default_factory=list)
    startup: list[float] = field(default_factory=list)
    missing: int = 0

    def line(self, name: str) -> str:
        runs = ", ".join(f"{v:.2f}" for v in self.voter)
        return (
            f"  {name:<10} healthy voter after {statistics.median(self.voter):6.2f} s "
            f"(runs: {runs}); command {statistics.median(self.command):6.2f} s; "
            f"longest write stall {max(self.stalls):.3f} s; {self.missing} acknowledged "
            "writes missing"
        )


def fill(endpoint: str, admin: tuple[Path, Path, Path], megabytes: int) -> None:
    """~`megabytes` MB of 64 KiB values under /bench/, 16 requests in flight."""
    count = megabytes * 1024 * 1024 // VALUE_SIZE
    value = base64.b64encode(os.urandom(VALUE_SIZE)).decode()

    async def run() -> None:
        async with httpx.AsyncClient(verify=tls_context(*admin), timeout=30) as client:
            queue = list(range(count))

            async def worker() -> None:
                while queue:
                    key = base64.b64encode(f"/bench/{queue.pop():06d}".encode()).decode()
                    reply = await client.post(
                        f"{endpoint}/v3/kv/put", json={"key": key, "value": value}
                    )
                    reply.raise_for_status()

            await asyncio.gather(*(worker() for _ in range(16)))

    asyncio.run(run())


class VoterWatch:
    """Polls from outside until member `name` (not `old_id`) is a voter that answers /health."""

    def __init__(self, endpoints: list[str], admin: tuple[Path, Path, Path], name: str) -> None:
        self.endpoints, self.admin, self.name = endpoints, admin, name
        self.old_id = self._member_id()
        self.started = time.monotonic()
        self.reached: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _member_id(self, voter_only: bool = False) -> str | None:
        with httpx.Client(verify=tls_context(*self.admin), timeout=2) as client:
            for endpoint in self.endpoints:
                try:
                    reply = client.post(f"{endpoint}/v3/cluster/member/list", json={}).json()
                except httpx.HTTPError:
                    continue
                for member in reply.get("members", []):
                    if member.get("name") == self.name and not (
                        voter_only and member.get("isLearner")
                    ):
                        return str(member["ID"])
                return None
        return None

    def _run(self) -> None:
        deadline = self.started + LIMIT
        while not self.stop.is_set() and time.monotonic() < deadline:
            found = self._member_id(voter_only=True)
            if found is not None and found != self.old_id and self._healthy():
                self.reached = time.monotonic() - self.started
                return
            time.sleep(0.05)

    def _healthy(self) -> bool:
        endpoint = self.endpoints[-1]
        try:
            with httpx.Client(verify=tls_context(*self.admin), timeout=2) as client:
                return str(client.get(f"{endpoint}/health").json().get("health")) == "true"
        except (httpx.HTTPError, ValueError):
            return False

    def wait(self) -> float:
        self.thread.join(timeout=LIMIT)
        if self.reached is None:
            raise SystemExit(f"{self.name} never became a healthy voter")
        return self.reached


def lose(host: Host) -> None:
    """The member's disk is gone: etcd stopped, its data dir deleted (and earlier copies)."""
    host.run("systemctl", "stop", "etcd")
    host.run("sh", "-c", "rm -rf /var/lib/etcd /var/lib/etcd.removed-*")


def healthy_without_leading(
    endpoints: list[str], admin: tuple[Path, Path, Path], lost: str
) -> None:
    """Before a run: every member healthy and the member to lose not leading."""

    async def check() -> bool:
        async with EtcdClient(endpoints, TLSFiles(*admin), timeout=2.0) as client:
            statuses = await client.statuses()
            if not all(s.healthy for s in statuses):
                return False
            leader = next((s for s in statuses if s.is_leader), None)
            if leader is not None and leader.endpoint == lost:
                other = next(s for s in statuses if s.endpoint != lost)
                body = {"targetID": other.member_id}
                await client.call(lost, "/v3/maintenance/transfer-leadership", body)
                return False
            return leader is not None

    for _ in range(600):
        if asyncio.run(check()):
            return
        time.sleep(0.2)
    raise SystemExit("the cluster did not become healthy between runs")


STARTUP = "import asyncssh, etcdforge.cli.members, etcdforge.ops.member_replace"


def startup_seconds(env: dict[str, str]) -> float:
    """The interpreter and the command's imports, started as the command is."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", STARTUP], env={**os.environ, **env}, check=True)
    return time.monotonic() - started


def run_once(
    name: str,
    into: Figures,
    command: list[str],
    env: dict[str, str],
    endpoints: list[str],
    admin: tuple[Path, Path, Path],
    host: Host,
    verbose: bool = False,
) -> None:
    healthy_without_leading(endpoints, admin, endpoints[-1])
    lose(host)
    with WriteLoad(endpoints[:2], admin, f"w{time.monotonic_ns()}", reload=True) as load:
        time.sleep(1.0)
        if name == "etcdforge":
            into.startup.append(startup_seconds(env))
        watch = VoterWatch(endpoints, admin, "etcd-3")
        code, timeline = timed_run(command, env, watch.started)
        took = time.monotonic() - watch.started
        if code != 0:
            raise SystemExit(f"{name} failed: {''.join(line for _, line in timeline)}")
        into.voter.append(watch.wait())
        into.command.append(took)
        print(f"  {name:<10} voter after {into.voter[-1]:.2f} s, command {took:.2f} s")
        if verbose:
            for at, line in timeline:
                print(f"    {at:6.2f} {line.rstrip()}")
        time.sleep(1.0)
    into.stalls.append(load.longest_stall(watch.started - 0.5))
    into.missing += sum(load.missing(endpoints).values())


def timed_run(
    command: list[str], env: dict[str, str], started: float
) -> tuple[int, list[tuple[float, str]]]:
    """Run a command; each line it writes to stderr with the time it arrived (its steps)."""
    proc = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    timeline = [(time.monotonic() - started, line) for line in proc.stderr]
    return proc.wait(timeout=LIMIT), timeline


def bench(work: Path, runs: int, megabytes: int) -> tuple[Figures, Figures]:
    tarball = release_tarball(VERSION)
    if tarball is None:
        raise SystemExit(f"etcd {VERSION} tarball missing: run scripts/test-env.sh")
    publish(work / "www", VERSION, tarball)
    floor, ours = Figures(), Figures()
    with serve(work / "www") as server, Fleet() as fleet:
        hosts = fleet.start(3)
        data = host_spec(
            "bench", hosts, server.url(VERSION), user="root", state_dir=str(work / "s")
        )
        spec = write_yaml(work / "cluster.yaml", data)
        env = {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
        deployed = run_cli("apply", "-f", str(spec), env=env, timeout=600)
        if deployed.code != 0:
            raise SystemExit(f"apply failed: {deployed.stderr}")
        record = read_record(work / "s")
        assert record is not None
        layout = record.layout
        admin = (layout.ca_cert, layout.admin_cert, layout.admin_key)
        endpoints = record.endpoints
        started = time.monotonic()
        fill(endpoints[0], admin, megabytes)
        print(f"filled ~{megabytes} MB in {time.monotonic() - started:.1f} s", flush=True)
        target = hosts[2]
        etcdctl = release_dir(VERSION) / "etcdctl"
        floor_env = {
            "PATH": f"{etcdctl.parent}:{os.environ['PATH']}",
            "ETCDCTL_API": "3",
            "ETCDCTL_ENDPOINTS": ",".join(endpoints[:2]),
            "ETCDCTL_CACERT": str(admin[0]),
            "ETCDCTL_CERT": str(admin[1]),
            "ETCDCTL_KEY": str(admin[2]),
            "KEY": str(target.key_path),
            "KNOWN": str(target.known_hosts),
            "ADDRESS": target.address,
            "NAME": "etcd-3",
            "PEER": record.members[2].peer_url,
            "ENDPOINT": endpoints[2],
        }
        ours_command = [sys.executable, "-m", "etcdforge", "member", "replace", "etcd-3"]
        ours_command += ["-f", str(spec), "--yes"]
        for index in range(runs):
            run_once("floor", floor, ["bash", "-c", FLOOR], floor_env, endpoints, admin, target)
            first = index == 0  # its steps' timeline shows where the time goes
            run_once("etcdforge", ours, ours_command, env, endpoints, admin, target, first)
    return floor, ours


def main() -> None:
    parser = argparse.ArgumentParser(description="member replace vs a plain script")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-members-") as tmp:
        floor, ours = bench(Path(tmp), args.runs, args.mb)
    print(f"3 hosts, ~{args.mb} MB: replace a member whose data is lost, under a writer")
    print(floor.line("floor"))
    print(ours.line("etcdforge"))
    voter = statistics.median(ours.voter) / statistics.median(floor.voter)
    command = statistics.median(ours.command) / statistics.median(floor.command)
    print(f"  ratio etcdforge/floor: healthy voter {voter:.2f}x, command {command:.2f}x")
    startup, floor_voter = statistics.median(ours.startup), statistics.median(floor.voter)
    rest = (statistics.median(ours.voter) - startup) / floor_voter
    print(
        f"  start-up alone (interpreter and imports, same load): {startup:.2f} s, "
        f"{startup / floor_voter:.2f}x of the floor's healthy voter; the rest {rest:.2f}x"
    )


if __name__ == "__main__":
    main()
