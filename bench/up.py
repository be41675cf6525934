"""Benchmark `etcdforge up` and `etcdforge status` against baselines measured in the same run.

- up: wall time from launching `etcdforge up` (fresh state, certificates included) until it
  returns with every member healthy, against a floor: a minimal script that starts the same etcd
  binary with the same flags and pre-made certificates and polls /health. 3 and 5 members.
- status: `etcdforge status -o json` against the real `etcdctl endpoint status --cluster`.

Only loopback addresses are used; every cluster started here is stopped and deleted.
Run: .venv/bin/python bench/up.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from etcdforge.ops.up import port_in_use

PYTHON = sys.executable
ETCDFORGE = [PYTHON, "-m", "etcdforge"]
HEALTH_DEADLINE = 60.0


def free_range(count: int) -> list[str]:
    for _ in range(200):
        base = f"127.{random.randint(100, 250)}.{random.randint(0, 255)}"
        addresses = [f"{base}.{i}" for i in range(1, count + 1)]
        if not any(port_in_use(a, p) for a in addresses for p in (2379, 2380)):
            return addresses
    raise RuntimeError("no free loopback range")


def write_spec(directory: Path, name: str, count: int) -> Path:
    members = [{"name": f"m{i + 1}", "address": a} for i, a in enumerate(free_range(count))]
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "members": members}))
    return path


def run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=True, timeout=120, **kwargs)  # type: ignore[call-overload]


def time_up(spec: Path, state: Path) -> float:
    start = time.perf_counter()
    run([*ETCDFORGE, "up", "-f", str(spec), "--state-dir", str(state)])
    elapsed = time.perf_counter() - start
    run([*ETCDFORGE, "down", "--purge", "-f", str(spec), "--state-dir", str(state)])
    return elapsed


# --- the floor: started as its own Python process, like etcdforge -------------------------------


def floor_main(template: Path) -> None:
    """Start etcd with a deployed cluster's flags on fresh data dirs; exit when all are healthy."""
    record = json.loads((template / "cluster.json").read_text())
    token = f"floor-{os.getpid()}-{time.monotonic_ns()}"
    procs = []
    for member in record["members"]:
        flags = (template / "members" / member["name"] / "etcd.flags").read_text().split()
        flags = [
            f"--initial-cluster-token={token}" if f.startswith("--initial-cluster-token=") else f
            for f in flags
        ]
        log = open(template / "members" / member["name"] / "floor.log", "ab")  # noqa: SIM115
        procs.append(subprocess.Popen([record["binary"], *flags], stdout=log, stderr=log))
    pki = template / "pki"
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    pending = [m["client_url"] for m in record["members"]]
    deadline = time.monotonic() + HEALTH_DEADLINE
    while pending and time.monotonic() < deadline:
        still = []
        for url in pending:
            try:
                with urllib.request.urlopen(f"{url}/health", context=context, timeout=1) as resp:
                    if json.loads(resp.read()).get("health") != "true":
                        still.append(url)
            except OSError:
                still.append(url)
        pending = still
        if pending:
            time.sleep(0.05)
    print(json.dumps({"pids": [p.pid for p in procs], "healthy": not pending}))


def time_floor(template: Path) -> float:
    """Fresh data dirs each time; stop the floor's members (by PID) afterwards."""
    for data in template.glob("members/*/data"):
        shutil.rmtree(data)
        data.mkdir(mode=0o700)
    start = time.perf_counter()
    out = run([PYTHON, __file__, "--floor", str(template)])
    elapsed = time.perf_counter() - start
    result = json.loads(out.stdout)
    for pid in result["pids"]:
        os.kill(pid, signal.SIGTERM)
    for pid in result["pids"]:
        for _ in range(200):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
    if not result["healthy"]:
        raise RuntimeError("floor cluster did not become healthy")
    return elapsed


def prepare_template(workdir: Path, count: int) -> tuple[Path, Path]:
    """Deploy once with etcdforge to get certificates and flags, then stop it (keep the files)."""
    spec = write_spec(workdir, f"floor{count}", count)
    state = workdir / f"floor{count}-state"
    run([*ETCDFORGE, "up", "-f", str(spec), "--state-dir", str(state)])
    run([*ETCDFORGE, "down", "-f", str(spec), "--state-dir", str(state)])
    return spec, state


def bench_up(workdir: Path, count: int, runs: int) -> dict[str, float]:
    _, template = prepare_template(workdir, count)
    up_times, floor_times, ratios = [], [], []
    for i in range(runs):
        spec = write_spec(workdir, f"up{count}-{i}", count)
        floor = time_floor(template)
        mine = time_up(spec, workdir / f"up{count}-{i}-state")
        floor_times.append(floor)
        up_times.append(mine)
        ratios.append(mine / floor)
    shutil.rmtree(template)
    return {
        "up_median_s": statistics.median(up_times),
        "floor_median_s": statistics.median(floor_times),
        "ratio_of_medians": statistics.median(up_times) / statistics.median(floor_times),
        "median_ratio": statistics.median(ratios),
    }


def bench_status(workdir: Path, runs: int) -> dict[str, float]:
    from etcdforge.binaries import distro_etcd

    spec = write_spec(workdir, "status", 3)
    state = workdir / "status-state"
    run([*ETCDFORGE, "up", "-f", str(spec), "--state-dir", str(state)])
    try:
        env_text = run([*ETCDFORGE, "env", "-f", str(spec), "--state-dir", str(state)]).stdout
        env = dict(os.environ)
        for line in env_text.splitlines():
            key, value = line.removeprefix("export ").split("=", 1)
            env[key] = value.strip("'")
        etcd = distro_etcd()
        etcdctl = str(etcd.parent / "etcdctl") if etcd else shutil.which("etcdctl") or "etcdctl"
        mine_cmd = [*ETCDFORGE, "status", "-o", "json", "-f", str(spec), "--state-dir", str(state)]
        ctl_cmd = [etcdctl, "endpoint", "status", "--cluster", "-w", "json"]
        mine, ctl = [], []
        for _ in range(runs):
            for cmd, sink in ((ctl_cmd, ctl), (mine_cmd, mine)):
                start = time.perf_counter()
                run(cmd, env=env)
                sink.append(time.perf_counter() - start)
    finally:
        run([*ETCDFORGE, "down", "--purge", "-f", str(spec), "--state-dir", str(state)])
    return {
        "status_median_s": statistics.median(mine),
        "etcdctl_median_s": statistics.median(ctl),
        "ratio": statistics.median(mine) / statistics.median(ctl),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        floor_main(args.floor)
        return
    with tempfile.TemporaryDirectory(prefix="etcdforge-bench-") as tmp:
        workdir = Path(tmp)
        os.environ["ETCDFORGE_STATE_HOME"] = str(workdir / "home")
        print(f"etcdforge up vs floor (bare etcd, pre-made certs, same flags), {args.runs} runs")
        for count in (3, 5):
            r = bench_up(workdir, count, args.runs)
            print(
                f"  {count} members: up {r['up_median_s']:.2f} s, "
                f"floor {r['floor_median_s']:.2f} s, "
                f"ratio of medians {r['ratio_of_medians']:.2f}x, "
                f"median ratio {r['median_ratio']:.2f}x (target <= 1.3x)"
            )
        s = bench_status(workdir, max(args.runs, 10))
        print(
            f"status: etcdforge {s['status_median_s'] * 1000:.0f} ms, etcdctl "
            f"{s['etcdctl_median_s'] * 1000:.0f} ms, ratio {s['ratio']:.2f}x (target <= 3x)"
        )


if __name__ == "__main__":
    main()
