"""`etcdforge kubeadm migrate`: move a kubeadm cluster's data out of its stacked etcd.

Migration is a plan of steps that check live state first, with its progress kept in
`<state>/migrate/`, so an interrupted run resumes: snapshot the source once (always on this
machine, so hosts never need to reach it), then ops.restore stops every target member, restores
each from that one snapshot and starts them — a local cluster or one on hosts alike — and finally
every member must hold exactly the source's `/registry/` keys and values.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from etcdforge import kubeadm, snapshot
from etcdforge.binaries import format_version, parse_version
from etcdforge.client import EtcdClient, prefix_end, run
from etcdforge.errors import EtcdClientError, EtcdforgeError, UnsafeOperationError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, ensure_dir, file_sha256
from etcdforge.kubeadm import KubeadmPaths
from etcdforge.ops import restore
from etcdforge.ops.kubeadm_config import cluster_endpoints
from etcdforge.ops.plan import SILENT, PlanResult, Progress, Step, execute
from etcdforge.ops.status import query_status
from etcdforge.ops.target import Selection, record_to_change
from etcdforge.record import ClusterRecord
from etcdforge.tls import TLSFiles

REGISTRY_PREFIX = b"/registry/"


class MigrationError(EtcdforgeError):
    """The stacked source, the snapshot or the target stopped a migration."""


@dataclass(frozen=True)
class SourceProgress:
    """What the snapshot step learned; persisted so a resumed run trusts the same snapshot."""

    source: str
    snapshot_sha256: str
    revision: int
    count: int
    sha256: str
    version: str


@dataclass(frozen=True)
class MigrateResult:
    cluster: str
    source: str
    snapshot: Path
    revision: int
    keys: int
    sha256: str
    bumped_by: int
    plan: PlanResult
    config: str
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _Source:
    """The stacked etcd: the one member the snapshot comes from, and a client pair it accepts."""

    url: str
    tls: TLSFiles


def source_tls(pki_dir: Path) -> TLSFiles:
    """kubeadm's etcd pki dir: ca.crt plus a client-capable pair, best-suited first."""
    ca = pki_dir / "ca.crt"
    if not ca.is_file():
        raise MigrationError(
            f"{ca}: not found; --from-pki must be kubeadm's etcd pki dir "
            "(/etc/kubernetes/pki/etcd or a copy of it)"
        )
    for cert, key in (
        (pki_dir / "healthcheck-client.crt", pki_dir / "healthcheck-client.key"),
        (
            pki_dir.parent / "apiserver-etcd-client.crt",
            pki_dir.parent / "apiserver-etcd-client.key",
        ),
        (pki_dir / "server.crt", pki_dir / "server.key"),
    ):
        if cert.is_file() and key.is_file():
            return TLSFiles(ca=ca, cert=cert, key=key)
    raise MigrationError(
        f"{pki_dir}: no client certificate (healthcheck-client.crt, ../apiserver-etcd-client.crt "
        "or server.crt with its key); copy kubeadm's etcd pki dir"
    )


def _check_source_url(url: str) -> str:
    value = url.strip().rstrip("/")
    if "," in value or not value.startswith("https://"):
        raise MigrationError(
            f"--from {url!r}: give exactly one https:// endpoint of the stacked etcd "
            "(a snapshot is taken from one member)"
        )
    return value


class _Work:
    """Files of one migration under <state>/migrate/ (0700)."""

    def __init__(self, record: ClusterRecord) -> None:
        self.root = record.layout.root / "migrate"
        self.snapshot = self.root / "snapshot.db"
        self.progress = self.root / "progress.json"
        self.last = self.root / "last.json"

    def read_progress(self) -> SourceProgress | None:
        try:
            return SourceProgress(**json.loads(self.progress.read_text()))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            raise MigrationError(
                f"{self.progress}: unreadable ({exc}); remove {self.root} to start over"
            ) from None

    def write_progress(self, progress: SourceProgress) -> None:
        ensure_dir(self.root)
        atomic_write(self.progress, json.dumps(asdict(progress)).encode(), PRIVATE_FILE)


