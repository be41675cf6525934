"""Benchmark `etcdforge check` on 3 real hosts against the same audit done by hand.

The floor, measured in the same run and interleaved with `check` so machine noise hits both, is
the work an operator does without etcdforge for the kube-bench part and the health part:

- per host, all hosts in parallel, one ssh session (as the sudo user): `ps` of etcd's command
  line, its `ETCD_*` environment (`/proc/PID/environ`, as kube-bench reads it), `stat` of the
  data dir and of the key files;
- then `etcdctl endpoint health`, `endpoint status` and `endpoint hashkv` on the 3 endpoints.

`etcdforge check -f SPEC -o json` runs as a new process each time (interpreter start-up and
imports included) and does every check (CIS, listeners, versions, certificates, health, storage,
HashKV consistency, clock). Goal: at most 1.5x the floor. Also shown: the same check run inside
this process with its imports warm, to separate start-up from work.

Needs root (network namespaces, systemd-nspawn). The hosts are reset and powered off at the end.
Run: .venv/bin/python bench/check.py [--runs 7]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etcdforge.ops.check import check
from etcdforge.ops.target import Selection
from tests.apply_helpers import (
    build_tarball,
    host_spec,
    publish,
    release_sources,
    serve,
    write_yaml,
)
from tests.fleet import Fleet, Host
from tests.helpers import etcdctl_binary, release_dir, release_tarball

PREFERRED = "3.5.30"
FALLBACK = "3.5.1"
HOST_AUDIT = (
    'pid=$(pgrep -x etcd); ps -o args= -p "$pid"; '
    "tr '\\0' '\\n' < /proc/$pid/environ | grep '^ETCD_'; "
    'stat -c "%n %a %U:%G" /var/lib/etcd /etc/etcd/pki/server.key /etc/etcd/pki/peer.key'
)


def cli(
    *args: str, env: dict[str, str], ok: tuple[int, ...] = (0,)
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "etcdforge", *args],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=600, check=False,
    )  # fmt: skip
    if result.returncode not in ok:
        raise SystemExit(
            f"etcdforge {' '.join(args)} failed ({result.returncode}):\n{result.stderr}"
        )
    return result


def etcdctl_env(spec: Path, env: dict[str, str]) -> dict[str, str]:
    exports = cli("env", "-f", str(spec), env=env).stdout
    found = dict(os.environ)
    for line in exports.splitlines():
        name, _, value = line.removeprefix("export ").partition("=")
        found[name] = value.strip("'")
    return found


@dataclass
class Series:
    """Wall time and admin-side CPU (this process's children, or itself) of repeated runs."""

    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.walls.append(wall)
        self.cpus.append(cpu)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    def line(self, name: str) -> str:
        runs = ", ".join(f"{t:.3f}" for t in self.walls)
        return f"  {name}\n      wall {self.wall:.3f} s, cpu {self.cpu:.3f} s  (wall runs: {runs})"


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measured(
    work: Callable[[], object], who: int = resource.RUSAGE_CHILDREN
) -> tuple[float, float]:
    cpu, started = cpu_seconds(who), time.monotonic()
    work()
    return time.monotonic() - started, cpu_seconds(who) - cpu


def host_audit(host: Host) -> subprocess.Popen[str]:
    return subprocess.Popen(
        host.ssh_argv("sudo", "-n", "sh", "-c", HOST_AUDIT),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def floor(hosts: list[Host], etcdctl: Path, env: dict[str, str], parallel: bool) -> None:
    """kube-bench-equivalent work by hand: ssh ps/environ/stat per host, then etcdctl."""
    if parallel:
        sessions = [host_audit(h) for h in hosts]
    for index, host in enumerate(hosts):
        session = sessions[index] if parallel else host_audit(host)
        out, err = session.communicate(timeout=60)
        if session.returncode != 0 or "ETCD_CLIENT_CERT_AUTH=true" not in out:
            raise SystemExit(f"floor: host audit of {host.address} failed: {err or out}")
    for command in (["endpoint", "health"], ["endpoint", "status"], ["endpoint", "hashkv"]):
        subprocess.run(
            [str(etcdctl), "--command-timeout=10s", *command],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        )  # fmt: skip


def etcdforge_check(spec: Path, env: dict[str, str]) -> int:
    """One `etcdforge check -o json` in a new process; every row but the backup hook passes."""
    result = cli("check", "-f", str(spec), "-o", "json", env=env, ok=(0, 3))
    report = json.loads(result.stdout)
    failing = [r for r in report["rows"] if r["result"] == "fail"]
    if failing:
        raise SystemExit(f"check failed on a healthy cluster: {failing}")
    return len(report["rows"])


def release(work: Path) -> tuple[str, Path]:
    tarball = release_tarball(PREFERRED)
    if tarball is not None:
        return PREFERRED, tarball
    return FALLBACK, build_tarball(work, FALLBACK, release_sources()[FALLBACK])


def main() -> None:
    parser = argparse.ArgumentParser(description="check on 3 real hosts vs the same audit by hand")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    by_hand, scripted, checks, in_process = Series(), Series(), Series(), Series()
    rows: list[int] = []
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-") as tmp:
        work = Path(tmp)
        version, tarball = release(work)
        publish(work / "www", version, tarball)
        with serve(work / "www") as server, Fleet(user="deploy") as fleet:
            hosts = fleet.start(3)
            extra = {"etcd": {"allow_unsafe_version": True}} if version == FALLBACK else {}
            data = host_spec(
                "benchcheck", hosts, server.url(version), state_dir=str(work / "state"), **extra
            )
            spec = write_yaml(work / "cluster.yaml", data)
            env = {"ETCDFORGE_CACHE_DIR": str(work / "cache")}
            cli("apply", "-f", str(spec), env=env)
            try:
                tools = release_dir(version) / "etcdctl"
                etcdctl = tools if tools.exists() else etcdctl_binary()
                ctl_env = etcdctl_env(spec, env)
                floor(hosts, etcdctl, ctl_env, parallel=True)  # warm page cache, etcd
                etcdforge_check(spec, env)
                for _ in range(args.runs):  # interleaved: load drift hits every series alike
                    by_hand.add(*measured(lambda: floor(hosts, etcdctl, ctl_env, False)))
                    scripted.add(*measured(lambda: floor(hosts, etcdctl, ctl_env, True)))
                    checks.add(*measured(lambda: rows.append(etcdforge_check(spec, env))))
                for _ in range(3):
                    run = lambda: check(Selection(file=spec))  # noqa: E731
                    in_process.add(*measured(run, resource.RUSAGE_SELF))
            finally:
                cli("reset", "-f", str(spec), "--purge-data", "--yes", env=env)
    print(f"etcdforge check on 3 hosts (etcd {version}), {args.runs} runs each, interleaved")
    print("medians of wall time and of admin-side CPU (user+sys of the processes run here)")
    print(by_hand.line("floor by hand: per host in turn, one ssh (ps, ETCD_* environ, stat); "
                       "then etcdctl endpoint health, status, hashkv"))  # fmt: skip
    print(scripted.line("floor scripted: the same with the 3 ssh sessions in parallel"))
    print(checks.line(f"etcdforge check -o json: new process, every check ({rows[-1]} rows)"))
    print(in_process.line("etcdforge check in-process, imports warm (3 runs)"))
    for name, base in (("by hand", by_hand), ("scripted", scripted)):
        print(
            f"  ratio check / floor {name}: wall {checks.wall / base.wall:.2f}, "
            f"cpu {checks.cpu / base.cpu:.2f}  (goal <= 1.5)"
        )


if __name__ == "__main__":
    main()
