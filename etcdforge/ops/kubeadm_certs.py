"""`etcdforge kubeadm certs`: the kube-apiserver's etcd CA and apiserver-etcd-client pair.

Certificates go to an `Installation` — somewhere kubeadm's pki directory lives and checks can run
from. The local one writes under a directory; `HostInstallation` is a control-plane host over SSH
(etcdforge.hosts), whose check runs *on that host* through etcdforge.relay with the installed
files, so it proves what the apiserver there will see: its network path, its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

import httpx

from etcdforge import kubeadm, pki
from etcdforge.client import EtcdClient, run
from etcdforge.errors import EtcdClientError, PreflightError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write
from etcdforge.host_logins import close_all
from etcdforge.hosts import Host, SSHHost, SSHTarget, fan_out
from etcdforge.kubeadm import KubeadmError
from etcdforge.ops import preflight
from etcdforge.ops.kubeadm_config import ClusterEndpoints, cluster_endpoints
from etcdforge.ops.plan import SILENT, PlanResult, Progress, Step, execute
from etcdforge.ops.target import Selection, deployed_spec, record_for
from etcdforge.record import ClusterRecord
from etcdforge.relay import RelayTransport
from etcdforge.tls import TLSFiles

CHECK_PREFIX = "/registry/etcdforge-check/"


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


def install_steps(record: ClusterRecord, installation: Installation) -> list[Step]:
    """The etcd CA certificate (never its key) and an apiserver-etcd-client pair of its own."""
    spec = deployed_spec(record)
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
    progress: Progress = SILENT,
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
    progress: Progress = SILENT,
) -> CertsResult:
    """`certs` on control-plane hosts (and any local `extra`), every host preflighted first."""
    if not pki_dir.is_absolute():
        raise KubeadmError(f"--pki-dir {str(pki_dir)!r} must be an absolute path on the hosts")
    record_for(selection)  # a cluster that is not deployed stops before any login
    with control_planes(targets, pki_dir, check) as installations:
        return certs(selection, [*extra, *installations], check, dry_run, progress)