def _preflight_source(source: _Source, target_version: tuple[int, int, int]) -> str:
    url = source.url

    async def probe() -> tuple[str | None, str | None, int]:
        async with EtcdClient([url], source.tls, timeout=5.0) as client:
            status = await client.status(url)
            if status.error and status.version is None:
                return None, status.error, 0
            # Proves the certificate may read the keyspace, not only reach the member.
            page = await client.range(
                REGISTRY_PREFIX, prefix_end(REGISTRY_PREFIX), count_only=True, endpoint=url
            )
            return status.version, None, page.count

    try:
        version, error, _ = run(probe())
    except EtcdClientError as exc:
        raise MigrationError(f"stacked etcd {url} refused or unreachable: {exc}") from None
    if error is not None or version is None:
        raise MigrationError(
            f"stacked etcd {url} unreachable or rejected the certificates from --from-pki: {error}"
        )
    found = parse_version(version)
    if found[:2] > target_version[:2]:
        raise MigrationError(
            f"stacked etcd runs {version} but the target runs {format_version(target_version)}; "
            "etcd cannot move data to an older minor release: upgrade the target first"
        )
    return version


def _preflight_target(record: ClusterRecord, replace: bool) -> None:
    for row in query_status(record):
        if not row.healthy:
            raise MigrationError(
                f"target member {row.name} ({row.endpoint}) is not healthy ({row.error}); "
                "fix it (`etcdforge up`, `etcdforge status`) before migrating"
            )

    async def count() -> int:
        async with EtcdClient(record.endpoints, record.admin_tls) as client:
            return await snapshot.count_keys(client)

    keys = run(count())
    if keys and not replace:
        raise UnsafeOperationError(
            f"target cluster {record.name} already holds {keys} key(s); migrating would replace "
            "them all: pass --replace if that is what you want"
        )


def _bump_by(target: restore.RestoreTarget, bump: bool, warnings: list[str]) -> int:
    """How far restored revisions jump; a warning where the restore tool cannot bump."""
    features = target.features()
    if bump and not features.can_bump:
        warnings.append(
            f"{target.restorer()} (etcd {format_version(target.tools().version)}) has no "
            "--bump-revision/--mark-compacted (etcd 3.5.10+/3.4.27+): revisions carry over "
            "unchanged, so keep every kube-apiserver stopped from the snapshot until the "
            "switch-over"
        )
    return snapshot.DEFAULT_BUMP if bump and features.can_bump else 0


def _source_state(source: _Source, revision: int) -> tuple[str, snapshot.Fingerprint]:
    """The source's version and its /registry/ fingerprint at the snapshot's revision."""

    async def read() -> tuple[str, snapshot.Fingerprint]:
        async with EtcdClient([source.url], source.tls, timeout=30.0) as client:
            status = await client.status(source.url)
            # The snapshot's own revision pins the comparison: later writes do not count.
            found = await snapshot.fingerprint(client, REGISTRY_PREFIX, source.url, revision)
            return status.version or "?", found

    try:
        return run(read())
    except EtcdClientError as exc:
        raise MigrationError(
            f"could not read {source.url} at the snapshot's revision {revision}: {exc}"
        ) from None


def _snapshot_step(target: restore.RestoreTarget, work: _Work, source: _Source) -> Step:
    """Save the source's snapshot once; a resumed run keeps it while its sha256 matches."""

    def done() -> bool:
        current = work.read_progress()
        return (
            current is not None
            and work.snapshot.is_file()
            and current.snapshot_sha256 == file_sha256(work.snapshot)
        )

    def save() -> None:
        ensure_dir(work.root)
        target.forget()
        tools = target.tools()
        snapshot.save(tools, source.url, source.tls, work.snapshot)
        info = snapshot.status(tools, work.snapshot)
        version, found = _source_state(source, info.revision)
        work.write_progress(
            SourceProgress(
                source.url,
                file_sha256(work.snapshot),
                info.revision,
                found.count,
                found.sha256,
                version,
            )
        )

    return Step(f"snapshot the stacked etcd at {source.url} and verify it", done, save)


def _restore_steps(target: restore.RestoreTarget, work: _Work, bump_by: int) -> list[Step]:
    # Built once the snapshot exists: every step restores from that one file.
    current = work.read_progress()
    sha = current.snapshot_sha256 if current is not None else ""
    return target.steps(restore.Snapshot(work.snapshot, sha, bump_by))


