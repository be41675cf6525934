"""Benchmark issuing a full PKI for 7 members against the cfssl CLI, in the same run.

A full set is 17 keys and certificates: for cfssl (the seed's way) one CA, a server and a peer
certificate per member and two clients (admin, kube-apiserver), each one
`cfssl gencert ... | cfssljson -bare NAME`; for etcdforge the PKI steps `etcdforge up` runs in
one process (a cluster CA, a peer CA, server and peer certificates per member, the admin
client), timed from process launch so interpreter start-up counts. Also timed: the drop-in
`etcdforge certs gencert` run once per certificate, exactly like the cfssl commands.

ECDSA P-256 and RSA 2048, each median of --runs (default 5) runs; ratios < 1 mean etcdforge is
faster. Nothing touches the network.
Run: .venv/bin/python bench/certs.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PYTHON = sys.executable
MEMBERS = 7
PROFILES = {
    "signing": {
        "default": {"expiry": "8760h"},
        "profiles": {
            name: {"expiry": "8760h", "usages": ["signing", "key encipherment", *usages]}
            for name, usages in (
                ("server", ["server auth", "client auth"]),
                ("peer", ["server auth", "client auth"]),
                ("client", ["client auth"]),
            )
        },
    }
}

ETCDFORGE_PKI = """
import sys, time
from pathlib import Path
from etcdforge.layout import StateLayout
from etcdforge.ops.certs import cluster_pki_steps
from etcdforge.ops.plan import execute
from etcdforge.spec import parse_spec

members = [{"name": f"m{i}", "address": f"127.0.9.{i}"} for i in range(1, 8)]
data = {"name": "bench", "members": members, "pki": {"key_algorithm": sys.argv[2]}}
spec = parse_spec(data, "bench")
start = time.perf_counter()
execute(cluster_pki_steps(spec, StateLayout(Path(sys.argv[1]))))
print(time.perf_counter() - start)
"""


def key_request(algo: str) -> dict[str, object]:
    return {"algo": "ecdsa", "size": 256} if algo == "ecdsa" else {"algo": "rsa", "size": 2048}


def write_inputs(directory: Path, algo: str) -> list[tuple[list[str], str, str]]:
    """CSR files and the (cfssl arguments, csr file, bare name) of the 17 certificates."""
    (directory / "ca-config.json").write_text(json.dumps(PROFILES))
    key = key_request(algo)
    (directory / "ca-csr.json").write_text(json.dumps({"CN": "bench-ca", "key": key}))
    jobs: list[tuple[list[str], str, str]] = [(["-initca"], "ca-csr.json", "ca")]
    signed = ["-ca", "ca.pem", "-ca-key", "ca-key.pem", "-config", "ca-config.json"]
    for i in range(1, MEMBERS + 1):
        hosts = [f"127.0.9.{i}", f"m{i}", "localhost", "127.0.0.1"]
        (directory / f"m{i}.json").write_text(
            json.dumps({"CN": f"m{i}", "hosts": hosts, "key": key})
        )
        jobs.append(([*signed, "-profile", "server"], f"m{i}.json", f"m{i}-server"))
        jobs.append(([*signed, "-profile", "peer"], f"m{i}.json", f"m{i}-peer"))
    for client in ("admin", "kube-apiserver"):
        (directory / f"{client}.json").write_text(json.dumps({"CN": client, "key": key}))
        jobs.append(([*signed, "-profile", "client"], f"{client}.json", client))
    return jobs


def time_cfssl(directory: Path, algo: str) -> float:
    jobs = write_inputs(directory, algo)
    start = time.perf_counter()
    for args, csr, bare in jobs:
        gen = subprocess.run(
            ["cfssl", "gencert", *args, csr], cwd=directory, capture_output=True, check=True
        )
        subprocess.run(
            ["cfssljson", "-bare", bare],
            cwd=directory,
            input=gen.stdout,
            capture_output=True,
            check=True,
        )
    return time.perf_counter() - start


def time_gencert(directory: Path, algo: str) -> float:
    jobs = write_inputs(directory, algo)
    start = time.perf_counter()
    for args, csr, bare in jobs:
        subprocess.run(
            [PYTHON, "-m", "etcdforge", "certs", "gencert", *args, "-bare", bare, csr],
            cwd=directory,
            capture_output=True,
            check=True,
        )
    return time.perf_counter() - start


def time_plan(directory: Path, algo: str) -> tuple[float, float]:
    """(seconds from process launch, seconds inside the process issuing) for up's PKI steps."""
    algorithm = "ecdsa-p256" if algo == "ecdsa" else "rsa-2048"
    start = time.perf_counter()
    proc = subprocess.run(
        [PYTHON, "-c", ETCDFORGE_PKI, str(directory / "state"), algorithm],
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    keys = list((directory / "state").rglob("*.key"))
    assert len(keys) == 2 + 1 + 2 * MEMBERS, len(keys)
    return elapsed, float(proc.stdout.strip())


def samples_of(runs: int, measure: Callable[[Path, str], Any], algo: str) -> list[Any]:
    samples = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="bench-certs-") as tmp:
            samples.append(measure(Path(tmp), algo))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if shutil.which("cfssl") is None or shutil.which("cfssljson") is None:
        sys.exit("cfssl and cfssljson are needed for the baseline: apt-get install golang-cfssl")
    version = subprocess.run(["cfssl", "version"], capture_output=True, text=True, check=True)
    print(f"full PKI for {MEMBERS} members (17 keys and certificates), median of {args.runs} runs")
    print(f"baseline: {version.stdout.splitlines()[0]} ({' '.join(version.stdout.split()[2:4])})")
    print()
    columns = ("cfssl CLI", "etcdforge in up", "ratio", "from launch", "ratio", "gencert x17")
    print(f"{'algorithm':<12}" + "".join(f"{c:>16}" for c in columns) + f"{'ratio':>8}")
    for algo, label in (("ecdsa", "ECDSA P-256"), ("rsa", "RSA 2048")):
        base = statistics.median(samples_of(args.runs, time_cfssl, algo))
        plans = samples_of(args.runs, time_plan, algo)
        launch = statistics.median(p[0] for p in plans)
        inside = statistics.median(p[1] for p in plans)
        drop_in = statistics.median(samples_of(args.runs, time_gencert, algo))
        print(
            f"{label:<12}{base:>15.3f}s{inside:>15.3f}s{inside / base:>16.2f}"
            f"{launch:>15.3f}s{launch / base:>16.2f}{drop_in:>15.3f}s{drop_in / base:>8.2f}"
        )
    print()
    print("ratio = etcdforge / cfssl (lower is faster). 'in up': issuing inside the `up` process;")
    print("'from launch': the same from interpreter start; gencert x17: one process per cert.")


if __name__ == "__main__":
    main()
