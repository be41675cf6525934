"""`etcdforge plan` / `apply`: converge a cluster of real hosts to its spec, over SSH.

The phases, in order, so that a mistake anywhere stops before anything changes everywhere:

1. **spec and release**: the spec validated, the release downloaded, verified and cached here, a
   known-bad version refused;
2. **connect**: every host logged in to in parallel;
3. **preflight**: every check on every host (`ops.preflight`), before any host is touched;
4. **admin PKI**: the CAs, the leaves and the cluster record on the admin machine (CA keys never
   leave it);
5. **files**: every host's files in parallel (`ops.host_steps`): user, release, directories, its
   own keys and the CA certificates, the environment file, the unit;
6. **services**: members that are not running start together (a new cluster needs a quorum to
   become ready); members running with other settings, unit or binary restart one at a time
   under the one rolling policy (`ops.rolling`).

Every step checks live state first, and restarts are decided from the running process itself,
so a rerun after a kill resumes, and a rerun on a converged cluster changes and restarts nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from etcdforge import release as releases
from etcdforge.adoption import Adoption, read_adoption
from etcdforge.binaries import EtcdBinary, check_version, format_version
from etcdforge.errors import SpecError
from etcdforge.host_logins import close_all, connect_all
from etcdforge.hosts import Host, fan_out
from etcdforge.layout import StateLayout
from etcdforge.ops import preflight
from etcdforge.ops.admin_state import (
    Deployment,
    build_record,
    check_against_record,
    record_step,
    state_dir_steps,
)
from etcdforge.ops.cert_import import pki_steps
from etcdforge.ops.convert import Conversion, MemberState, Phase, reach_data_step
from etcdforge.ops.convert_report import AdoptionReport, conversion_report
from etcdforge.ops.desired import Desired, desired, service_action
from etcdforge.ops.health import HEALTH_TIMEOUT, wait_healthy
from etcdforge.ops.host_steps import host_steps
from etcdforge.ops.plan import SILENT, PlanResult, Progress, execute, execute_async
from etcdforge.ops.rolling import rolling_restart
from etcdforge.ops.target import Selection, spec_for_up
from etcdforge.record import ClusterRecord, new_token
from etcdforge.services.runtime import ActionKind, ServiceAction
from etcdforge.services.systemd import SystemdRuntime, unit_name
from etcdforge.spec import ClusterSpec, MemberSpec

#: Shown an adopted cluster's conversion before anything changes; raises to stop it.
Confirm = Callable[[AdoptionReport], None]


@dataclass(frozen=True)
class HostResult:
    member: str
    label: str
    changes: tuple[str, ...]  # done (apply) or pending with a diff summary (plan)
    service: ServiceAction | None


@dataclass(frozen=True)
class ApplyResult(Deployment):
    dry_run: bool
    admin_changes: tuple[str, ...]
    hosts: tuple[HostResult, ...]
    adoption: AdoptionReport | None = None  # an adopted cluster: findings, conversion, clients

    @property
    def changed_anything(self) -> bool:
        return bool(self.admin_changes) or any(h.changes or h.service for h in self.hosts)

    @property
    def restarted(self) -> list[str]:
        return [h.member for h in self.hosts if h.service and h.service.kind is ActionKind.RESTART]


def load_host_spec(
    selection: Selection, allow_even: bool = False
) -> tuple[ClusterSpec, StateLayout, ClusterRecord | None]:
    if selection.file is None:
        raise SpecError("this command needs the cluster YAML: pass -f cluster.yaml")
    spec, layout, previous = spec_for_up(selection, None, allow_even)
    if not spec.on_hosts:
        raise SpecError(
            f"{selection.file}: members have no ssh section, so this is a local cluster; "
            "use `etcdforge up -f` for it, or add ssh sections for real hosts"
        )
    return spec, layout, previous


def apply(
    selection: Selection,
    dry_run: bool = False,
    progress: Progress = SILENT,
    timeout: float = HEALTH_TIMEOUT,
    allow_even: bool = False,
    confirm: Confirm | None = None,
) -> ApplyResult:
    """`confirm`, for an adopted cluster still to convert: shown the conversion (and who is
    connected to the plain-http listener it drops) before anything changes; raises to stop."""
    spec, layout, previous = load_host_spec(selection, allow_even)
    check_against_record(spec, previous)
    assert selection.file is not None
    release = releases.resolve(spec.etcd, selection.file.parent)
    warning = check_version(
        release.version, dev_cluster=False, allow_unsafe=spec.etcd.allow_unsafe_version
    )
    run = Apply(spec, layout, release, dry_run, progress, timeout, read_adoption(layout), confirm)
    result = asyncio.run(run.converge(previous.token if previous is not None else None))
    return ApplyResult(
        cluster=spec.name,
        state_dir=layout.root,
        version=format_version(release.version),
        dry_run=dry_run,
        admin_changes=result[0],
        hosts=result[1],
        warnings=(warning,) if warning else (),
        adoption=run.report,
    )


async def probe_all(
    spec: ClusterSpec,
    hosts: dict[str, Host],
    token: str | None,
    takeover: Mapping[str, int] | None = None,
) -> dict[str, preflight.HostFacts]:
    """Probe and check every host; the first refusal (naming the others) stops everything.

    `takeover`: the pid of the adopted etcd each member still runs (its ports and data are ours).
    """
    paths = spec.host_paths
    facts: dict[str, preflight.HostFacts] = {}

    async def one(member: MemberSpec) -> None:
        host = hosts[member.name]
        found = await preflight.probe(host, paths)
        preflight.check(host, member, paths, found, token, (takeover or {}).get(member.name))
        facts[member.name] = found

    await fan_out(spec.members, lambda m: hosts[m.name].label, one)
    return facts


@dataclass
class Apply:
    """One `apply` (or `plan`, with dry_run): the phases of the module docstring, in order."""

    spec: ClusterSpec
    layout: StateLayout
    release: releases.Release
    dry_run: bool
    progress: Progress
    timeout: float
    adoption: Adoption | None = None  # an adopted cluster (`ops.convert` until converted)
    confirm: Confirm | None = None
    report: AdoptionReport | None = None

    async def converge(self, token: str | None) -> tuple[tuple[str, ...], tuple[HostResult, ...]]:
        self.progress.phase("connect")
        hosts = await connect_all(self.spec)
        try:
            self.progress.phase("preflight")
            conversion = self.conversion(hosts)
            states = await conversion.survey() if conversion else {}
            takeover = {n: s.runbook_pid for n, s in states.items() if s.runbook_pid}
            facts = await probe_all(self.spec, hosts, token, takeover)
            record = self.record(token or new_token(self.spec.name))
            await self.show_adoption(record, hosts, conversion, states)
            self.progress.phase("admin PKI")
            admin = self.admin_pki(record)
            wants = {
                m.name: desired(self.spec, self.layout, m, record.token) for m in self.spec.members
            }
            self.progress.phase("files")
            changes = await self.files(hosts, facts, wants, states)
            runtime = SystemdRuntime(hosts, unit_name(self.spec.host_paths))
            found = await self.service_actions(runtime, wants)
            actions = conversion.actions(states, found) if conversion else found
            if not self.dry_run:
                self.progress.phase("services")
                if conversion:
                    await conversion.run(record, runtime, found, self.progress, self.timeout)
                else:
                    await self.services(record, runtime, actions)
        finally:
            await close_all(hosts)
        done = admin.pending if self.dry_run else admin.changed
        results = tuple(
            HostResult(m.name, hosts[m.name].label, changes[m.name], actions[m.name])
            for m in self.spec.members
        )
        return done, results

    def conversion(self, hosts: dict[str, Host]) -> Conversion | None:
        if self.adoption is None or self.adoption.converted:
            return None
        return Conversion(self.adoption, hosts, self.spec.host_paths, self.layout)

    async def show_adoption(
        self,
        record: ClusterRecord,
        hosts: dict[str, Host],
        conversion: Conversion | None,
        states: Mapping[str, MemberState],
    ) -> None:
        """`plan` of an adopted cluster reports it; `apply` shows a conversion to `confirm`."""
        asking = conversion is not None and self.confirm is not None and not self.dry_run
        if self.adoption is None or not (self.dry_run or asking):
            return
        reasons = {n: conversion.reason(s) for n, s in states.items()} if conversion else {}
        self.report = await conversion_report(self.adoption, record, hosts, states, reasons)
        if asking and self.confirm is not None:
            self.confirm(self.report)

    def record(self, token: str) -> ClusterRecord:
        """The record names each member's data dir on its host, not a path on this machine."""
        binary = EtcdBinary(Path(self.spec.host_paths.bin_dir) / "etcd", self.release.version)
        data_dir = Path(self.spec.host_paths.data_dir)
        return build_record(self.spec, self.layout, binary, token, data_dir)

    def admin_pki(self, record: ClusterRecord) -> PlanResult:
        steps = [
            *state_dir_steps(self.layout),
            *pki_steps(self.spec, self.layout),  # an imported PKI is verified, never reissued
            record_step(self.layout, record),
        ]
        return execute(steps, self.progress, self.dry_run, where="admin")

    async def files(
        self,
        hosts: dict[str, Host],
        facts: dict[str, preflight.HostFacts],
        wants: dict[str, Desired],
        states: Mapping[str, MemberState],
    ) -> dict[str, tuple[str, ...]]:
        paths = self.spec.host_paths

        async def one(member: MemberSpec) -> tuple[str, ...]:
            host = hosts[member.name]
            state = states.get(member.name)
            taking_over = state is not None and state.phase is not Phase.CONVERTED
            steps = host_steps(
                self.spec, host, facts[member.name], self.release, wants[member.name], taking_over
            )
            steps += [reach_data_step(host, paths)] if taking_over else []
            result = await execute_async(steps, self.progress, self.dry_run, where=host.label)
            return result.pending if self.dry_run else result.changed

        changes = await fan_out(self.spec.members, lambda m: hosts[m.name].label, one)
        return {m.name: c for m, c in zip(self.spec.members, changes, strict=True)}

    async def service_actions(
        self, runtime: SystemdRuntime, wants: dict[str, Desired]
    ) -> dict[str, ServiceAction | None]:
        names = [m.name for m in self.spec.members]
        paths = self.spec.host_paths
        found = await asyncio.gather(
            *(service_action(runtime, n, paths, self.release, wants[n]) for n in names)
        )
        return dict(zip(names, found, strict=True))

    async def services(
        self,
        record: ClusterRecord,
        runtime: SystemdRuntime,
        actions: dict[str, ServiceAction | None],
    ) -> None:
        await converge_services(record, runtime, actions, self.progress, self.timeout)


async def converge_services(
    record: ClusterRecord,
    runtime: SystemdRuntime,
    actions: dict[str, ServiceAction | None],
    progress: Progress,
    timeout: float,
) -> None:
    """Start what is stopped (all together), then roll what runs with stale settings."""
    to_start = [n for n, a in actions.items() if a is not None and a.kind is ActionKind.START]
    to_restart = {
        n: "; ".join(a.reasons)
        for n, a in actions.items()
        if a is not None and a.kind is ActionKind.RESTART
    }
    if to_start:
        for name in to_start:
            progress.step(runtime.label(name), f"start {runtime.unit}")
        await fan_out(to_start, runtime.label, runtime.start)
    if to_start or not to_restart:
        progress.step("cluster", "wait for every member to be healthy")
        await wait_healthy(record, runtime, timeout)
    await rolling_restart(record, runtime, to_restart, progress, timeout)
