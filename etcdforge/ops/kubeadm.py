"""`etcdforge kubeadm`: hand a cluster to Kubernetes, and move a stacked etcd's data into it.

Endpoints are always derived, never stored: the live member list when the cluster answers (so a
membership change shows up in the next `kubeadm config`), the spec with a warning when not.

Certificates go to an `Installation` — somewhere kubeadm's pki directory lives and checks can run
from. The local one writes under a directory; an SSH one (control-plane hosts) plugs in with the
same three methods.

Migration is a plan of steps that check live state first, with its progress kept in
`<state>/migrate/`, so an interrupted run resumes: snapshot the source once, stop every target
member, restore each from that one snapshot, start them with `up`'s machinery, then prove that
every member holds exactly the source's `/registry/` keys and values.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from etcdforge import kubeadm, pki, snapshot
from etcdforge.binaries import EtcdBinary, format_version, parse_version
from etcdforge.client import EtcdClient, prefix_end, run
from etcdforge.errors import EtcdClientError, EtcdforgeError, UnsafeOperationError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write, ensure_dir, remove_tree
from etcdforge.kubeadm import KubeadmError, KubeadmPaths
from etcdforge.layout import MemberLayout
from etcdforge.ops.plan import PlanResult, Progress, Step, execute
from etcdforge.ops.target import Selection, record_for, state_dir_for
from etcdforge.record import ClusterRecord, read_record, require_record
from etcdforge.services import local
from etcdforge.spec import ClusterSpec, parse_spec
from etcdforge.tls import TLSFiles

REGISTRY_PREFIX = b"/registry/"
CHECK_PREFIX = "/registry/etcdforge-check/"


class MigrationError(EtcdforgeError):
    """The stacked source, the snapshot or the target stopped a migration."""


# --- endpoints ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterEndpoints:
    cluster: str
    endpoints: list[str]
    live: bool
    warning: str | None = None


def _spec_and_record(selection: Selection) -> tuple[ClusterSpec | None, ClusterRecord | None]:
    spec = None
    if selection.file is not None:
        from etcdforge.spec import load_spec

        spec = load_spec(selection.file, allow_even=True)
    record = read_record(state_dir_for(selection, spec))
    if spec is None and record is None:
        require_record(state_dir_for(selection), selection.cluster or "default")
    return spec, record


def _live_client_urls(record: ClusterRecord) -> list[str]:
    async def members() -> list[str]:
        async with EtcdClient(record.endpoints, record.admin_tls, timeout=3.0) as client:
            listed = await client.member_list()
        # A learner serves no client requests; the apiserver must not be pointed at it.
        return [url for m in listed if not m.is_learner for url in m.client_urls]

    return run(members())


def cluster_endpoints(selection: Selection) -> ClusterEndpoints:
    """Client URLs of the voting members, live if possible; the spec's with a warning if not."""
    spec, record = _spec_and_record(selection)
    name = spec.name if spec is not None else record.name if record is not None else "?"
    fallback = spec.client_endpoints if spec is not None else record.endpoints if record else []
    if record is None:
        return ClusterEndpoints(
            name,
            fallback,
            False,
            f"cluster {name} is not deployed at {state_dir_for(selection, spec)}; endpoints come "
            "from the spec, not the live member list",
        )
    try:
        urls = _live_client_urls(record)
    except EtcdClientError as exc:
        return ClusterEndpoints(
            name,
            fallback,
            False,
            f"cluster {name} is not reachable ({exc}); endpoints come from the spec, "
            "not the live member list",
        )
    if not urls:
        return ClusterEndpoints(name, fallback, False, f"cluster {name} lists no client URLs")
    order = {url: i for i, url in enumerate(fallback)}
    urls = sorted(dict.fromkeys(u.rstrip("/") for u in urls), key=lambda u: order.get(u, 99))
    return ClusterEndpoints(name, urls, True)


