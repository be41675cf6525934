"""Benchmark `etcdforge apply` on real test hosts (tests/fleet.py: systemd-nspawn + sshd).

- apply from nothing to healthy on 3 hosts and on 5 hosts (release download from a loopback
  HTTP server, PKI, upload of the ~20 MB tarball to every host, start): hosts are worked in
  parallel, so the 5/3 ratio should stay near 1.0;
- a no-op `apply` on the deployed cluster (login, preflight, every check, health), median of 3.

Needs root (network namespaces, systemd-nspawn). Every host is reset and powered off at the end.
Run: .venv/bin/python bench/apply.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.apply_helpers import (
    build_tarball,
    host_spec,
    publish,
    release_sources,
    serve,
    write_yaml,
)
from tests.fleet import Fleet, Host

VERSION = "3.5.1"


def cli(*args: str, env: dict[str, str]) -> float:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "etcdforge", *args],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=600, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"etcdforge {' '.join(args)} failed:\n{result.stderr}")
    return took


def measure(
    hosts: list[Host], url: str, work: Path, run: int, noop_runs: int
) -> tuple[float, float]:
    """One apply from nothing (cold release cache: a real download), then no-op applies."""
    tag = f"{len(hosts)}-{run}"
    data = host_spec(
        f"bench{len(hosts)}", hosts, url, etcd={"allow_unsafe_version": True},
        state_dir=str(work / f"state{tag}"),
    )  # fmt: skip
    spec = write_yaml(work / f"cluster{tag}.yaml", data)
    env = {"ETCDFORGE_CACHE_DIR": str(work / f"cache{tag}")}
    try:
        first = cli("apply", "-f", str(spec), env=env)
        noops = [cli("apply", "-f", str(spec), env=env) for _ in range(noop_runs)]
    finally:
        cli("reset", "-f", str(spec), "--purge-data", "--yes", env=env)
    return first, statistics.median(noops) if noops else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description="apply on 3 vs 5 real hosts")
    parser.add_argument("--runs", type=int, default=3, help="from-nothing applies per size")
    args = parser.parse_args()
    threes, fives, noop3, noop5 = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-") as tmp:
        work = Path(tmp)
        tarball = build_tarball(work, VERSION, release_sources()[VERSION])
        publish(work / "www", VERSION, tarball)
        with serve(work / "www") as server, Fleet(user="deploy") as fleet:
            hosts = fleet.start(5)
            url = server.url(VERSION)
            for run in range(args.runs):  # interleaved, so drift in machine load hits both sizes
                first, noop = measure(hosts[:3], url, work, run, 3 if run == 0 else 0)
                threes.append(first)
                noop3 += [noop] if run == 0 else []
                first, noop = measure(hosts, url, work, run, 3 if run == 0 else 0)
                fives.append(first)
                noop5 += [noop] if run == 0 else []
    ratios = [f / t for f, t in zip(fives, threes, strict=True)]
    three, five = statistics.median(threes), statistics.median(fives)
    print(f"apply, nothing -> healthy, {args.runs} runs each (medians)")
    print(f"  3 hosts: {three:6.2f} s   ({', '.join(f'{t:.2f}' for t in threes)})")
    print(f"  5 hosts: {five:6.2f} s   ({', '.join(f'{t:.2f}' for t in fives)})")
    paired = statistics.median(ratios)
    print(f"  ratio 5/3: {five / three:.2f} (median of per-run ratios {paired:.2f})")
    print(f"no-op apply (median of 3): 3 hosts {noop3[0]:.2f} s, 5 hosts {noop5[0]:.2f} s")


if __name__ == "__main__":
    main()
