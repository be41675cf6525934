"""`etcdforge up`: converge a local cluster to its spec and wait until every member is healthy.

Everything that can be checked is checked before the first write: the spec, the binary and its
version, the deployed record, that no other process holds a member's ports, and that the
membership change (members added to or removed from the spec) is safe. Then membership changes
run one at a time (`ops.member_local`, `ops.membership`), then a plan of idempotent steps (PKI,
configs, record, starts), so a rerun after a crash only does what is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from dataclasses import dataclass, replace
from pathlib import Path

from etcdforge import render
from etcdforge.binaries import EtcdBinary, check_version, find_etcd, format_version, parse_version
from etcdforge.errors import ServiceError, SpecError
from etcdforge.layout import StateLayout
from etcdforge.ops.admin_state import (
    Deployment,
    build_record,
    dir_step,
    record_step,
    state_dir_steps,
)
from etcdforge.ops.cert_import import peer_allowed_cn, pki_steps
from etcdforge.ops.health import HEALTH_TIMEOUT, wait_healthy
from etcdforge.ops.member_local import flags_step, membership
from etcdforge.ops.member_phase import MembershipResult, converge_membership, same_members
from etcdforge.ops.member_record import read_replacement
from etcdforge.ops.membership import (
    CAUTIOUS,
    MemberOptions,
)
from etcdforge.ops.plan import SILENT, Progress, Step, execute
from etcdforge.ops.runtime import settle_all
from etcdforge.ops.target import Selection, deployed_spec, spec_for_up
from etcdforge.record import ClusterRecord, new_token, read_record
from etcdforge.services.local import LocalRuntime
from etcdforge.spec import ClusterSpec


@dataclass(frozen=True)
class UpResult(Deployment):
    members: int
    started: tuple[str, ...]
    changed: tuple[str, ...]
    pending: tuple[str, ...]
    membership: tuple[str, ...] = ()  # membership changes done, or planned with why (dry run)


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


def check_same_release(previous: ClusterRecord, binary: EtcdBinary) -> None:
    """`up` never changes a cluster's etcd version: `upgrade` does, along a checked path, with
    a snapshot first and one member at a time."""
    deployed = parse_version(previous.version)
    if binary.version == deployed:
        return
    wanted = format_version(binary.version)
    how = (
        f"run `etcdforge upgrade --to {wanted} --binary {binary.path}`, or set"
        if binary.version > deployed
        else "downgrades are refused:"
    )
    raise SpecError(
        f"cluster {previous.name} runs etcd {previous.version} ({previous.binary}) but the "
        f"spec's etcd binary {binary.path} is {wanted}: `up` never changes versions; {how} "
        f"etcd.binary: {previous.binary} in the spec"
    )


def _start_step(runtime: LocalRuntime, name: str, started: list[str]) -> Step:
    def run() -> None:
        asyncio.run(runtime.start(name))
        started.append(name)

    return Step(f"start {name}", lambda: runtime.pid(name) is not None, run, phase="start")


def up_steps(
    spec: ClusterSpec,
    layout: StateLayout,
    record: ClusterRecord,
    started: list[str],
    pki_dir: Path | None = None,
) -> list[Step]:
    steps = [*state_dir_steps(layout), *pki_steps(spec, layout, pki_dir)]
    steps = [replace(step, phase="PKI") for step in steps]
    # An imported PKI has one CA for both planes: pin the peer port to the peers' CN.
    allowed_cn = peer_allowed_cn(layout, pki_dir)
    files_steps = []
    for member in spec.members:
        files = layout.member(member.name)
        state = record.member(member.name).initial_state
        settings = render.etcd_settings(
            spec,
            member,
            files,
            record.token,
            state,
            peer_allowed_cn=allowed_cn,
            version=parse_version(record.version),
        )
        title = f"create the data directory of {member.name}"
        files_steps.append(dir_step(title, files.data_dir))
        files_steps.append(flags_step(files.flags_file, render.as_flags(settings), member.name))
    files_steps.append(record_step(layout, record))
    steps += [replace(step, phase="member files") for step in files_steps]
    runtime = LocalRuntime(record)
    steps += [_start_step(runtime, m.name, started) for m in spec.members]
    return steps


def up(
    selection: Selection,
    members: int | None = None,
    allow_even: bool = False,
    dry_run: bool = False,
    progress: Progress = SILENT,
    timeout: float = HEALTH_TIMEOUT,
    pki_dir: Path | None = None,
    options: MemberOptions = CAUTIOUS,
) -> UpResult:
    spec, layout, previous = spec_for_up(selection, members, allow_even)
    if spec.on_hosts:
        raise SpecError(
            f"cluster {spec.name}: members have ssh sections, so they run on real hosts; "
            "use `etcdforge apply -f FILE` (up runs local clusters)"
        )
    binary = find_etcd(spec.etcd.binary)
    if previous is not None:
        check_same_release(previous, binary)
    warning = check_version(
        binary.version, dev_cluster=True, allow_unsafe=spec.etcd.allow_unsafe_version
    )
    token = previous.token if previous is not None else new_token(spec.name)
    runtime = LocalRuntime(build_record(spec, layout, binary, token, previous=previous))
    if previous is not None and not dry_run:
        asyncio.run(settle_all(previous, LocalRuntime(previous)))
    check_ports_free(spec, {m.name: runtime.pid(m.name) for m in spec.members})
    started: list[str] = []
    changes = MembershipResult()
    if previous is not None:
        options = dataclasses.replace(options, allow_even=allow_even)
        changes = _membership(spec, layout, previous, options, progress, timeout, dry_run)
        previous = read_record(layout.root) or previous
    record = build_record(spec, layout, binary, token, previous=previous)
    steps = up_steps(spec, layout, record, started, pki_dir)
    result = execute(steps, progress, dry_run)
    if not dry_run:
        progress.phase("health")
        progress.step("cluster", "wait for every member to be healthy")
        asyncio.run(wait_healthy(record, runtime, timeout))
    return UpResult(
        cluster=spec.name,
        state_dir=layout.root,
        version=format_version(binary.version),
        members=len(spec.members),
        started=tuple(started),
        changed=result.changed + changes.steps * (not dry_run),
        pending=result.pending,
        warnings=((warning,) if warning else ()) + changes.warnings,
        membership=changes.steps,
    )


def _membership(
    spec: ClusterSpec,
    layout: StateLayout,
    previous: ClusterRecord,
    options: MemberOptions,
    progress: Progress,
    timeout: float,
    dry_run: bool,
) -> MembershipResult:
    """Members joined and left, from the live member list; none when nothing can have changed."""
    unchanged = same_members(spec, previous) and read_replacement(layout) is None
    runtime = LocalRuntime(previous)
    stopped = all(runtime.pid(m.name) is None for m in previous.members)
    if unchanged and stopped:
        return MembershipResult()  # the start steps below bring the members back
    if stopped and not dry_run and read_replacement(layout) is None:
        # A stopped cluster (`down`) comes back as deployed first, then its members change.
        progress.phase("deployed members")
        execute(up_steps(deployed_spec(previous), layout, previous, []), progress)
        asyncio.run(wait_healthy(previous, runtime, timeout))
    changes = membership(spec, layout, previous, progress, timeout)
    return asyncio.run(converge_membership(changes, layout, options, progress, dry_run))