# --- config and flags ----------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigResult:
    text: str
    endpoints: ClusterEndpoints
    merged_into: Path | None = None
    changed: bool = False
    replaced: str | None = None


def config(
    selection: Selection,
    paths: KubeadmPaths,
    api: str | None = None,
    merge: Path | None = None,
    dry_run: bool = False,
) -> ConfigResult:
    """A ClusterConfiguration for the cluster, or the user's kubeadm file rewritten to use it."""
    paths.validate()
    if api is not None:
        kubeadm.api_version(api)
    if merge is None:
        found = cluster_endpoints(selection)
        text = kubeadm.render_cluster_configuration(
            found.endpoints, paths, api or kubeadm.DEFAULT_API
        )
        return ConfigResult(text, found)
    try:
        original = merge.read_text(encoding="utf-8")
        mode = merge.stat().st_mode & 0o777
    except FileNotFoundError:
        raise KubeadmError(f"{merge}: no such file; pass your kubeadm config to --merge") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KubeadmError(f"{merge}: cannot read it ({exc.__class__.__name__})") from None
    # Validate the file before touching the cluster: a bad file is the cheaper mistake to report.
    kubeadm.validate_config(original, str(merge), api)
    found = cluster_endpoints(selection)
    result = kubeadm.merge_config(original, str(merge), found.endpoints, paths, api)
    changed = result.text != original
    if changed and not dry_run:
        atomic_write(merge, result.text.encode(), mode)
    return ConfigResult(result.text, found, merge, changed, result.replaced)


def apiserver_flags(
    selection: Selection, paths: KubeadmPaths
) -> tuple[list[str], ClusterEndpoints]:
    paths.validate()
    found = cluster_endpoints(selection)
    return kubeadm.apiserver_flags(found.endpoints, paths), found


# --- certificates on control-plane installations ---------------------------------------------


@dataclass(frozen=True)
class CheckRow:
    where: str
    endpoint: str
    ok: bool
    error: str | None = None


class Installation(Protocol):
    """Where a kube-apiserver's etcd files live (kubeadm's pki dir) and where checks run from.

    Paths given to `read`/`write` are relative to the pki dir (`etcd/ca.crt`, ...). A control
    plane reached over SSH implements the same methods.
    """

    @property
    def name(self) -> str: ...

    def read(self, relative: str) -> bytes | None: ...

    def write(self, relative: str, data: bytes, mode: int) -> None: ...

    def check(self, endpoints: Sequence[str]) -> list[CheckRow]: ...


@dataclass(frozen=True)
class LocalInstallation:
    """A local directory laid out like /etc/kubernetes/pki; checks run from this machine."""

    root: Path

    @property
    def name(self) -> str:
        return str(self.root)

    def read(self, relative: str) -> bytes | None:
        try:
            return (self.root / relative).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def write(self, relative: str, data: bytes, mode: int) -> None:
        path = self.root / relative
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        atomic_write(path, data, mode)

    @property
    def tls(self) -> TLSFiles:
        return TLSFiles(
            ca=self.root / kubeadm.CA_RELATIVE,
            cert=self.root / kubeadm.CERT_RELATIVE,
            key=self.root / kubeadm.KEY_RELATIVE,
        )

    def check(self, endpoints: Sequence[str]) -> list[CheckRow]:
        for relative in (kubeadm.CA_RELATIVE, kubeadm.CERT_RELATIVE, kubeadm.KEY_RELATIVE):
            if not (self.root / relative).is_file():
                raise KubeadmError(
                    f"{self.root / relative}: not installed; run `etcdforge kubeadm certs` first"
                )
        return run(check_with(self.name, self.tls, endpoints))


