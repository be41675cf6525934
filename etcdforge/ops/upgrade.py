"""`etcdforge upgrade --to X.Y.Z`: move a live cluster to another etcd release, safely.

The path is checked first (`upgrade_path`: patch or one minor at a time, the hop's own
preconditions, no downgrade, no known-bad target), from what every member runs now, before any
binary is looked for and before anything changes. Then one procedure (`ops.upgrade_run`).

- **Hosts**: the spec's etcd section with the target (`--release`/`--sha256` when the spec names
  its release itself) goes through `apply`, so `upgrade` and "change etcd.version, then apply"
  are one code path: the release is installed beside the old one and each member is switched
  right before its restart.
- **Local clusters**: the target is a binary on this machine, `--binary PATH` (or the spec's
  `etcd.binary` once it names the target); each member is switched by its own `etcd.binary` file,
  and the cluster record names the new binary once every member runs it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from pathlib import Path

from etcdforge import advisories, snapshot
from etcdforge.binaries import EtcdBinary, Version, find_etcd, parse_version
from etcdforge.errors import BinaryError, ServiceError, SpecError
from etcdforge.ops.apply import apply, load_host_spec
from etcdforge.ops.cluster_versions import live_path, live_versions
from etcdforge.ops.health import HEALTH_TIMEOUT
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.runtime import settle_all
from etcdforge.ops.switch import LocalSwitch
from etcdforge.ops.target import Selection, record_to_change, spec_for_up
from etcdforge.ops.upgrade_run import (
    UpgradeOutcome,
    UpgradeRun,
    advised_versions,
    clear_progress,
    read_progress,
)
from etcdforge.record import ClusterRecord, write_record
from etcdforge.services.local import LocalRuntime, set_member_binary
from etcdforge.spec import EtcdSpec
from etcdforge.upgrade_path import UpgradePath, fmt


@dataclass(frozen=True)
class UpgradeResult:
    cluster: str
    target: str
    state_dir: Path
    path: str
    outcome: UpgradeOutcome | None  # None: nothing to upgrade
    advisories: tuple[str, ...]
    warnings: tuple[str, ...]
    spec_hint: str | None = None  # how to make the spec file name what now runs


@dataclass(frozen=True)
class UpgradeRequest:
    """What the user asked for: the target and, where needed, where its binaries are."""

    to: str
    binary: Path | None = None  # local clusters
    release: str | None = None  # clusters on hosts: a URL, tarball or directory
    sha256: str | None = None

    @property
    def target(self) -> Version:
        return parse_version(self.to)


def upgrade(
    selection: Selection,
    request: UpgradeRequest,
    dry_run: bool = False,
    progress: Progress = SILENT,
    timeout: float = HEALTH_TIMEOUT,
) -> UpgradeResult:
    record = record_to_change(selection, "upgrade")
    if record.on_hosts:
        return on_hosts(selection, record, request, dry_run, progress, timeout)
    if request.release is not None or request.sha256 is not None:
        raise SpecError(
            f"cluster {record.name} is a local cluster: --release and --sha256 are for clusters "
            "on hosts; name the new etcd with --binary PATH"
        )
    return asyncio.run(on_this_machine(selection, record, request, dry_run, progress, timeout))


# --- clusters on hosts: `apply` with the target release ------------------------------------


def target_etcd(current: EtcdSpec, request: UpgradeRequest) -> EtcdSpec:
    """The spec's etcd section, moved to the target release."""
    version = fmt(request.target)
    if request.release is not None:
        update = {"version": version, "release": request.release, "sha256": request.sha256}
        return current.model_copy(update=update)
    if current.version is not None and parse_version(current.version) == request.target:
        pin = request.sha256 or current.sha256
        return current.model_copy(update={"sha256": pin})
    if current.release is not None:
        raise SpecError(
            f"the spec's etcd.release names one release ({current.release}); pass --release "
            f"with etcd {version}'s tarball (a URL, a file or a directory), and --sha256 to pin it"
        )
    return current.model_copy(update={"version": version, "sha256": request.sha256})


async def _precheck(record: ClusterRecord, target: Version, allow_unsafe: bool) -> None:
    """Refuse an invalid path, or a member that does not answer, before any download or login."""
    silent = [n for n, found in (await live_versions(record)).items() if found is None]
    if silent and read_progress(record.layout) is None:
        urls = ", ".join(f"{n} ({record.member(n).client_url})" for n in silent)
        raise ServiceError(
            f"not upgrading: the cluster is not healthy ({urls} does not answer); bring every "
            "member back first (`etcdforge apply -f FILE`), then rerun"
        )

    async def unknown(_name: str) -> Version | None:
        return None

    await live_path(record, target, allow_unsafe, unknown)


