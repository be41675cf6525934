"""Benchmark `etcdforge apply` on real test hosts (tests/fleet.py: systemd-nspawn + sshd).

- apply from nothing to healthy on 3 hosts and on 5 hosts (release download from a loopback
  HTTP server, PKI, upload of the ~20 MB tarball to every host, start): hosts are worked in
  parallel, so the 5/3 ratio should stay near 1.0;
- a no-op `apply` on the deployed cluster (login, preflight, every check, health), median of 3.

Needs root (network namespaces, systemd-nspawn). Every host is reset and powered off at the end.
Run: .venv/bin/python bench/apply.py
"""

from __future__ import annotations

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


def measure(hosts: list[Host], url: str, work: Path) -> tuple[float, float]:
    data = host_spec(
        f"bench{len(hosts)}", hosts, url, etcd={"allow_unsafe_version": True},
        state_dir=str(work / f"state{len(hosts)}"),
    )  # fmt: skip
    spec = write_yaml(work / f"cluster{len(hosts)}.yaml", data)
    env = {"ETCDFORGE_CACHE_DIR": str(work / f"cache{len(hosts)}")}  # cold cache: real download
    try:
        first = cli("apply", "-f", str(spec), env=env)
        noop = statistics.median(cli("apply", "-f", str(spec), env=env) for _ in range(3))
    finally:
        cli("reset", "-f", str(spec), "--purge-data", "--yes", env=env)
    return first, noop


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-") as tmp:
        work = Path(tmp)
        tarball = build_tarball(work, VERSION, release_sources()[VERSION])
        publish(work / "www", VERSION, tarball)
        with serve(work / "www") as server, Fleet(user="deploy") as fleet:
            hosts = fleet.start(5)
            url = server.url(VERSION)
            three, noop3 = measure(hosts[:3], url, work)
            five, noop5 = measure(hosts, url, work)
    print(f"apply, nothing -> healthy, 3 hosts: {three:6.2f} s")
    print(f"apply, nothing -> healthy, 5 hosts: {five:6.2f} s   ratio 5/3: {five / three:.2f}")
    print(f"no-op apply, 3 hosts (median of 3): {noop3:6.2f} s")
    print(f"no-op apply, 5 hosts (median of 3): {noop5:6.2f} s")


if __name__ == "__main__":
    main()
