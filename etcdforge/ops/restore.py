"""Restore one snapshot into every member of a cluster, local or on hosts, resumably.

A restore replaces the whole cluster: every member is stopped first, then each data dir is rebuilt
from the same snapshot with the cluster's token, initial cluster, name and peer URL (so the
members agree on one new cluster ID), then all start together. The old data dir of each member is
renamed aside (`<data dir>.pre-migrate`), never deleted, until the caller has verified the data
and calls `finish`. A marker per member under the caller's work dir, holding the snapshot's
sha256, lets an interrupted run skip members already restored from that snapshot.

`LocalTarget` works on the data dirs of a cluster started by `up`; `HostTarget` on hosts deployed
by `apply`, over SSH, with the restore tool installed on each host (`etcdutl` on 3.5+, `etcdctl`
on 3.4) and the options its own `--help` offers there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol, TypeVar

from etcdforge import release as releases
from etcdforge import snapshot
from etcdforge.binaries import EtcdBinary, parse_version
from etcdforge.errors import EtcdforgeError, HostError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, ensure_dir, remove_tree
from etcdforge.host_logins import close_all, connect_all
from etcdforge.hosts import Host, fan_out, last_line
from etcdforge.layout import MemberLayout
from etcdforge.ops.apply import probe_all
from etcdforge.ops.health import wait_healthy
from etcdforge.ops.plan import Step
from etcdforge.ops.target import Selection, deployed_spec
from etcdforge.record import ClusterRecord
from etcdforge.services import systemd
from etcdforge.services.local import LocalRuntime
from etcdforge.services.runtime import MemberRuntime
from etcdforge.services.systemd import SystemdRuntime

T = TypeVar("T")
ASIDE = ".pre-migrate"
START_TIMEOUT = 120.0
RESTORE_TIMEOUT = 900.0


class RestoreError(EtcdforgeError):
    """A member could not be restored from the snapshot."""


@dataclass(frozen=True)
class Snapshot:
    """One verified snapshot file on the admin machine, and how to restore it.

    `bump_by` > 0 restores with `--bump-revision` and `--mark-compacted` (watchers restart);
    `skip_hash_check` restores a member's database copied from its data dir (no hash appended).
    """

    path: Path
    sha256: str
    bump_by: int
    skip_hash_check: bool = False


class RestoreTarget(Protocol):
    """A cluster a snapshot can be restored into; `migrate` (and later `restore`) drive it."""

    record: ClusterRecord

    def tools(self) -> snapshot.SnapshotTools:
        """etcdctl/etcdutl on the admin machine, of the cluster's version (save, status)."""
        ...

    def features(self) -> snapshot.RestoreFeatures:
        """What the restore tool that will run offers (every member's, for hosts)."""
        ...

    def restorer(self) -> str: ...

    def forget(self) -> None:
        """A new snapshot: no member counts as restored any more."""
        ...

    def steps(self, snap: Snapshot) -> list[Step]:
        """Stop every member, then restore each; each step checks live state first."""
        ...

    def start(self) -> None:
        """Start every member on its restored data and wait until all are healthy."""
        ...

    def finish(self) -> None:
        """Drop the old data kept aside and the markers: the caller verified the new data."""
        ...


async def _awaited(work: Awaitable[T]) -> T:
    return await work


async def start_all(record: ClusterRecord, runtime: MemberRuntime, timeout: float) -> None:
    """Start every member together (a restored cluster needs a quorum), then wait for health."""
    names = [m.name for m in record.members]
    await fan_out(names, runtime.label, runtime.start)
    await wait_healthy(record, runtime, timeout)


class _Markers:
    """`restored-<member>` files holding the sha256 of the snapshot the member came from."""

    def __init__(self, work: Path, record: ClusterRecord) -> None:
        self.work = work
        self.names = [m.name for m in record.members]

    def path(self, name: str) -> Path:
        return self.work / f"restored-{name}"

    def matches(self, name: str, snap: Snapshot) -> bool:
        try:
            return self.path(name).read_text() == snap.sha256
        except FileNotFoundError:
            return False

    def mark(self, name: str, snap: Snapshot) -> None:
        ensure_dir(self.work)
        atomic_write(self.path(name), snap.sha256.encode(), PRIVATE_FILE)

    def forget(self) -> None:
        for name in self.names:
            self.path(name).unlink(missing_ok=True)