def on_hosts(
    selection: Selection,
    record: ClusterRecord,
    request: UpgradeRequest,
    dry_run: bool,
    progress: Progress,
    timeout: float,
) -> UpgradeResult:
    spec, layout, _ = load_host_spec(selection, allow_even=True)
    asyncio.run(_precheck(record, request.target, spec.etcd.allow_unsafe_version))
    etcd = target_etcd(spec.etcd, request)
    result = apply(selection, dry_run, progress, timeout, allow_even=True, etcd=etcd)
    outcome = result.upgrade
    changed = {k: v for k, v in etcd.model_dump().items() if getattr(spec.etcd, k) != v}
    settings = ", ".join(f"etcd.{k}: {v}" for k, v in changed.items() if v is not None)
    return UpgradeResult(
        cluster=spec.name,
        target=request.to,
        state_dir=layout.root,
        path=outcome.path if outcome else f"every member runs etcd {request.to}: nothing to do",
        outcome=outcome,
        advisories=result.advisories,
        warnings=result.warnings,
        spec_hint=f"{selection.file}: set {settings}" if changed and settings else None,
    )


# --- local clusters: the supervisor's members, switched one by one --------------------------


def _target_binary(request: UpgradeRequest, spec_binary: Path | None) -> EtcdBinary:
    candidate = request.binary or spec_binary
    if candidate is None:
        raise SpecError(
            f"a local cluster upgrades to an etcd binary on this machine: pass --binary PATH "
            f"(its `etcd --version` must print {request.to})"
        )
    found = find_etcd(candidate.absolute())
    if found.version != request.target:
        origin = "--binary" if request.binary else "the spec's etcd.binary"
        raise BinaryError(
            f"{origin} {candidate} is etcd {fmt(found.version)}, not {request.to}; "
            f"pass --binary with the path of etcd {request.to}"
        )
    return found


def _finish_local(record: ClusterRecord, binary: Path, target: Version) -> None:
    """The record names the new binary; the members' own switch files are no longer needed."""
    spec = dict(record.spec)
    spec["etcd"] = {**dict(spec.get("etcd") or {}), "binary": str(binary)}
    write_record(record.layout, replace(record, binary=str(binary), version=fmt(target), spec=spec))
    for member in record.members:
        set_member_binary(record.layout.member(member.name), None)
    clear_progress(record.layout)


async def on_this_machine(
    selection: Selection,
    record: ClusterRecord,
    request: UpgradeRequest,
    dry_run: bool,
    progress: Progress,
    timeout: float,
) -> UpgradeResult:
    spec, _, _ = spec_for_up(selection, None, allow_even=True)
    runtime = LocalRuntime(record)
    if not dry_run:
        await settle_all(record, runtime)
    current = LocalSwitch(runtime, Path(record.binary))
    allow_unsafe = spec.etcd.allow_unsafe_version
    path = await live_path(record, request.target, allow_unsafe, current.version)
    if path is None:
        raise ServiceError(
            f"no member of cluster {record.name} answers or has a binary; `etcdforge up` first"
        )
    outcome, runs = None, Path(record.binary)
    if not path.done or read_progress(record.layout) is not None:
        binary = _binary_for(path, request, spec.etcd.binary, runtime)
        tools = snapshot.find_tools(binary)
        switch = LocalSwitch(runtime, binary.path)
        run = UpgradeRun(record, runtime, switch, path, lambda: tools, progress, timeout)
        outcome = await (run.plan() if dry_run else run.run())
        runs = binary.path
        if not dry_run:
            _finish_local(record, binary.path, request.target)
    result = _result(record, request, path, outcome)
    if selection.file is not None and spec.etcd.binary != runs:
        return replace(result, spec_hint=f"{selection.file}: set etcd.binary: {runs}")
    return result


def _binary_for(
    path: UpgradePath, request: UpgradeRequest, spec_binary: Path | None, runtime: LocalRuntime
) -> EtcdBinary:
    """The target binary; once every member runs it (a rerun), the one they were switched to."""
    if path.done and request.binary is None:
        return EtcdBinary(runtime.binary(next(iter(path.running))), path.target)
    return _target_binary(request, spec_binary)


def _result(
    record: ClusterRecord,
    request: UpgradeRequest,
    path: UpgradePath,
    outcome: UpgradeOutcome | None,
) -> UpgradeResult:
    return UpgradeResult(
        cluster=record.name,
        target=request.to,
        state_dir=record.layout.root,
        path=path.describe(),
        outcome=outcome,
        advisories=tuple(advisories.notes(advised_versions(path, outcome, path.target))),
        warnings=(path.warning,) if path.warning else (),
    )
