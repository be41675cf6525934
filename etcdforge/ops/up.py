"""`etcdforge up`: converge a local cluster to its spec and wait until every member is healthy.

Everything that can be checked is checked before the first write: the spec, the binary and its
version, the deployed record, and that no other process holds a member's ports. Then a plan of
idempotent steps runs (PKI, configs, record, starts), so a rerun after a crash only restarts what
is missing.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from etcdforge import render
from etcdforge.binaries import EtcdBinary, check_version, find_etcd, format_version
from etcdforge.errors import ServiceError, SpecError
from etcdforge.fsutil import PRIVATE_DIR, PRIVATE_FILE, atomic_write, ensure_dir
from etcdforge.layout import MemberLayout, StateLayout
from etcdforge.ops.cert_import import peer_allowed_cn, pki_steps
from etcdforge.ops.plan import Progress, Step, execute
from etcdforge.ops.target import Selection, spec_for_up
from etcdforge.record import ClusterRecord, MemberRecord, new_token, write_record
from etcdforge.services import local
from etcdforge.spec import ClusterSpec, MemberSpec

HEALTH_TIMEOUT = 60.0
HEALTH_POLL = 0.05


@dataclass(frozen=True)
class UpResult:
    cluster: str
    state_dir: Path
    version: str
    members: int
    started: tuple[str, ...]
    changed: tuple[str, ...]
    pending: tuple[str, ...]
    warnings: tuple[str, ...]


def member_files(files: MemberLayout) -> render.MemberFiles:
    return render.MemberFiles(
        data_dir=files.data_dir,
        server_cert=files.server_cert,
        server_key=files.server_key,
        peer_cert=files.peer_cert,
        peer_key=files.peer_key,
        trusted_ca=files.trusted_ca,
        peer_trusted_ca=files.peer_trusted_ca,
    )


def _same_members(spec: ClusterSpec, record: ClusterRecord) -> bool:
    wanted = [(m.name, m.client_url, m.peer_url) for m in spec.members]
    return wanted == [(m.name, m.client_url, m.peer_url) for m in record.members]


def check_against_record(spec: ClusterSpec, record: ClusterRecord | None) -> None:
    if record is None or _same_members(spec, record):
        return
    deployed = ", ".join(f"{m.name}={m.client_url}" for m in record.members)
    raise SpecError(
        f"cluster {spec.name} at {record.state_dir} was deployed with members {deployed}; "
        "`up` does not change membership: run `etcdforge down --purge` to start over"
    )


def port_in_use(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((address, port))
        except OSError:
            return True
    return False


def check_ports_free(spec: ClusterSpec, running: dict[str, int | None]) -> None:
    for member in spec.members:
        if running.get(member.name) is not None:
            continue
        for port in (member.client_port, member.peer_port):
            if port_in_use(member.address, port):
                raise ServiceError(
                    f"member {member.name}: {member.address}:{port} is already in use by another "
                    "process; stop it or give the member other addresses in the spec"
                )


def _flags_step(path: Path, flags: list[str], name: str) -> Step:
    """Keep the flags on disk: what a member runs with is inspectable and diffable."""
    data = "".join(f"{flag}\n" for flag in flags).encode()

    def done() -> bool:
        try:
            return path.read_bytes() == data
        except FileNotFoundError:
            return False

    return Step(
        f"write etcd flags for {name}", done, lambda: atomic_write(path, data, PRIVATE_FILE)
    )


def _dir_step(title: str, path: Path) -> Step:
    def done() -> bool:
        return path.is_dir() and (path.stat().st_mode & 0o777) == PRIVATE_DIR

    return Step(title, done, lambda: ensure_dir(path))


def _record_step(layout: StateLayout, record: ClusterRecord) -> Step:
    data = record.to_json()

    def done() -> bool:
        try:
            return layout.cluster_file.read_bytes() == data
        except FileNotFoundError:
            return False

    return Step("write the cluster record", done, lambda: write_record(layout, record))


def _start_step(
    binary: EtcdBinary,
    member: MemberSpec,
    files: MemberLayout,
    flags: list[str],
    started: list[str],
) -> Step:
    def run() -> None:
        local.start(binary.path, flags, files.pid_file, files.log_file)
        started.append(member.name)

    return Step(
        f"start {member.name}",
        lambda: local.running_pid(files.pid_file, files.data_dir) is not None,
        run,
    )


def build_record(
    spec: ClusterSpec, layout: StateLayout, binary: EtcdBinary, token: str
) -> ClusterRecord:
    return ClusterRecord(
        name=spec.name,
        token=token,
        binary=str(binary.path),
        version=format_version(binary.version),
        members=tuple(
            MemberRecord(m.name, m.client_url, m.peer_url, str(layout.member(m.name).data_dir))
            for m in spec.members
        ),
        spec=spec.model_dump(mode="json"),
        state_dir=str(layout.root),
    )


def up_steps(
    spec: ClusterSpec,
    layout: StateLayout,
    binary: EtcdBinary,
    record: ClusterRecord,
    started: list[str],
    pki_dir: Path | None = None,
) -> list[Step]:
    steps = [_dir_step("create the state directory", layout.root)]
    steps += [_dir_step("create the PKI directory", layout.pki_dir)]
    steps += pki_steps(spec, layout, pki_dir)
    # An imported PKI has one CA for both planes: pin the peer port to the peers' CN.
    allowed_cn = peer_allowed_cn(layout, pki_dir)
    flags = {}
    for member in spec.members:
        files = layout.member(member.name)
        settings = render.etcd_settings(
            spec, member, member_files(files), record.token, peer_allowed_cn=allowed_cn
        )
        flags[member.name] = render.as_flags(settings)
        steps.append(_dir_step(f"create the data directory of {member.name}", files.data_dir))
        steps.append(_flags_step(files.flags_file, flags[member.name], member.name))
    steps.append(_record_step(layout, record))
    steps += [
        _start_step(binary, m, layout.member(m.name), flags[m.name], started) for m in spec.members
    ]
    return steps


def up(
    selection: Selection,
    members: int | None = None,
    allow_even: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
    timeout: float = HEALTH_TIMEOUT,
    pki_dir: Path | None = None,
) -> UpResult:
    spec, layout, previous = spec_for_up(selection, members, allow_even)
    if spec.on_hosts:
        raise SpecError(
            f"cluster {spec.name}: members have ssh sections, so they run on real hosts; "
            "use `etcdforge apply -f FILE` (up runs local clusters)"
        )
    check_against_record(spec, previous)
    binary = find_etcd(spec.etcd.binary)
    warning = check_version(
        binary.version, dev_cluster=True, allow_unsafe=spec.etcd.allow_unsafe_version
    )
    running = {
        m.name: local.running_pid(layout.member(m.name).pid_file, layout.member(m.name).data_dir)
        for m in spec.members
    }
    check_ports_free(spec, running)
    token = previous.token if previous is not None else new_token(spec.name)
    record = build_record(spec, layout, binary, token)
    started: list[str] = []
    steps = up_steps(spec, layout, binary, record, started, pki_dir)
    result = execute(steps, progress, dry_run)
    if not dry_run:
        if progress:
            progress("wait for every member to be healthy")
        wait_healthy(record, timeout)
    return UpResult(
        cluster=spec.name,
        state_dir=layout.root,
        version=format_version(binary.version),
        members=len(spec.members),
        started=tuple(started),
        changed=result.changed,
        pending=result.pending,
        warnings=(warning,) if warning else (),
    )


def wait_healthy(record: ClusterRecord, timeout: float, check_alive: bool = True) -> None:
    """Poll /health on every member until all answer healthy, a member dies, or time runs out."""
    from etcdforge.client import EtcdClient

    layout = record.layout
    deadline = time.monotonic() + timeout

    async def poll() -> dict[str, str | None]:
        async with EtcdClient(record.endpoints, record.admin_tls, timeout=2.0) as client:
            last: dict[str, str | None] = {}
            while True:
                results = await asyncio.gather(*(client.health(e) for e in record.endpoints))
                last = {
                    e: err for e, (ok, err) in zip(record.endpoints, results, strict=True) if not ok
                }
                if not last or time.monotonic() > deadline:
                    return last
                if check_alive:
                    _raise_if_dead(record, layout)
                await asyncio.sleep(HEALTH_POLL)

    unhealthy = asyncio.run(poll())
    if unhealthy:
        endpoint, error = next(iter(unhealthy.items()))
        name = record.name_of(endpoint)
        raise ServiceError(
            f"member {name} not healthy after {timeout:.0f} s ({error}); "
            f"see {layout.member(name).log_file}"
        )


def _raise_if_dead(record: ClusterRecord, layout: StateLayout) -> None:
    for member in record.members:
        files = layout.member(member.name)
        if local.running_pid(files.pid_file, files.data_dir) is None:
            tail = local.log_tail(files.log_file, 1)
            reason = _log_message(tail) or "no log output"
            raise ServiceError(
                f"member {member.name} exited during start-up: {reason}; see {files.log_file}"
            )


def _log_message(line: str) -> str:
    """etcd logs JSON lines; surface just the message and error fields."""
    import json

    try:
        entry = json.loads(line)
    except ValueError:
        return line.strip()
    parts = [str(entry.get("msg", ""))]
    if entry.get("error"):
        parts.append(str(entry["error"]))
    return ": ".join(p for p in parts if p)
