"""`etcdforge kubeadm`: hand a cluster to Kubernetes, and move a stacked etcd's data into it.

Endpoints are always derived, never stored: the live member list when the cluster answers (so a
membership change shows up in the next `kubeadm config`), the spec with a warning when not.

Certificates go to an `Installation` — somewhere kubeadm's pki directory lives and checks can run
from. The local one writes under a directory; `HostInstallation` is a control-plane host over SSH
(etcdforge.hosts), whose check runs *on that host* with `openssl s_client` and the installed
files, so it proves what the apiserver there will see: its network path, its files.

Migration is a plan of steps that check live state first, with its progress kept in
`<state>/migrate/`, so an interrupted run resumes: snapshot the source once (always on this
machine, so hosts never need to reach it), then ops.restore stops every target member, restores
each from that one snapshot and starts them — a local cluster or one on hosts alike — and finally
every member must hold exactly the source's `/registry/` keys and values.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import httpx

from etcdforge import kubeadm, pki, snapshot
from etcdforge.binaries import format_version, parse_version
from etcdforge.client import EtcdClient, prefix_end, run
from etcdforge.errors import (
    EtcdClientError,
    EtcdforgeError,
    HostError,
    PreflightError,
    UnsafeOperationError,
)
from etcdforge.fsutil import (
    PRIVATE_FILE,
    PUBLIC_FILE,
    atomic_write,
    ensure_dir,
    file_sha256,
)
from etcdforge.hosts import Host, SSHHost, SSHTarget, fan_out, last_line
from etcdforge.kubeadm import KubeadmError, KubeadmPaths
from etcdforge.ops import preflight, restore
from etcdforge.ops.plan import PlanResult, Progress, Step, execute
from etcdforge.ops.target import Selection, record_for, state_dir_for
from etcdforge.record import ClusterRecord, read_record, require_record
from etcdforge.spec import ClusterSpec, is_ip, parse_spec
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


async def check_with(
    where: str,
    tls: TLSFiles | None,
    endpoints: Sequence[str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> list[CheckRow]:
    """Write, read and delete a key under /registry/ through each endpoint, as the apiserver."""
    async with EtcdClient(endpoints, tls, timeout=5.0, transport=transport) as client:
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
    plans: tuple[tuple[str, PlanResult], ...]  # per installation, in order; empty with check
    rows: tuple[CheckRow, ...]
    endpoints: ClusterEndpoints | None

    @property
    def plan(self) -> PlanResult | None:
        if not self.plans:
            return None
        return PlanResult(
            tuple(t for _, p in self.plans for t in p.changed),
            tuple(t for _, p in self.plans for t in p.pending),
        )


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
        plans = tuple(
            (inst.name, execute(install_steps(record, inst), progress, dry_run))
            for inst in installations
        )
        return CertsResult(record.name, plans, (), None)
    found = cluster_endpoints(selection)
    rows = tuple(row for inst in installations for row in inst.check(found.endpoints))
    return CertsResult(record.name, (), rows, found)


# --- control-plane hosts over SSH ------------------------------------------------------------

# Each installed file, as it must be; a file with another mode or owner does not count as
# installed, so a key others could read is replaced (a new key), not merely chmod-ed.
_FILES = (kubeadm.CA_RELATIVE, kubeadm.CERT_RELATIVE, kubeadm.KEY_RELATIVE)

# Read-only, one round trip, run as root (sudo): who we are, openssl, and what is installed.
_HOST_PROBE = r"""
pki=$1; shift
echo "uid=$(id -u)"
command -v openssl >/dev/null 2>&1 && echo "openssl=yes" || echo "openssl=no"
if [ -e "$pki" ] && [ ! -d "$pki" ]; then echo "pki=not-a-directory"; fi
for f in "$@"; do [ -f "$pki/$f" ] || echo "missing=$f"; done
"""

# Seconds one relayed request may take on the host (connect, handshake, answer).
RELAY_TIMEOUT = 10


class RelayTransport(httpx.AsyncBaseTransport):
    """httpx requests sent from another host: `openssl s_client` there, with that host's files.

    openssl is in every mainstream distribution's base system (Debian's ca-certificates depends
    on it), so nothing is uploaded. Each request is one HTTP/1.0 exchange on the same TLS port
    and certificate checks the apiserver's gRPC client uses: the server's certificate against
    the installed CA *and* the endpoint's IP or name (-verify_ip / -verify_hostname), the client
    certificate presented to etcd (mutual TLS).
    """

    def __init__(self, host: Host, ca: PurePosixPath, cert: PurePosixPath, key: PurePosixPath):
        self.host = host
        self.files = (ca, cert, key)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        body = await request.aread()
        name = url.host
        port = url.port or 443
        verify = ["-verify_ip", name] if is_ip(name) else ["-verify_hostname", name]
        if not is_ip(name):
            verify += ["-servername", name]
        ca, cert, key = (str(f) for f in self.files)
        argv = [
            "timeout", "-k", "2", str(RELAY_TIMEOUT),
            "openssl", "s_client", "-quiet", "-verify_return_error",
            "-connect", f"[{name}]:{port}" if ":" in name else f"{name}:{port}",
            "-CAfile", ca, "-cert", cert, "-key", key, *verify,
        ]  # fmt: skip
        head = (
            f"{request.method} {url.raw_path.decode()} HTTP/1.0\r\n"
            f"Host: {url.netloc.decode()}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        try:
            result = await self.host.run(
                argv, input=head.encode() + body, check=False, timeout=RELAY_TIMEOUT + 10
            )
        except HostError as exc:
            raise httpx.ConnectError(str(exc), request=request) from None
        if result.code == 124:
            raise httpx.ConnectTimeout("timed out", request=request)
        if not result.stdout.startswith(b"HTTP/"):
            raise httpx.ConnectError(openssl_reason(result.err), request=request)
        head_bytes, _, content = result.stdout.partition(b"\r\n\r\n")
        status = head_bytes.split(b"\r\n", 1)[0].split()
        try:
            code = int(status[1])
        except (IndexError, ValueError):
            raise httpx.RemoteProtocolError(
                f"bad status line {status!r}", request=request
            ) from None
        return httpx.Response(code, content=content, request=request)


def openssl_reason(stderr: str) -> str:
    """The one cause in `openssl s_client`'s stderr (it prints chains and error stacks)."""
    for line in stderr.splitlines():
        if line.startswith("verify error:"):
            # verify error:num=64:IP address mismatch
            return f"server certificate not accepted: {line.split(':', 2)[-1]}"
    for line in stderr.splitlines():
        if "alert" in line and "error:" in line:
            # ...:ssl3_read_bytes:sslv3 alert bad certificate:../ssl/...: SSL alert number 42
            alert = re.search(r"alert ([a-z ]+)", line)
            what = alert.group(1).strip() if alert else "rejected"
            return f"client certificate rejected by etcd (TLS alert: {what})"
    for line in stderr.splitlines():
        if "Connection refused" in line:
            return "connection refused"
    errors = [m.group(1) for m in re.finditer(r"error:[0-9A-F]+:[^:]*:[^:]*:([^:]+)", stderr)]
    return errors[-1] if errors else last_line(stderr) or "no answer"


