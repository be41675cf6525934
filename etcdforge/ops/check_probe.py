"""What a member's process runs with and what its machine holds: the facts behind the CIS rows.

Like kube-bench, the audit reads the live process rather than the files meant for it: a flag
given on the command line and an `ETCD_*` variable in its environment both count (etcd reads
both; a flag wins). On a host one probe script (one SSH round trip) stats the data dir and the
TLS files, measures free space and the clock, and returns the CA files' contents; locally the
same facts come from Python. Both produce a `Probe`, parsed by pure functions tested on recorded
output (`tests/fixtures/check/`).
"""

from __future__ import annotations

import base64
import grp
import os
import pwd
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from etcdforge.errors import HostError
from etcdforge.hosts import Host, last_line
from etcdforge.ops.check_model import FileStat, MemberFacts
from etcdforge.services.runtime import RunningMember

#: The settings naming TLS files; the CA files are also read, for CIS 2.7.
FILE_SETTINGS = (
    "cert-file",
    "key-file",
    "peer-cert-file",
    "peer-key-file",
    "trusted-ca-file",
    "peer-trusted-ca-file",
)
CA_SETTINGS = ("trusted-ca-file", "peer-trusted-ca-file")
KUBERNETES_CA_NAME = "kubernetes-ca"
#: Where kubeadm keeps the Kubernetes cluster CA (CIS 2.7: etcd must not trust it).
KUBERNETES_CA = "/etc/kubernetes/pki/ca.crt"
ENV_PREFIX = "ETCD_"

_HOST_PROBE = r"""
data=$1 kube=$2; shift 2
echo "time=$(date +%s.%N)"
st() { stat -c '%a %U:%G' -- "$1" 2>/dev/null || echo missing; }
[ -n "$data" ] && echo "data=$(st "$data")"
d=${data:-/}; while [ ! -e "$d" ]; do d=$(dirname -- "$d"); done
echo "free=$(df -Pk -- "$d" | awk 'NR==2 {print $4}')"
for pair in "$@"; do
  name=${pair%%=*} path=${pair#*=}
  echo "file.$name=$(st "$path")"
  case $name in *ca-file) [ -f "$path" ] && echo "pem.$name=$(base64 -w0 < "$path")";; esac
done
[ -f "$kube" ] && echo "pem.kubernetes-ca=$(base64 -w0 < "$kube")"
exit 0
"""


def process_settings(argv: Sequence[str], env: Mapping[str, str]) -> dict[str, str]:
    """etcd's settings by flag name: `ETCD_*` variables, overridden by command-line flags.

    Flags may be `--name=value`, `-name=value`, `--name value` or a bare boolean `--name`.
    """
    settings = {
        key.removeprefix(ENV_PREFIX).lower().replace("_", "-"): value
        for key, value in env.items()
        if key.startswith(ENV_PREFIX)
    }
    args = list(argv[1:])
    for index, arg in enumerate(args):
        if not arg.startswith("-") or arg in ("-", "--"):
            continue
        name, sep, value = arg.lstrip("-").partition("=")
        if not sep:
            following = args[index + 1] if index + 1 < len(args) else "-"
            value = "true" if following.startswith("-") else following
        settings[name] = value
    return settings


def running_settings(running: RunningMember) -> dict[str, str]:
    return process_settings(running.argv, running.env)


@dataclass(frozen=True)
class Probe:
    """What the data dir, the TLS files and the clock of one member's machine showed."""

    data_dir_stat: FileStat | None = None
    free_bytes: int | None = None
    files: dict[str, FileStat | None] = field(default_factory=dict)
    pems: dict[str, bytes] = field(default_factory=dict)
    clock_skew: float | None = None


def parse_stat(text: str) -> FileStat | None:
    """`stat -c '%a %U:%G'` output, or `missing`."""
    parts = text.split()
    if len(parts) != 2 or not parts[0].isdigit():
        return None
    return FileStat(int(parts[0], 8), parts[1])


