"""One rolling upgrade of a live cluster, written once for local and host clusters.

1. **health gate**: every member healthy (members a killed run left stopped are started first);
2. **snapshot**: a verified snapshot saved on the admin machine and kept, its path printed; a
   rerun of the same upgrade keeps the one it took;
3. **members**, one at a time under the one rolling policy (`ops.rolling`: followers first, the
   leader last after handing leadership off): stop, switch the binary (the old one stays), start,
   then wait until it is healthy, its raft index has caught up with the leader's and it reports
   the new version. A member that does not is rolled back to its old binary and the upgrade
   stops with one line;
4. **verify**: the cluster version has reached the target's minor, and every member's HashKV at
   one revision agrees.

What it has done lives in the members themselves (the version each runs) and in
`<state>/upgrade.json` (target and snapshot), so a rerun after a kill at any point resumes:
members already on the target are skipped, a snapshot already taken is kept.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from etcdforge import snapshot
from etcdforge.binaries import Version
from etcdforge.client import EtcdClient
from etcdforge.errors import EtcdClientError, EtcdforgeError, ServiceError
from etcdforge.fsutil import PRIVATE_DIR, PRIVATE_FILE, atomic_write, ensure_dir
from etcdforge.layout import StateLayout
from etcdforge.ops.cluster_versions import live_versions
from etcdforge.ops.health import leader_or_none, require_healthy, wait_healthy
from etcdforge.ops.plan import Progress
from etcdforge.ops.rolling import followers_first, rolling_restart
from etcdforge.ops.switch import BinarySwitch
from etcdforge.record import ClusterRecord
from etcdforge.services.runtime import MemberRuntime
from etcdforge.upgrade_path import UpgradePath, fmt

POLL = 0.1
CLUSTER_VERSION_TIMEOUT = 60.0  # etcd re-evaluates the cluster version every few seconds
HASH_ATTEMPTS = 50


class UpgradeFailed(ServiceError):
    """A member did not come up on the new version (rolled back), or a check after failed."""


@dataclass(frozen=True)
class InProgress:
    """`<state>/upgrade.json`: an upgrade under way, and the snapshot taken before it."""

    target: str
    snapshot: str


def read_progress(layout: StateLayout) -> InProgress | None:
    try:
        payload = json.loads(layout.upgrade_file.read_text())
        return InProgress(str(payload["target"]), str(payload["snapshot"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: a new snapshot is taken and the file rewritten


def write_progress(layout: StateLayout, progress: InProgress) -> None:
    data = json.dumps({"target": progress.target, "snapshot": progress.snapshot}) + "\n"
    atomic_write(layout.upgrade_file, data.encode(), PRIVATE_FILE)


def clear_progress(layout: StateLayout) -> None:
    layout.upgrade_file.unlink(missing_ok=True)


@dataclass(frozen=True)
class UpgradeOutcome:
    """What an upgrade did, or (dry run) would do."""

    path: str
    snapshot: Path | None
    order: tuple[str, ...]
    dry_run: bool
    new_snapshot: bool = True
    cluster_version: str | None = None
    hash_revision: int | None = None


def advised_versions(
    path: UpgradePath | None, outcome: UpgradeOutcome | None, target: Version
) -> list[Version]:
    """The versions whose advisories to print: before an upgrade (a plan, a dry run) what runs
    and the target, to pick a good target by; after it only the target, since nothing else
    runs now."""
    if path is None or (outcome is not None and not outcome.dry_run):
        return [target]
    return [*path.running.values(), target]


def snapshot_name(layout: StateLayout, oldest: Version, target: Version) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return layout.snapshots_dir / f"pre-upgrade-{stamp}-v{fmt(oldest)}-to-v{fmt(target)}.db"


@dataclass
class UpgradeRun:
    record: ClusterRecord
    runtime: MemberRuntime
    switch: BinarySwitch
    path: UpgradePath
    tools: Callable[[], snapshot.SnapshotTools]  # the target's etcdctl/etcdutl, found on demand
    progress: Progress
    timeout: float
    upgraded: list[str] = field(default_factory=list)

    @property
    def layout(self) -> StateLayout:
        return self.record.layout

    @property
    def target(self) -> Version:
        return self.path.target

    def planned_snapshot(self) -> tuple[Path, bool]:
        """The snapshot this upgrade keeps: the one a cut-short run took, or a new one."""
        existing = read_progress(self.layout)
        if existing and existing.target == fmt(self.target) and Path(existing.snapshot).is_file():
            return Path(existing.snapshot), False
        return snapshot_name(self.layout, self.path.oldest, self.target), True

    @property
    def in_progress(self) -> bool:
        return read_progress(self.layout) is not None

    async def plan(self) -> UpgradeOutcome:
        order = followers_first(self.path.pending, await leader_or_none(self.record))
        path, new = self.planned_snapshot()
        return UpgradeOutcome(self.path.describe(), path, tuple(order), True, new)

    async def run(self) -> UpgradeOutcome:
        """Gate, snapshot, members, verify; the caller clears the progress file once it has
        recorded the new version (`clear_progress`)."""
        await self.start_stopped()
        self.progress.phase("health gate")
        self.progress.step("cluster", f"{self.path.describe()}; every member must be healthy")
        await require_healthy(self.record, self.runtime, "upgrading", self.timeout)
        self.progress.phase("snapshot")
        saved, new = await self.take_snapshot()
        self.progress.phase("members")
        order = await self.roll(saved)
        self.progress.phase("verify")
        cluster_version = await self.wait_cluster_version()
        revision = await self.compare_hashes(saved)
        return UpgradeOutcome(
            self.path.describe(), saved, tuple(order), False, new, cluster_version, revision
        )

    async def start_stopped(self) -> None:
        """A run killed between stopping and starting a member left it down: start it again
        (on whatever it was switched to) before judging the cluster's health."""
        if not self.in_progress:
            return
        for member in self.record.members:
            if not await self.runtime.is_running(member.name):
                label = self.runtime.label(member.name)
                self.progress.step(label, f"start {self.runtime.service_name(member.name)} again")
                await self.runtime.start(member.name)
        await wait_healthy(self.record, self.runtime, self.timeout)

    async def take_snapshot(self) -> tuple[Path, bool]:
        path, new = self.planned_snapshot()
        if not new:
            self.progress.step("admin", f"keep the snapshot this upgrade took first: {path}")
            return path, False
        tools = self.tools()
        ensure_dir(self.layout.snapshots_dir, PRIVATE_DIR)
        leader = await leader_or_none(self.record)
        source = self.record.member(leader).client_url if leader else self.record.endpoints[0]
        self.progress.step("admin", f"save a snapshot of {leader or source} to {path}")
        await asyncio.to_thread(snapshot.save, tools, source, self.record.admin_tls, path)
        info = await asyncio.to_thread(snapshot.status, tools, path)
        self.progress.step(
            "admin", f"snapshot verified: revision {info.revision}, {info.total_keys} keys"
        )
        write_progress(self.layout, InProgress(fmt(self.target), str(path)))
        return path, True

    async def roll(self, saved: Path) -> list[str]:
        live = await live_versions(self.record)
        target = fmt(self.target)
        pending = [n for n in self.path.pending if (live.get(n) or ("?", ""))[0] != target]
        reasons = {n: f"etcd {fmt(self.path.running[n])} -> {target}" for n in pending}

        async def action(name: str) -> None:
            await self.upgrade_member(name, saved)

        return await rolling_restart(
            self.record, self.runtime, reasons, self.progress, self.timeout, action
        )

    async def upgrade_member(self, name: str, saved: Path) -> None:
        runtime, label = self.runtime, self.runtime.label(name)
        old = await self.switch.current(name)
        self.progress.step(label, f"stop {runtime.service_name(name)}")
        await runtime.stop(name)
        self.progress.step(label, self.switch.describe(name, self.switch.target))
        await self.switch.point(name, self.switch.target)
        self.progress.step(label, f"start {runtime.service_name(name)} on etcd {fmt(self.target)}")
        await runtime.start(name)
        try:
            await self.wait_upgraded(name)
        except EtcdforgeError as exc:
            await self.roll_back(name, old, str(exc), saved)
        self.upgraded.append(name)

    async def wait_upgraded(self, name: str) -> None:
        """Healthy, on the target version, and caught up with the leader's raft index."""
        await wait_healthy(self.record, self.runtime, self.timeout)
        endpoint = self.record.member(name).client_url
        wanted = fmt(self.target)
        deadline = time.monotonic() + self.timeout
        async with EtcdClient(self.record.endpoints, self.record.admin_tls, timeout=3.0) as client:
            statuses = await client.statuses()
            leader_index = max((s.raft_index or 0 for s in statuses if s.is_leader), default=0)
            seen = "no answer"
            for _ in range(int(self.timeout / POLL) + 10):
                try:
                    version = (await client.versions(endpoint))[0]
                except EtcdClientError as exc:  # a blip right after it turned healthy
                    version, seen = "", str(exc)
                index = (await client.status(endpoint)).raft_index or 0
                if version == wanted and index >= leader_index:
                    return
                if version:
                    seen = f"it reports etcd {version}, raft index {index} of {leader_index}"
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(POLL)
        raise ServiceError(
            f"not on etcd {wanted} and caught up after {self.timeout:.0f} s ({seen})"
        )

    async def roll_back(self, name: str, old: str | None, why: str, saved: Path) -> None:
        runtime, label, target = self.runtime, self.runtime.label(name), fmt(self.target)
        done = f"; already on {target}: {', '.join(self.upgraded)}" if self.upgraded else ""
        tail = f"{done}; snapshot kept at {saved}; fix the release or binary, then rerun"
        if old is None:
            raise UpgradeFailed(f"member {label} did not come up on etcd {target} ({why}){tail}")
        self.progress.step(label, f"did not come up on etcd {target}: roll back to {old}")
        try:
            await runtime.stop(name)
            await self.switch.point(name, old)
            await runtime.start(name)
            await wait_healthy(self.record, runtime, self.timeout)
        except EtcdforgeError as exc:
            raise UpgradeFailed(
                f"member {label} did not come up on etcd {target} ({why}), and rolling it back "
                f"to {old} failed too ({exc}){tail}"
            ) from None
        raise UpgradeFailed(
            f"member {label} did not come up on etcd {target} ({why}); rolled it back to {old} "
            f"and stopped the upgrade{tail}"
        )

    async def wait_cluster_version(self) -> str:
        """Every member reports the target's minor as the cluster version (etcd raises it once
        all members run the new minor)."""
        wanted = f"{self.target[0]}.{self.target[1]}.0"
        self.progress.step("cluster", f"wait for the cluster version {wanted}")
        deadline = time.monotonic() + CLUSTER_VERSION_TIMEOUT
        seen: set[str] = set()
        while time.monotonic() < deadline:
            live = await live_versions(self.record)
            seen = {found[1] if found else "?" for found in live.values()}
            if seen == {wanted}:
                return wanted
            await asyncio.sleep(0.5)
        raise UpgradeFailed(
            f"every member runs etcd {fmt(self.target)} but the cluster version is still "
            f"{', '.join(sorted(seen))} after {CLUSTER_VERSION_TIMEOUT:.0f} s; check the members' "
            "logs, then rerun"
        )

    async def compare_hashes(self, saved: Path) -> int:
        """HashKV of every member at one revision: the same keyspace everywhere."""
        tools = self.tools()
        async with EtcdClient(self.record.endpoints, self.record.admin_tls) as client:
            revision = (await client.range(b"\0", b"\0", count_only=True)).revision
        self.progress.step("cluster", f"compare every member's HashKV at revision {revision}")
        problem = ""
        for _ in range(HASH_ATTEMPTS):
            try:
                hashes = await asyncio.to_thread(
                    snapshot.hash_kv, tools, self.record.endpoints, self.record.admin_tls, revision
                )
            except snapshot.SnapshotError as exc:  # a member still applying up to `revision`
                problem = str(exc)
                await asyncio.sleep(0.2)
                continue
            if len({h.compact_revision for h in hashes}) > 1:  # a compaction in between
                problem = "members compacted at different revisions"
                await asyncio.sleep(0.2)
                continue
            if len({h.hash for h in hashes}) == 1:
                return revision
            found = ", ".join(f"{self.record.name_of(h.endpoint)} {h.hash}" for h in hashes)
            raise UpgradeFailed(
                f"members disagree on the keyspace at revision {revision} ({found}): stop "
                f"writers and compare them with the snapshot {saved} before anything else"
            )
        raise UpgradeFailed(f"could not compare HashKV at revision {revision}: {problem}")
