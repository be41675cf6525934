"""`etcdforge plan` / `apply`: converge a cluster of real hosts to its spec, over SSH.

The phases, in order, so that a mistake anywhere stops before anything changes everywhere:

1. **spec and release**: the spec validated, the release downloaded, verified and cached here, a
   known-bad version refused;
2. **connect**: every host logged in to in parallel;
3. **preflight**: every check on every host (`ops.preflight`), before any host is touched;
4. **admin PKI**: the CAs, the leaves and the cluster record on the admin machine (CA keys never
   leave it);
   then **membership**: members the spec adds or drops join or leave the live cluster, one at a
   time (`ops.member_phase`, `ops.membership`; a joining host gets its files from
   `ops.member_hosts`);
5. **files**: every host's files in parallel (`ops.host_steps`): user, release (installed beside
   the others, not switched), directories, its own keys and the CA certificates, the
   environment file, the unit;
6. **services** (`ops.host_services`): each member switched to the release right before it
   starts or restarts; a version change takes the upgrade procedure (`ops.upgrade_run`), whose
   path (`upgrade_path`) is checked during preflight, before anything changes.

Every step checks live state first, and restarts are decided from the running process itself,
so a rerun after a kill resumes, and a rerun on a converged cluster changes and restarts nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from etcdforge import advisories, snapshot
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
    record_step,
    state_dir_steps,
)
from etcdforge.ops.cert_import import pki_steps
from etcdforge.ops.cluster_versions import live_path
from etcdforge.ops.convert import Conversion, MemberState, Phase, reach_data_step
from etcdforge.ops.convert_report import AdoptionReport, conversion_report
from etcdforge.ops.desired import Desired, desired, service_action
from etcdforge.ops.health import HEALTH_TIMEOUT
from etcdforge.ops.host_services import converge_services, upgrade_run
from etcdforge.ops.host_steps import host_steps
from etcdforge.ops.member_hosts import HostProvisioner, connect_leaving
from etcdforge.ops.member_phase import MembershipResult, converge_membership
from etcdforge.ops.membership import (
    CAUTIOUS,
    MemberOptions,
    Membership,
)
from etcdforge.ops.plan import SILENT, PlanResult, Progress, execute, execute_async
from etcdforge.ops.switch import HostSwitch
from etcdforge.ops.target import Selection, spec_for_up
from etcdforge.ops.upgrade_run import UpgradeOutcome, advised_versions
from etcdforge.record import ClusterRecord, new_token, read_record, write_record
from etcdforge.services.runtime import ActionKind, ServiceAction
from etcdforge.services.systemd import SystemdRuntime, unit_name
from etcdforge.spec import ClusterSpec, EtcdSpec, HostPathsSpec, MemberSpec
from etcdforge.upgrade_path import UpgradePath

#: Shown an adopted cluster's conversion before anything changes; raises to stop it.
Confirm = Callable[[AdoptionReport], None]


@dataclass(frozen=True)
class HostResult:
    member: str
    label: str
    changes: tuple[str, ...]  # done (apply) or pending with a diff summary (plan)
    service: ServiceAction | None


@dataclass(frozen=True)
class Converged:
    admin: tuple[str, ...]  # done (apply) or pending (plan)
    hosts: tuple[HostResult, ...]
    members: MembershipResult
    path: UpgradePath | None = None  # the version change, when the cluster already runs
    upgrade: UpgradeOutcome | None = None  # what the upgrade did, or would do (plan)


@dataclass(frozen=True)
class ApplyResult(Deployment):
    dry_run: bool
    admin_changes: tuple[str, ...]
    hosts: tuple[HostResult, ...]
    upgrade: UpgradeOutcome | None = None
    advisories: tuple[str, ...] = ()  # the versions of `upgrade_run.advised_versions`
    membership: tuple[str, ...] = ()  # membership changes done, or planned with why (plan)
    adoption: AdoptionReport | None = None  # an adopted cluster: findings, conversion, clients

    @property
    def changed_anything(self) -> bool:
        changed = bool(self.admin_changes) or any(h.changes or h.service for h in self.hosts)
        return changed or self.upgrade is not None or bool(self.membership)

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
    etcd: EtcdSpec | None = None,
    options: MemberOptions = CAUTIOUS,
    confirm: Confirm | None = None,
) -> ApplyResult:
    """`etcd` replaces the spec's etcd section: `upgrade --to` on hosts. `confirm`, for an
    adopted cluster still to convert: shown the conversion (and who is connected to the
    plain-http listener it drops) before anything changes; raises to stop."""
    spec, layout, previous = load_host_spec(selection, allow_even)
    if etcd is not None:
        spec = spec.model_copy(update={"etcd": etcd})
    assert selection.file is not None
    release = releases.resolve(spec.etcd, selection.file.parent)
    warning = check_version(
        release.version, dev_cluster=False, allow_unsafe=spec.etcd.allow_unsafe_version
    )
    options = dataclasses.replace(options, allow_even=allow_even)
    run = Apply(spec, layout, release, dry_run, progress, timeout, previous, options)
    run.adoption, run.confirm = read_adoption(layout), confirm
    result = asyncio.run(run.converge(previous))
    advised = advised_versions(result.path, result.upgrade, release.version)
    return ApplyResult(
        cluster=spec.name,
        state_dir=layout.root,
        version=format_version(release.version),
        dry_run=dry_run,
        admin_changes=result.admin,
        hosts=result.hosts,
        warnings=((warning,) if warning else ()) + result.members.warnings,
        membership=result.members.steps,
        adoption=run.report,
        upgrade=result.upgrade,
        advisories=tuple(advisories.notes(advised)),
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
    previous: ClusterRecord | None = None
    options: MemberOptions = CAUTIOUS
    adoption: Adoption | None = None  # an adopted cluster (`ops.convert` until converted)
    confirm: Confirm | None = None
    report: AdoptionReport | None = None

    async def converge(self, previous: ClusterRecord | None) -> Converged:
        token = previous.token if previous is not None else None
        self.progress.phase("connect")
        hosts = await connect_all(self.spec)
        leaving: dict[str, tuple[Host, HostPathsSpec]] = {}
        try:
            self.progress.phase("preflight")
            conversion = self.conversion(hosts)
            states = await conversion.survey() if conversion else {}
            takeover = {n: s.runbook_pid for n, s in states.items() if s.runbook_pid}
            facts = await probe_all(self.spec, hosts, token, takeover)
            switch = HostSwitch(hosts, self.spec.host_paths, self.release.tag)
            path = await self.version_path(previous, switch)
            members = MembershipResult()
            if self.previous is not None:
                leaving, notes = await self.connect_leaving()
                for note in notes:
                    self.progress.step("connect", note)
                members = await self.membership(hosts, facts, leaving)
                members = dataclasses.replace(members, warnings=(*notes, *members.warnings))
            record = self.record(token or new_token(self.spec.name))
            await self.show_adoption(record, hosts, conversion, states)
            self.progress.phase("admin PKI")
            admin = self.admin_pki(record)
            wants = {m.name: self.desired(m, record) for m in self.spec.members}
            self.progress.phase("files")
            changes = await self.files(hosts, facts, wants, states)
            runtime = SystemdRuntime(hosts, unit_name(self.spec.host_paths))
            found = await self.service_actions(runtime, wants)
            actions = conversion.actions(states, found) if conversion else found
            actions.update({name: None for name in members.joining})  # they join as learners
            upgrade = upgrade_run(
                record, runtime, switch, path, self.tools, self.progress, self.timeout
            )
            if self.dry_run:
                outcome = await upgrade.plan() if upgrade is not None else None
            elif conversion:
                self.progress.phase("services")
                await conversion.run(record, runtime, found, self.progress, self.timeout)
                outcome = None
            else:
                self.progress.phase("services")
                outcome = await converge_services(
                    record, runtime, switch, actions, upgrade, self.progress, self.timeout
                )
        finally:
            await close_all({**hosts, **{n: h for n, (h, _) in leaving.items()}})
        results = tuple(
            HostResult(m.name, hosts[m.name].label, changes[m.name], actions[m.name])
            for m in self.spec.members
        )
        done = admin.pending if self.dry_run else admin.changed
        return Converged(done, results, members, path, outcome)

    async def version_path(
        self, previous: ClusterRecord | None, switch: HostSwitch
    ) -> UpgradePath | None:
        """The version change, checked before anything changes: a refused path stops here."""
        if previous is None:
            return None
        allow_unsafe = self.spec.etcd.allow_unsafe_version
        path = await live_path(previous, self.release.version, allow_unsafe, switch.version)
        if path is not None:
            self.progress.step("cluster", path.describe())
        return path

    def tools(self) -> snapshot.SnapshotTools:
        """The release's own etcdctl/etcdutl, unpacked on the admin machine."""
        directory = releases.admin_tools(self.release)
        return snapshot.find_tools(EtcdBinary(directory / "etcd", self.release.version))

    async def connect_leaving(self) -> tuple[dict[str, tuple[Host, HostPathsSpec]], list[str]]:
        if self.dry_run or self.previous is None:
            return {}, []
        return await connect_leaving(self.spec, self.previous)

    async def membership(
        self,
        hosts: dict[str, Host],
        facts: dict[str, preflight.HostFacts],
        leaving: dict[str, tuple[Host, HostPathsSpec]],
    ) -> MembershipResult:
        """Members joined and left, one at a time, before any other host changes."""
        assert self.previous is not None
        unit = unit_name(self.spec.host_paths)
        runtime = SystemdRuntime({**{n: h for n, (h, _) in leaving.items()}, **hosts}, unit)
        provisioner = HostProvisioner(
            self.spec,
            self.layout,
            self.release,
            self.previous.token,
            hosts,
            facts,
            leaving,
            self.progress,
        )
        changes = Membership(
            self.previous,
            self.spec,
            runtime,
            provisioner,
            lambda r: write_record(self.layout, r),
            self.progress,
            self.timeout,
        )
        found = await converge_membership(
            changes, self.layout, self.options, self.progress, self.dry_run
        )
        self.previous = read_record(self.layout.root) or self.previous
        return found

    def desired(self, member: MemberSpec, record: ClusterRecord) -> Desired:
        """What the member's host should hold; `version` picks the corruption checks."""
        state = record.member(member.name).initial_state
        version = self.release.version
        return desired(self.spec, self.layout, member, record.token, state, version=version)

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

    def wants(self, token: str) -> dict[str, Desired]:
        """What every host holds for a cluster with `token` whose members all start as one new
        cluster (a restore rebuilds every member)."""
        version = self.release.version
        return {
            m.name: desired(self.spec, self.layout, m, token, version=version)
            for m in self.spec.members
        }

    def record(self, token: str) -> ClusterRecord:
        """The record names each member's data dir on its host, not a path on this machine."""
        binary = EtcdBinary(Path(self.spec.host_paths.bin_dir) / "etcd", self.release.version)
        data_dir = Path(self.spec.host_paths.data_dir)
        return build_record(self.spec, self.layout, binary, token, data_dir, self.previous)

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
        states: Mapping[str, MemberState] | None = None,
    ) -> dict[str, tuple[str, ...]]:
        paths = self.spec.host_paths

        async def one(member: MemberSpec) -> tuple[str, ...]:
            host = hosts[member.name]
            state = (states or {}).get(member.name)
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
