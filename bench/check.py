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
import statistics
import subprocess
import sys
import tempfile
import time
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


def floor(hosts: list[Host], etcdctl: Path, env: dict[str, str]) -> float:
    """kube-bench-equivalent work by hand: ssh ps/environ/stat per host, then etcdctl."""
    started = time.monotonic()
    sessions = [
        subprocess.Popen(
            h.ssh_argv("sudo", "-n", "sh", "-c", HOST_AUDIT),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for h in hosts
    ]
    for session in sessions:
        out, err = session.communicate(timeout=60)
        if session.returncode != 0 or "ETCD_CLIENT_CERT_AUTH=true" not in out:
            raise SystemExit(f"floor: host audit failed: {err or out}")
    for command in (["endpoint", "health"], ["endpoint", "status"], ["endpoint", "hashkv"]):
        subprocess.run(
            [str(etcdctl), "--command-timeout=10s", *command],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        )  # fmt: skip
    return time.monotonic() - started


def etcdforge_check(spec: Path, env: dict[str, str]) -> tuple[float, int]:
    started = time.monotonic()
    result = cli("check", "-f", str(spec), "-o", "json", env=env, ok=(0, 3))
    took = time.monotonic() - started
    report = json.loads(result.stdout)
    failing = [r for r in report["rows"] if r["result"] == "fail"]
    if failing:
        raise SystemExit(f"check failed on a healthy cluster: {failing}")
    return took, len(report["rows"])


def release(work: Path) -> tuple[str, Path]:
    tarball = release_tarball(PREFERRED)
    if tarball is not None:
        return PREFERRED, tarball
    return FALLBACK, build_tarball(work, FALLBACK, release_sources()[FALLBACK])


def main() -> None:
    parser = argparse.ArgumentParser(description="check on 3 real hosts vs the same audit by hand")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    floors: list[float] = []
    checks: list[float] = []
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
                floor(hosts, etcdctl, ctl_env)  # warm ssh host keys, page cache, etcd
                etcdforge_check(spec, env)
                for _ in range(args.runs):
                    floors.append(floor(hosts, etcdctl, ctl_env))
                    took, rows = etcdforge_check(spec, env)
                    checks.append(took)
                in_process = []
                for _ in range(3):
                    started = time.monotonic()
                    check(Selection(file=spec))
                    in_process.append(time.monotonic() - started)
            finally:
                cli("reset", "-f", str(spec), "--purge-data", "--yes", env=env)
    base, mine = statistics.median(floors), statistics.median(checks)
    print(
        f"etcdforge check on 3 hosts (etcd {version}), {args.runs} runs each, interleaved (medians)"
    )
    print(
        f"  floor by hand (ssh ps+environ+stat per host in parallel; etcdctl endpoint "
        f"health, status, hashkv): {base:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in floors)})"
    )
    print(
        f"  etcdforge check -o json (new process, {rows} rows): {mine:.3f} s  "
        f"(runs: {', '.join(f'{t:.3f}' for t in checks)})"
    )
    print(f"  ratio check / floor: {mine / base:.2f}  (goal <= 1.5)")
    print(f"  check in-process, imports warm (median of 3): {statistics.median(in_process):.3f} s")


if __name__ == "__main__":
    main()