async def _check_endpoint(client: EtcdClient, where: str, endpoint: str) -> CheckRow:
    key = f"{CHECK_PREFIX}{secrets.token_hex(8)}"
    value = secrets.token_hex(16)
    try:
        await client.put(key, value, endpoint=endpoint)
        try:
            got = await client.get(key, endpoint=endpoint)
            if got != value.encode():
                return CheckRow(where, endpoint, False, f"wrote {key} but read back {got!r}")
        finally:
            deleted = await client.delete(key, endpoint=endpoint)
        if deleted != 1 or await client.get(key, endpoint=endpoint) is not None:
            return CheckRow(where, endpoint, False, f"{key} was not deleted")
    except EtcdClientError as exc:
        # The row already names the endpoint; keep just the cause.
        cause = re.sub(rf"^{re.escape(endpoint)}(/\S*)?: ", "", str(exc))
        return CheckRow(where, endpoint, False, cause)
    return CheckRow(where, endpoint, True)


async def check_with(where: str, tls: TLSFiles, endpoints: Sequence[str]) -> list[CheckRow]:
    """Write, read and delete a key under /registry/ through each endpoint, as the apiserver."""
    async with EtcdClient(endpoints, tls, timeout=5.0) as client:
        return list(
            await asyncio.gather(*(_check_endpoint(client, where, e) for e in client.endpoints))
        )


def _record_spec(record: ClusterRecord) -> ClusterSpec:
    return parse_spec(record.spec, source=f"{record.state_dir}/cluster.json", allow_even=True)


def install_steps(record: ClusterRecord, installation: Installation) -> list[Step]:
    """The etcd CA certificate (never its key) and an apiserver-etcd-client pair of its own."""
    spec = _record_spec(record)
    layout = record.layout
    where = installation.name

    def ca_done() -> bool:
        return installation.read(kubeadm.CA_RELATIVE) == layout.ca_cert.read_bytes()

    def ca_run() -> None:
        installation.write(kubeadm.CA_RELATIVE, layout.ca_cert.read_bytes(), PUBLIC_FILE)

    def pair_done() -> bool:
        pair = kubeadm.parse_pair(
            installation.read(kubeadm.CERT_RELATIVE), installation.read(kubeadm.KEY_RELATIVE)
        )
        if pair is None:
            return False
        return kubeadm.client_cert_problem(*pair, pki.load_cert(layout.ca_cert)) is None

    def pair_run() -> None:
        cert, key = kubeadm.issue_apiserver_etcd_client(
            pki.load_cert(layout.ca_cert),
            pki.load_key(layout.ca_key),
            spec.pki.key_algorithm,
            dt.timedelta(days=spec.pki.cert_validity_days),
        )
        # Key first, then the certificate: never a new certificate beside an old key for long.
        installation.write(kubeadm.KEY_RELATIVE, pki.key_to_pem(key), PRIVATE_FILE)
        installation.write(kubeadm.CERT_RELATIVE, pki.cert_to_pem(cert), PUBLIC_FILE)

    return [
        Step(f"install the etcd CA certificate in {where}", ca_done, ca_run),
        Step(f"issue the apiserver-etcd-client certificate in {where}", pair_done, pair_run),
    ]


@dataclass(frozen=True)
class CertsResult:
    cluster: str
    plan: PlanResult | None
    rows: tuple[CheckRow, ...]
    endpoints: ClusterEndpoints | None