class HostInstallation:
    """kubeadm's pki dir on a control-plane host over SSH; checks run from that host.

    The protocol is synchronous (plans are), the hosts layer is not: every call runs on the one
    event loop that owns the SSH connections (`runner`), so connections live across calls.
    """

    def __init__(self, host: Host, pki_dir: PurePosixPath, runner: asyncio.Runner) -> None:
        self.host = host
        self.pki_dir = pki_dir
        self._runner = runner

    @property
    def name(self) -> str:
        return self.host.label

    def _path(self, relative: str) -> PurePosixPath:
        return self.pki_dir / relative

    def read(self, relative: str) -> bytes | None:
        async def read() -> bytes | None:
            state = await self.host.file_state(self._path(relative))
            wanted = (kubeadm.INSTALLED_MODES[relative], kubeadm.INSTALLED_OWNER)
            if state is None or (state.mode, state.owner) != wanted:
                return None
            return await self.host.read_file(self._path(relative))

        return self._runner.run(read())

    def write(self, relative: str, data: bytes, mode: int) -> None:
        path = self._path(relative)

        async def write() -> None:
            await self.host.run(["mkdir", "-p", "-m", "0755", "--", str(path.parent)])
            await self.host.write_file(path, data, mode, kubeadm.INSTALLED_OWNER)

        self._runner.run(write())

    def check(self, endpoints: Sequence[str]) -> list[CheckRow]:
        transport = RelayTransport(self.host, *(self._path(r) for r in _FILES))
        return self._runner.run(check_with(self.name, None, endpoints, transport))

    async def preflight(self, check: bool) -> None:
        """Read-only: root (through sudo), a usable pki dir; for `check`, openssl and the files."""
        argv = ["sh", "-c", _HOST_PROBE, "sh", str(self.pki_dir), *_FILES]
        result = await self.host.run(argv, check=False)
        if result.code != 0:
            raise preflight.probe_failure(self.host, result)
        lines = result.out.splitlines()
        values = dict(line.split("=", 1) for line in lines if "=" in line)
        where = self.name
        if values.get("uid") != "0":
            raise PreflightError(
                f"{where}: commands do not run as root (uid {values.get('uid')}); pass --become "
                "(passwordless sudo) or log in as root"
            )
        if values.get("pki") == "not-a-directory":
            raise PreflightError(f"{where}: {self.pki_dir} is not a directory; fix --pki-dir")
        if not check:
            return
        if values.get("openssl") != "yes":
            raise PreflightError(
                f"{where}: no openssl on the host, which --check runs the test requests with; "
                "install it (apt install openssl / dnf install openssl)"
            )
        missing = [line.split("=", 1)[1] for line in lines if line.startswith("missing=")]
        if missing:
            raise KubeadmError(
                f"{where}: {self._path(missing[0])} not installed; run `etcdforge kubeadm certs "
                f"--control-plane {where}` first"
            )