class _RuntimeTarget:
    """What both targets share: members stopped and started through the member runtime."""

    def __init__(
        self, selection: Selection, record: ClusterRecord, work: Path, runtime: MemberRuntime
    ) -> None:
        self.selection = selection
        self.record = record
        self.spec = deployed_spec(record)
        self.runtime = runtime
        self.markers = _Markers(work, record)

    def _run(self, work: Awaitable[T]) -> T:
        raise NotImplementedError

    def _restore_step(self, name: str, snap: Snapshot) -> Step:
        raise NotImplementedError

    def forget(self) -> None:
        self.markers.forget()

    def restored(self, name: str) -> snapshot.RestoredMember:
        peer_url = self.spec.member(name).peer_url
        return snapshot.RestoredMember(name, self.spec.initial_cluster, self.record.token, peer_url)

    def steps(self, snap: Snapshot) -> list[Step]:
        names = [m.name for m in self.record.members]
        return [self._stop_step(n) for n in names] + [self._restore_step(n, snap) for n in names]

    def _stop_step(self, name: str) -> Step:
        runtime = self.runtime
        return Step(
            f"stop {runtime.service_name(name)} on {runtime.label(name)}",
            lambda: not self._run(runtime.is_running(name)),
            lambda: self._run(runtime.stop(name)),
        )

    def start(self) -> None:
        self._run(start_all(self.record, self.runtime, START_TIMEOUT))


# --- a local cluster (`up`) ----------------------------------------------------------------------


class LocalTarget(_RuntimeTarget):
    """Members supervised on this machine; restored with the tools next to the cluster's etcd."""

    def __init__(self, selection: Selection, record: ClusterRecord, work: Path) -> None:
        self.local = LocalRuntime(record)
        super().__init__(selection, record, work, self.local)
        self._tools = snapshot.find_tools(
            EtcdBinary(Path(record.binary), parse_version(record.version))
        )

    def tools(self) -> snapshot.SnapshotTools:
        return self._tools

    def features(self) -> snapshot.RestoreFeatures:
        return snapshot.restore_features(self._tools)

    def restorer(self) -> str:
        return str(self._tools.restorer)

    def _run(self, work: Awaitable[T]) -> T:
        return asyncio.run(_awaited(work))

    def _files(self, name: str) -> MemberLayout:
        return self.record.layout.member(name)

    def _restore_step(self, name: str, snap: Snapshot) -> Step:
        files = self._files(name)
        data_dir = files.data_dir

        def done() -> bool:
            return self.markers.matches(name, snap) and data_dir.is_dir()

        def restore() -> None:
            if self.local.pid(name) is not None:
                raise RestoreError(f"member {name} is running again; stop it and rerun")
            fresh = data_dir.with_name(data_dir.name + ".restoring")
            remove_tree(fresh)
            snapshot.restore(
                self._tools,
                snap.path,
                fresh,
                self.restored(name),
                snap.bump_by,
                snap.skip_hash_check,
            )
            ensure_dir(fresh)
            aside = data_dir.with_name(data_dir.name + ASIDE)
            if data_dir.exists():
                if aside.exists():
                    remove_tree(data_dir)  # an earlier attempt's restore; the original is aside
                else:
                    data_dir.rename(aside)
            fresh.rename(data_dir)
            self.markers.mark(name, snap)

        return Step(f"restore {name} from the snapshot", done, restore)

    def finish(self) -> None:
        for member in self.record.members:
            data_dir = self._files(member.name).data_dir
            remove_tree(data_dir.with_name(data_dir.name + ASIDE))
        self.markers.forget()


# --- a cluster on hosts (`apply`) ----------------------------------------------------------------

# Read-only, as root: which restore tool is installed, and its options.
_TOOL_PROBE = r"""
bin=$1
if [ -x "$bin/etcdutl" ]; then tool="$bin/etcdutl"; elif [ -x "$bin/etcdctl" ]; then
  tool="$bin/etcdctl"; else echo "no etcdutl or etcdctl in $bin" >&2; exit 4; fi
echo "tool=$tool"
ETCDCTL_API=3 "$tool" snapshot restore --help 2>&1 || true
"""

# Restore into <data>.restoring, then swap: the old data dir goes aside (kept, not deleted), and
# the uploaded snapshot is removed whatever happens. $1 snapshot $2 data dir $3 user; then argv.
_RESTORE_SCRIPT = r"""
set -eu
snap=$1 data=$2 user=$3; shift 3
fresh=$data.restoring aside=$data.pre-migrate
trap 'rm -f -- "$snap"' EXIT
trap 'exit 129' HUP INT TERM PIPE
rm -rf -- "$fresh"
ETCDCTL_API=3 "$@" 2>&1 || { rc=$?; rm -rf -- "$fresh"; exit "$rc"; }
[ -d "$fresh/member" ] || { echo "Error: the restore left no $fresh/member"; exit 5; }
chown -R -- "$user:$user" "$fresh"
chmod 700 -- "$fresh"
if [ -e "$data" ]; then
  if [ -e "$aside" ]; then rm -rf -- "$data"; else mv -- "$data" "$aside"; fi
fi
mv -- "$fresh" "$data"
sync
"""