def certs(
    selection: Selection,
    installations: Sequence[Installation],
    check: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> CertsResult:
    """Install (or with `check`, prove) the apiserver's etcd files on each installation."""
    record = record_for(selection)
    if not check:
        steps = [s for inst in installations for s in install_steps(record, inst)]
        return CertsResult(record.name, execute(steps, progress, dry_run), (), None)
    found = cluster_endpoints(selection)
    rows = tuple(row for inst in installations for row in inst.check(found.endpoints))
    return CertsResult(record.name, None, rows, found)


# --- migration from a stacked etcd -----------------------------------------------------------


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


def _sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Work:
    """Files of one migration under <state>/migrate/ (0700)."""

    def __init__(self, record: ClusterRecord) -> None:
        self.root = record.layout.root / "migrate"
        self.snapshot = self.root / "snapshot.db"
        self.progress = self.root / "progress.json"
        self.last = self.root / "last.json"

    def marker(self, member: str) -> Path:
        return self.root / f"restored-{member}"

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


def _preflight_source(url: str, tls: TLSFiles, target_version: tuple[int, int, int]) -> str:
    async def probe() -> tuple[str | None, str | None, int]:
        async with EtcdClient([url], tls, timeout=5.0) as client:
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
    source = parse_version(version)
    if source[:2] > target_version[:2]:
        raise MigrationError(
            f"stacked etcd runs {version} but the target runs {format_version(target_version)}; "
            "etcd cannot move data to an older minor release: upgrade the target first"
        )
    return version


def _preflight_target(record: ClusterRecord, replace: bool) -> None:
    from etcdforge.ops.status import query_status

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


async def _fingerprints(
    endpoints: Sequence[str], tls: TLSFiles, revision: int = 0
) -> list[tuple[str, snapshot.Fingerprint]]:
    async with EtcdClient(endpoints, tls, timeout=30.0) as client:
        found = await asyncio.gather(
            *(snapshot.fingerprint(client, REGISTRY_PREFIX, e, revision) for e in client.endpoints)
        )
        return list(zip(client.endpoints, found, strict=True))


def migrate(
    selection: Selection,
    source: str,
    source_pki: Path,
    paths: KubeadmPaths,
    api: str = kubeadm.DEFAULT_API,
    replace: bool = False,
    bump: bool = True,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> MigrateResult:
    """Snapshot the stacked etcd, restore it into every member, prove the data, print the config."""
    from etcdforge.ops.up import up

    paths.validate()
    kubeadm.api_version(api)
    url = _check_source_url(source)
    record = record_for(selection)
    binary = EtcdBinary(Path(record.binary), parse_version(record.version))
    work = _Work(record)
    resumed = work.read_progress()
    if resumed is not None and resumed.source != url:
        raise MigrationError(
            f"a migration from {resumed.source} is in progress in {work.root}; rerun with "
            f"--from {resumed.source} to finish it, or remove {work.root} to abandon it"
        )
    tls = source_tls(source_pki)
    tools = snapshot.find_tools(binary)
    features = snapshot.restore_features(tools)
    warnings: list[str] = []
    bump_by = snapshot.DEFAULT_BUMP if bump and features.can_bump else 0
    if bump and not features.can_bump:
        warnings.append(
            f"{tools.restorer} (etcd {format_version(binary.version)}) has no --bump-revision/"
            "--mark-compacted (etcd 3.5.10+/3.4.27+): revisions carry over unchanged, so keep "
            "every kube-apiserver stopped from the snapshot until the switch-over"
        )
    if resumed is None:
        # Everything that can refuse does so here, before the first change.
        _preflight_source(url, tls, binary.version)
        _preflight_target(record, replace)

    def snapshot_done() -> bool:
        current = work.read_progress()
        return (
            current is not None
            and work.snapshot.is_file()
            and current.snapshot_sha256 == _sha256_file(work.snapshot)
        )

    def snapshot_run() -> None:
        ensure_dir(work.root)
        for member in record.members:
            work.marker(member.name).unlink(missing_ok=True)
        snapshot.save(tools, url, tls, work.snapshot)
        info = snapshot.status(tools, work.snapshot)

        async def source_state() -> tuple[str, snapshot.Fingerprint]:
            async with EtcdClient([url], tls, timeout=30.0) as client:
                status = await client.status(url)
                # The snapshot's own revision pins the comparison: later writes do not count.
                found = await snapshot.fingerprint(client, REGISTRY_PREFIX, url, info.revision)
                return status.version or "?", found

        try:
            version, found = run(source_state())
        except EtcdClientError as exc:
            raise MigrationError(
                f"could not read {url} at the snapshot's revision {info.revision}: {exc}"
            ) from None
        work.write_progress(
            SourceProgress(
                url, _sha256_file(work.snapshot), info.revision, found.count, found.sha256, version
            )
        )

    steps = [Step(f"snapshot the stacked etcd at {url} and verify it", snapshot_done, snapshot_run)]
    layout = record.layout
    steps += [_stop_step(m.name, layout.member(m.name)) for m in record.members]
    spec = _record_spec(record)
    for member in record.members:
        steps.append(_restore_step(work, tools, spec, record, member.name, bump_by))
    result = execute(steps, progress, dry_run)
    current = work.read_progress()
    if dry_run or current is None:
        return MigrateResult(
            record.name, url, work.snapshot, 0, 0, "", bump_by, result, "", tuple(warnings)
        )
    if progress:
        progress("start every member on the restored data")
    up(Selection(file=selection.file, state_dir=record.layout.root), allow_even=True)
    if progress:
        progress("compare /registry/ on every member with the source")
    for endpoint, found in run(_fingerprints(record.endpoints, record.admin_tls)):
        if found.count != current.count or found.sha256 != current.sha256:
            raise MigrationError(
                f"{endpoint} holds {found.count} /registry/ keys (sha256 {found.sha256[:12]}) "
                f"but the source had {current.count} (sha256 {current.sha256[:12]}) at revision "
                f"{current.revision}; nothing was cleaned up: the old data dirs are kept as "
                "*.pre-migrate for inspection"
            )
    _finish(work, record)
    endpoints = cluster_endpoints(Selection(file=selection.file, state_dir=record.layout.root))
    text = kubeadm.render_cluster_configuration(endpoints.endpoints, paths, api)
    return MigrateResult(
        record.name,
        url,
        work.snapshot,
        current.revision,
        current.count,
        current.sha256,
        bump_by,
        PlanResult((*result.changed, "start and verify"), result.pending),
        text,
        tuple(warnings),
    )


def _stop_step(name: str, files: MemberLayout) -> Step:
    return Step(
        f"stop {name}",
        lambda: local.running_pid(files.pid_file, files.data_dir) is None,
        lambda: local.stop(files.pid_file, files.data_dir),
    )


def _aside(data_dir: Path) -> Path:
    return data_dir.with_name(data_dir.name + ".pre-migrate")


def _restore_step(
    work: _Work,
    tools: snapshot.SnapshotTools,
    spec: ClusterSpec,
    record: ClusterRecord,
    name: str,
    bump_by: int,
) -> Step:
    member = spec.member(name)
    data_dir = record.layout.member(name).data_dir

    def done() -> bool:
        current = work.read_progress()
        try:
            mark = work.marker(name).read_text()
        except FileNotFoundError:
            return False
        return current is not None and mark == current.snapshot_sha256 and data_dir.is_dir()

    def restore() -> None:
        current = work.read_progress()
        if current is None:
            raise MigrationError(f"{work.progress}: missing; rerun the migration from the start")
        if local.running_pid(record.layout.member(name).pid_file, data_dir) is not None:
            raise MigrationError(f"member {name} is running again; stop it and rerun")
        fresh = data_dir.with_name(data_dir.name + ".restoring")
        remove_tree(fresh)
        snapshot.restore(
            tools,
            work.snapshot,
            fresh,
            name,
            spec.initial_cluster,
            record.token,
            member.peer_url,
            bump_by,
        )
        ensure_dir(fresh)
        # The old data is kept aside until every member verifies, then removed.
        if data_dir.exists():
            if _aside(data_dir).exists():
                remove_tree(data_dir)  # an earlier attempt's restore; the original is aside
            else:
                data_dir.rename(_aside(data_dir))
        fresh.rename(data_dir)
        atomic_write(work.marker(name), current.snapshot_sha256.encode(), PRIVATE_FILE)

    return Step(f"restore {name} from the snapshot", done, restore)


def _finish(work: _Work, record: ClusterRecord) -> None:
    for member in record.members:
        remove_tree(_aside(record.layout.member(member.name).data_dir))
        work.marker(member.name).unlink(missing_ok=True)
    work.progress.replace(work.last)