async def _fingerprints(
    endpoints: Sequence[str], tls: TLSFiles, revision: int = 0
) -> list[tuple[str, snapshot.Fingerprint]]:
    async with EtcdClient(endpoints, tls, timeout=30.0) as client:
        found = await asyncio.gather(
            *(snapshot.fingerprint(client, REGISTRY_PREFIX, e, revision) for e in client.endpoints)
        )
        return list(zip(client.endpoints, found, strict=True))


def _verify_members(record: ClusterRecord, expected: SourceProgress) -> None:
    """Every member holds exactly the source's /registry/ keys and values, or nothing is dropped."""
    for endpoint, found in run(_fingerprints(record.endpoints, record.admin_tls)):
        if found.count != expected.count or found.sha256 != expected.sha256:
            raise MigrationError(
                f"{endpoint} holds {found.count} /registry/ keys (sha256 {found.sha256[:12]}) "
                f"but the source had {expected.count} (sha256 {expected.sha256[:12]}) at "
                f"revision {expected.revision}; nothing was cleaned up: the old data dirs are "
                f"kept as *{restore.ASIDE} for inspection"
            )


def migrate(
    selection: Selection,
    source: str,
    source_pki: Path,
    paths: KubeadmPaths,
    api: str = kubeadm.DEFAULT_API,
    replace: bool = False,
    bump: bool = True,
    dry_run: bool = False,
    progress: Progress = SILENT,
) -> MigrateResult:
    """Snapshot the stacked etcd, restore it into every member, prove the data, print the config.

    The target is a local cluster (`up`) or one on hosts (`apply`): ops.restore hides which.
    """
    paths.validate()
    kubeadm.api_version(api)
    url = _check_source_url(source)
    record = record_to_change(selection, "kubeadm migrate")
    work = _Work(record)
    resumed = work.read_progress()
    if resumed is not None and resumed.source != url:
        raise MigrationError(
            f"a migration from {resumed.source} is in progress in {work.root}; rerun with "
            f"--from {resumed.source} to finish it, or remove {work.root} to abandon it"
        )
    found = _Source(url, source_tls(source_pki))
    with restore.open_target(selection, record, work.root) as target:
        return _migrate(
            selection, target, work, found, paths, api, replace, bump, dry_run, progress
        )


def _migrate(
    selection: Selection,
    target: restore.RestoreTarget,
    work: _Work,
    source: _Source,
    paths: KubeadmPaths,
    api: str,
    replace: bool,
    bump: bool,
    dry_run: bool,
    progress: Progress,
) -> MigrateResult:
    """Preflight, snapshot, restore, then start and verify: the phases, in order."""
    record = target.record
    warnings: list[str] = []
    bump_by = _bump_by(target, bump, warnings)
    if work.read_progress() is None:
        # Everything that can refuse does so here, before the first change.
        _preflight_source(source, target.tools().version)
        _preflight_target(record, replace)
    progress.phase("snapshot")
    first = execute([_snapshot_step(target, work, source)], progress, dry_run)
    progress.phase("restore")
    rest = execute(_restore_steps(target, work, bump_by), progress, dry_run)
    plan = PlanResult(first.changed + rest.changed, first.pending + rest.pending)
    current = work.read_progress()
    if dry_run or current is None:
        return MigrateResult(
            record.name, source.url, work.snapshot, 0, 0, "", bump_by, plan, "", tuple(warnings)
        )
    _start_and_verify(target, work, current, progress)
    endpoints = cluster_endpoints(Selection(file=selection.file, state_dir=record.layout.root))
    return MigrateResult(
        record.name,
        source.url,
        work.snapshot,
        current.revision,
        current.count,
        current.sha256,
        bump_by,
        PlanResult((*plan.changed, "start and verify"), plan.pending),
        kubeadm.render_cluster_configuration(endpoints.endpoints, paths, api),
        tuple(warnings),
    )


def _start_and_verify(
    target: restore.RestoreTarget, work: _Work, current: SourceProgress, progress: Progress
) -> None:
    """Start the restored members, prove their data, then drop what was kept aside."""
    progress.phase("start")
    progress.step("cluster", "start every member on the restored data")
    target.start()
    progress.phase("verify")
    progress.step("cluster", "compare /registry/ on every member with the source")
    _verify_members(target.record, current)
    target.finish()
    work.progress.replace(work.last)