class HostTarget(_RuntimeTarget):
    """Members run by systemd on hosts; every host logged in to and probed before any change."""

    def __init__(
        self,
        selection: Selection,
        record: ClusterRecord,
        work: Path,
        runner: asyncio.Runner,
        hosts: dict[str, Host],
        tools: snapshot.SnapshotTools,
        restorers: dict[str, tuple[str, snapshot.RestoreFeatures]],
    ) -> None:
        paths = deployed_spec(record).host_paths
        super().__init__(selection, record, work, SystemdRuntime(hosts, systemd.unit_name(paths)))
        self.paths = paths
        self.data_dir = PurePosixPath(self.paths.data_dir)
        self.runner = runner
        self.hosts = hosts
        self._tools = tools
        self.restorers = restorers

    def _run(self, work: Awaitable[T]) -> T:
        return self.runner.run(_awaited(work))

    def tools(self) -> snapshot.SnapshotTools:
        return self._tools

    def features(self) -> snapshot.RestoreFeatures:
        found = [f for _, f in self.restorers.values()]
        return snapshot.RestoreFeatures(
            all(f.bump_revision for f in found), all(f.mark_compacted for f in found)
        )

    def restorer(self) -> str:
        return ", ".join(sorted({tool for tool, _ in self.restorers.values()}))

    def upload_path(self, snap: Snapshot) -> PurePosixPath:
        """Beside the data dir (same filesystem, root-only parent), never in a shared /tmp."""
        return self.data_dir.parent / f".{self.data_dir.name}.snapshot-{snap.sha256[:12]}.db"

    def _restore_step(self, name: str, snap: Snapshot) -> Step:
        host = self.hosts[name]
        user = self.paths.user
        upload = self.upload_path(snap)
        tool = self.restorers[name][0]

        async def in_place() -> bool:
            script = '[ -d "$1/member" ] && stat -c "%a %U" -- "$1"'
            found = await host.run(["sh", "-c", script, "sh", str(self.data_dir)], check=False)
            return found.code == 0 and found.out.strip() == f"700 {user}"

        def done() -> bool:
            return self.markers.matches(name, snap) and self._run(in_place())

        async def restore() -> None:
            if await self.runtime.is_running(name):
                raise RestoreError(
                    f"{host.label}: {self.paths.unit.name} is running again; stop it and rerun"
                )
            await host.write_file(upload, snap.path.read_bytes(), PRIVATE_FILE)
            fresh = PurePosixPath(f"{self.data_dir}.restoring")
            argv = snapshot.restore_argv(
                tool, upload, fresh, self.restored(name), snap.bump_by, snap.skip_hash_check
            )
            script = ["sh", "-c", _RESTORE_SCRIPT, "sh", str(upload), str(self.data_dir), user]
            result = await host.run([*script, *argv], check=False, timeout=RESTORE_TIMEOUT)
            if result.code != 0:
                raise RestoreError(
                    f"{host.label}: restore into {self.data_dir} failed: "
                    f"{snapshot.last_error(result.out + result.err)}; the old data is untouched"
                )

        def run() -> None:
            self._run(restore())
            self.markers.mark(name, snap)

        return Step(f"restore {name} on {host.label} from the snapshot", done, run)

    def finish(self) -> None:
        aside = f"{self.data_dir}{ASIDE}"
        self._run(
            fan_out(
                list(self.hosts.values()),
                lambda h: h.label,
                lambda h: h.run(["rm", "-rf", "--", aside]),
            )
        )
        self.markers.forget()


async def _probe_restorer(host: Host, bin_dir: str) -> tuple[str, snapshot.RestoreFeatures]:
    result = await host.run(["sh", "-c", _TOOL_PROBE, "sh", bin_dir], check=False)
    if result.code != 0:
        reason = last_line(result.err) or f"exit {result.code}"
        raise HostError(f"{host.label}: {reason}; run `etcdforge apply` to install the release")
    first, _, help_text = result.out.partition("\n")
    return first.removeprefix("tool="), snapshot.features_from_help(help_text)


@contextlib.contextmanager
def open_target(selection: Selection, record: ClusterRecord, work: Path) -> Iterator[RestoreTarget]:
    """The cluster as a restore target; for hosts, logged in and preflighted (read-only)."""
    spec = deployed_spec(record)
    if not spec.on_hosts:
        yield LocalTarget(selection, record, work)
        return
    base = selection.file.parent if selection.file is not None else Path.cwd()
    release = releases.resolve(spec.etcd, base)
    tools = snapshot.find_tools(EtcdBinary(releases.admin_tools(release) / "etcd", release.version))
    with asyncio.Runner() as runner:
        hosts: dict[str, Host] = {}
        try:
            hosts.update(runner.run(connect_all(spec)))
            runner.run(probe_all(spec, hosts, record.token))
            bin_dir = str(spec.host_paths.bin_dir)

            async def probe(name: str) -> tuple[str, snapshot.RestoreFeatures]:
                return await _probe_restorer(hosts[name], bin_dir)

            names = [m.name for m in spec.members]
            found = runner.run(fan_out(names, lambda n: hosts[n].label, probe))
            yield HostTarget(
                selection, record, work, runner, hosts, tools, dict(zip(names, found, strict=True))
            )
        finally:
            runner.run(close_all(hosts))