@contextlib.contextmanager
def control_planes(
    targets: Sequence[SSHTarget], pki_dir: PurePosixPath, check: bool
) -> Iterator[list[HostInstallation]]:
    """Log in to every control plane and preflight all of them before yielding any.

    One failing host (unreachable, refused login, no sudo, no openssl for --check) stops
    everything with one line naming it, before anything is written anywhere.
    """
    labels = [t.label for t in targets]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise KubeadmError(f"--control-plane {twice} is given twice; give each host once")
    from etcdforge.ops.apply import close_all

    hosts: dict[str, Host] = {}
    with asyncio.Runner() as runner:

        async def connect(target: SSHTarget) -> None:
            hosts[target.label] = await SSHHost.connect(target)

        try:
            runner.run(fan_out(targets, lambda t: t.label, connect))
            installations = [HostInstallation(hosts[t.label], pki_dir, runner) for t in targets]
            runner.run(fan_out(installations, lambda i: i.name, lambda i: i.preflight(check)))
            yield installations
        finally:
            runner.run(close_all(hosts))


def certs_on_hosts(
    selection: Selection,
    targets: Sequence[SSHTarget],
    pki_dir: PurePosixPath,
    extra: Sequence[Installation] = (),
    check: bool = False,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> CertsResult:
    """`certs` on control-plane hosts (and any local `extra`), every host preflighted first."""
    if not pki_dir.is_absolute():
        raise KubeadmError(f"--pki-dir {str(pki_dir)!r} must be an absolute path on the hosts")
    record_for(selection)  # a cluster that is not deployed stops before any login
    with control_planes(targets, pki_dir, check) as installations:
        return certs(selection, [*extra, *installations], check, dry_run, progress)


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
    """Snapshot the stacked etcd, restore it into every member, prove the data, print the config.

    The target is a local cluster (`up`) or one on hosts (`apply`): ops.restore hides which.
    """
    paths.validate()
    kubeadm.api_version(api)
    url = _check_source_url(source)
    record = record_for(selection)
    work = _Work(record)
    resumed = work.read_progress()
    if resumed is not None and resumed.source != url:
        raise MigrationError(
            f"a migration from {resumed.source} is in progress in {work.root}; rerun with "
            f"--from {resumed.source} to finish it, or remove {work.root} to abandon it"
        )
    tls = source_tls(source_pki)
    with restore.open_target(selection, record, work.root) as target:
        return _migrate(
            selection, target, work, url, tls, paths, api, replace, bump, dry_run, progress
        )


def _migrate(
    selection: Selection,
    target: restore.RestoreTarget,
    work: _Work,
    url: str,
    tls: TLSFiles,
    paths: KubeadmPaths,
    api: str,
    replace: bool,
    bump: bool,
    dry_run: bool,
    progress: Progress | None,
) -> MigrateResult:
    record = target.record
    tools = target.tools()
    features = target.features()
    warnings: list[str] = []
    bump_by = snapshot.DEFAULT_BUMP if bump and features.can_bump else 0
    if bump and not features.can_bump:
        warnings.append(
            f"{target.restorer()} (etcd {format_version(tools.version)}) has no --bump-revision/"
            "--mark-compacted (etcd 3.5.10+/3.4.27+): revisions carry over unchanged, so keep "
            "every kube-apiserver stopped from the snapshot until the switch-over"
        )
    if work.read_progress() is None:
        # Everything that can refuse does so here, before the first change.
        _preflight_source(url, tls, tools.version)
        _preflight_target(record, replace)

    def snapshot_done() -> bool:
        current = work.read_progress()
        return (
            current is not None
            and work.snapshot.is_file()
            and current.snapshot_sha256 == file_sha256(work.snapshot)
        )

    def snapshot_run() -> None:
        ensure_dir(work.root)
        target.forget()
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
                url, file_sha256(work.snapshot), info.revision, found.count, found.sha256, version
            )
        )

    def restore_steps() -> list[Step]:
        # Built once the snapshot exists: every step restores from that one file.
        current = work.read_progress()
        sha = current.snapshot_sha256 if current is not None else ""
        return target.steps(restore.Snapshot(work.snapshot, sha, bump_by))

    first = execute(
        [Step(f"snapshot the stacked etcd at {url} and verify it", snapshot_done, snapshot_run)],
        progress,
        dry_run,
    )
    rest = execute(restore_steps(), progress, dry_run)
    result = PlanResult(first.changed + rest.changed, first.pending + rest.pending)
    current = work.read_progress()
    if dry_run or current is None:
        return MigrateResult(
            record.name, url, work.snapshot, 0, 0, "", bump_by, result, "", tuple(warnings)
        )
    if progress:
        progress("start every member on the restored data")
    target.start()
    if progress:
        progress("compare /registry/ on every member with the source")
    for endpoint, found in run(_fingerprints(record.endpoints, record.admin_tls)):
        if found.count != current.count or found.sha256 != current.sha256:
            raise MigrationError(
                f"{endpoint} holds {found.count} /registry/ keys (sha256 {found.sha256[:12]}) "
                f"but the source had {current.count} (sha256 {current.sha256[:12]}) at revision "
                f"{current.revision}; nothing was cleaned up: the old data dirs are kept as "
                f"*{restore.ASIDE} for inspection"
            )
    target.finish()
    work.progress.replace(work.last)
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