def parse_host_probe(text: str, before: float, after: float) -> Probe:
    """The host probe's `key=value` lines; `before`/`after` bracket it on the admin clock."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        skew: float | None = float(values["time"]) - (before + after) / 2
    except (KeyError, ValueError):
        skew = None
    free = values.get("free", "")
    return Probe(
        data_dir_stat=parse_stat(values.get("data", "")),
        free_bytes=int(free) * 1024 if free.isdigit() else None,
        files={
            key.removeprefix("file."): parse_stat(value)
            for key, value in values.items()
            if key.startswith("file.")
        },
        pems={
            key.removeprefix("pem."): base64.b64decode(value)
            for key, value in values.items()
            if key.startswith("pem.")
        },
        clock_skew=skew,
    )


def host_probe_argv(settings: Mapping[str, str], data_dir: str) -> list[str]:
    pairs = [f"{name}={settings[name]}" for name in FILE_SETTINGS if settings.get(name)]
    return ["sh", "-c", _HOST_PROBE, "sh", data_dir, KUBERNETES_CA, *pairs]


async def probe_host(host: Host, settings: Mapping[str, str], data_dir: str) -> Probe:
    before = time.time()
    result = await host.run(host_probe_argv(settings, data_dir), check=False)
    after = time.time()
    if result.code != 0:
        reason = last_line(result.err) or f"exit {result.code}"
        raise HostError(f"{host.label}: cannot inspect the host ({reason})")
    return parse_host_probe(result.out, before, after)


def _local_stat(path: Path) -> FileStat | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return FileStat(st.st_mode & 0o7777, f"{_user(st.st_uid)}:{_group(st.st_gid)}")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def invoking_owner() -> str:
    """Who owns a local cluster's data: the user running etcdforge."""
    return f"{_user(os.getuid())}:{_group(os.getgid())}"


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            vfs = os.statvfs(candidate)
        except OSError:
            continue
        return vfs.f_bavail * vfs.f_frsize
    return None


def probe_local(settings: Mapping[str, str], data_dir: str) -> Probe:
    """The same facts as the host probe, for a member running on this machine."""
    paths = {name: Path(settings[name]) for name in FILE_SETTINGS if settings.get(name)}
    cas = {name: p for name, p in paths.items() if name in CA_SETTINGS and p.is_file()}
    pems = {name: p.read_bytes() for name, p in cas.items()}
    kubernetes = Path(KUBERNETES_CA)
    if kubernetes.is_file():
        pems[KUBERNETES_CA_NAME] = kubernetes.read_bytes()
    return Probe(
        data_dir_stat=_local_stat(Path(data_dir)) if data_dir else None,
        free_bytes=_free_bytes(Path(data_dir or "/")),
        files={name: _local_stat(p) for name, p in paths.items()},
        pems=pems,
        clock_skew=0.0,
    )


def pem_fingerprints(data: bytes) -> tuple[str, ...]:
    """sha256 of each certificate in a PEM bundle (empty when it holds none)."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        return ()
    return tuple(c.fingerprint(hashes.SHA256()).hex() for c in certs)


def data_dir_of(settings: Mapping[str, str], deployed: str) -> str:
    """The data dir the process uses (kube-bench reads `--data-dir`), else the deployed one."""
    return settings.get("data-dir") or deployed


def member_facts(
    name: str,
    label: str,
    running: RunningMember | None,
    probe: Probe | None,
    expected_owner: str,
    data_dir: str,
    error: str | None = None,
) -> MemberFacts:
    """One member's facts from its process and its machine's probe (either may be missing)."""
    settings = running_settings(running) if running is not None else {}
    probe = probe or Probe()
    return MemberFacts(
        name=name,
        label=label,
        running=running is not None,
        settings=settings,
        error=error,
        data_dir=data_dir,
        data_dir_stat=probe.data_dir_stat,
        files=probe.files,
        free_bytes=probe.free_bytes,
        clock_skew=probe.clock_skew,
        cas={k: pem_fingerprints(v) for k, v in probe.pems.items()},
        expected_owner=expected_owner,
    )
