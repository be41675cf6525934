"""`etcdforge adopt`: take over a cluster built by hand from the seed runbook, changing nothing.

The phases, so that nothing is written for a cluster `adopt` does not fully understand:

1. **connect**: every host logged in to (an unreachable host stops everything);
2. **read hosts**: the running etcd process on each (flags from its command line and
   environment, binary and version, unit), the files its flags name, its data dir
   (`ops.adopt_probe`); a host without etcd, or a file a flag names but that is missing, stops it;
3. **member list**: each member asked for the member list over its https client URL with the
   runbook's `client.pem` (found beside the CA); hosts of two clusters, members that disagree on the
   CA, or a member list that does not match the hosts stop it (`adopt_model`);
4. **admin state**: the PKI imported (`ops.cert_import`; the CA key copied here, 0600), the
   adoption record (names, IDs, token, where the CA keys lie), the cluster record, and last the
   cluster YAML (members, ssh sections, host paths as found: data stays where it is).

A rerun on the same cluster writes the same files; `plan`/`apply` then convert it.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from etcdforge import pki
from etcdforge.adopt_findings import Finding, ca_fingerprints, findings
from etcdforge.adopt_model import (
    Adopted,
    AdoptError,
    HostReading,
    Listing,
    adopted_cluster,
    client_pair_beside,
    common,
    https_client_url,
    parse_listing,
    require_member,
    required_files,
    same_cluster,
    spec_data,
)
from etcdforge.adoption import Adoption, adoption_path, read_adoption, write_adoption
from etcdforge.binaries import EtcdBinary, parse_version, version_problem
from etcdforge.client import EtcdClient
from etcdforge.errors import EtcdClientError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write, ensure_dir
from etcdforge.host_logins import close_all, ssh_target
from etcdforge.hosts import Host, SSHHost, fan_out
from etcdforge.layout import StateLayout
from etcdforge.names import SAFE_NAME
from etcdforge.ops.admin_state import build_record, record_step, state_dir_steps
from etcdforge.ops.adopt_probe import read_host
from etcdforge.ops.cert_import import import_steps
from etcdforge.ops.certs import SEED_FILES, common_name
from etcdforge.ops.plan import SILENT, Progress, Step, execute
from etcdforge.ops.target import Selection, state_dir_for
from etcdforge.record import ClusterRecord, read_record
from etcdforge.spec import ClusterSpec, SSHSpec, parse_spec
from etcdforge.tls import TLSFiles

LIST_TIMEOUT = 10.0
#: Where `adopt` got the PKI from, in the import marker.
ORIGIN = "adopted from the members' running etcd"


@dataclass(frozen=True)
class AdoptResult:
    cluster: str
    spec_path: Path
    state_dir: Path
    adopted: Adopted
    findings: tuple[Finding, ...]
    changed: tuple[str, ...]


@dataclass(frozen=True)
class Target:
    """One `--host`: the label every message uses, and how to log in."""

    label: str
    ssh: SSHSpec


def adopt(
    targets: Sequence[Target],
    output: Path,
    name: str | None = None,
    state_dir: Path | None = None,
    release: str | None = None,
    progress: Progress = SILENT,
) -> AdoptResult:
    readings, listing = asyncio.run(read_cluster(targets, progress))
    adopted = adopted_cluster(readings, listing, ca_fingerprints)
    common(readings, "the peer certificate's CN", _peer_cn)
    spec = adopted_spec(adopted, targets, output, name, state_dir, release)
    layout = StateLayout(state_dir_for(Selection(output, state_dir), spec))
    _refuse_other_cluster(layout, adopted)
    _refuse_other_file(output, spec)
    by_name = dict(zip((m.name for m in adopted.members), readings, strict=True))
    progress.phase("admin state")
    with tempfile.TemporaryDirectory(prefix="etcdforge-adopt-") as staging:
        member_dirs = stage_pki(Path(staging), adopted, by_name)
        steps = [
            *state_dir_steps(layout),
            *import_steps(spec, layout, Path(staging), member_dirs, ORIGIN),
            _adoption_step(layout, Adoption(adopted)),
            record_step(layout, _record(spec, layout, adopted)),
            _spec_step(output, spec),
        ]
        result = execute(steps, progress, where="admin")
    keys = [p for paths in adopted.ca_keys.values() for p in paths]
    found = findings(list(by_name.items()), keys)
    return AdoptResult(spec.name, output, layout.root, adopted, tuple(found), result.changed)


# --- reading the cluster -------------------------------------------------------------------


async def read_cluster(
    targets: Sequence[Target], progress: Progress
) -> tuple[list[HostReading], Listing]:
    progress.phase("connect")
    hosts: dict[str, Host] = {}

    async def login(target: Target) -> None:
        hosts[target.label] = await SSHHost.connect(
            ssh_target(target.label, target.ssh.host or target.label, target.ssh)
        )

    try:
        await fan_out(targets, lambda t: t.label, login)
        progress.phase("read hosts")
        readings = await fan_out(targets, lambda t: t.label, lambda t: read_host(hosts[t.label]))
    finally:
        await close_all(hosts)
    for reading in readings:
        require_member(reading)
        required_files(reading)
    progress.phase("member list")
    listings = await asyncio.gather(*(member_listing(r) for r in readings))
    return readings, same_cluster({r.label: li for r, li in zip(readings, listings, strict=True)})


async def member_listing(reading: HostReading) -> Listing:
    """The member list as this member answers it, with the runbook's client certificate."""
    ca_path = reading.settings["trusted-ca-file"]
    cert_path, key_path = client_pair_beside(ca_path)
    missing = [p for p in (cert_path, key_path) if reading.files.get(p) is None]
    if missing:
        raise AdoptError(
            f"{reading.label}: {missing[0]} is missing; adopt reads the member list with the "
            "runbook's client certificate, kept beside the CA (client.pem, client-key.pem)"
        )
    url = https_client_url(reading)
    with tempfile.TemporaryDirectory(prefix="etcdforge-adopt-tls-") as work:
        files = TLSFiles(Path(work) / "ca.pem", Path(work) / "client.pem", Path(work) / "key.pem")
        for target, source in ((files.ca, ca_path), (files.cert, cert_path), (files.key, key_path)):
            atomic_write(target, reading.files[source] or b"", PRIVATE_FILE)
        try:
            async with EtcdClient([url], files, timeout=LIST_TIMEOUT) as client:
                payload = await client.call(url, "/v3/cluster/member/list")
        except EtcdClientError as exc:
            raise AdoptError(
                f"{reading.label}: cannot read the member list at {url} with {cert_path} ({exc}); "
                "check that the member is healthy and trusts that certificate"
            ) from None
    return parse_listing(payload)


def _peer_cn(reading: HostReading) -> str:
    data = reading.files.get(reading.settings.get("peer-cert-file", "")) or b""
    return common_name(x509.load_pem_x509_certificate(data))


# --- the admin state -----------------------------------------------------------------------


def adopted_spec(
    adopted: Adopted,
    targets: Sequence[Target],
    output: Path,
    name: str | None,
    state_dir: Path | None,
    release: str | None,
) -> ClusterSpec:
    logins = {
        t.label: {"host": t.ssh.host or t.label}
        | t.ssh.model_dump(mode="json", exclude_defaults=True, exclude={"host"})
        for t in targets
    }
    etcd: dict[str, object] = {"release": release} if release else {"version": adopted.version}
    if version_problem(parse_version(adopted.version)):
        etcd["allow_unsafe_version"] = True  # as found; `plan` lists it with its fix
    token_name = adopted.token.lower()
    cluster = name or (token_name if SAFE_NAME.match(token_name) else "adopted")
    where = str(state_dir.absolute()) if state_dir is not None else None
    data = spec_data(adopted, cluster, logins, etcd, where)
    return parse_spec(data, source=str(output), allow_even=True)


def _refuse_other_cluster(layout: StateLayout, adopted: Adopted) -> None:
    record = read_record(layout.root)
    if record is None:
        return
    previous = read_adoption(layout)
    if previous is None or previous.found.cluster_id != adopted.cluster_id:
        raise AdoptError(
            f"{layout.root} already holds cluster {record.name}; pass --state-dir (or --name) "
            "for the adopted cluster"
        )


def stage_pki(
    staging: Path, adopted: Adopted, readings: Mapping[str, HostReading]
) -> dict[str, Path]:
    """The PKI as `cert_import` reads it: CA, CA key and client pair, and each member's pairs."""
    first = readings[adopted.members[0].name]
    settings = first.settings
    client, client_key = client_pair_beside(settings["trusted-ca-file"])
    shared = {"ca": (settings["trusted-ca-file"], None), "client": (client, client_key)}
    _stage(staging, first, shared)
    key = _ca_key(adopted, readings, first.files[settings["trusted-ca-file"]] or b"")
    if key is not None:
        atomic_write(staging / SEED_FILES["ca"][1], key, PRIVATE_FILE)
    member_dirs = {}
    for member in adopted.members:
        reading = readings[member.name]
        own = reading.settings
        pairs = {
            "ca": (own["trusted-ca-file"], None),
            "server": (own["cert-file"], own["key-file"]),
            "peer": (own["peer-cert-file"], own["peer-key-file"]),
        }
        member_dirs[member.name] = _stage(ensure_dir(staging / member.name), reading, pairs)
    return member_dirs


def _ca_key(adopted: Adopted, readings: Mapping[str, HostReading], ca_pem: bytes) -> bytes | None:
    """The CA key found on a member that really belongs to the CA (signing needs it later)."""
    ca = x509.load_pem_x509_certificate(ca_pem)
    for name, paths in adopted.ca_keys.items():
        for path in paths:
            data = readings[name].files.get(path)
            try:
                key = serialization.load_pem_private_key(data or b"", password=None)
            except (ValueError, TypeError):
                continue
            if isinstance(key, pki.PrivateKey) and pki.key_matches(ca, key):
                return data
    return None


def _stage(
    directory: Path, reading: HostReading, pairs: Mapping[str, tuple[str, str | None]]
) -> Path:
    for role, (cert, key) in pairs.items():
        cert_name, key_name = SEED_FILES[role]
        atomic_write(directory / cert_name, reading.files[cert] or b"", PUBLIC_FILE)
        if key is not None:
            atomic_write(directory / key_name, reading.files[key] or b"", PRIVATE_FILE)
    return directory


def _record(spec: ClusterSpec, layout: StateLayout, adopted: Adopted) -> ClusterRecord:
    binary = EtcdBinary(Path(adopted.bin_dir) / "etcd", parse_version(adopted.version))
    return build_record(spec, layout, binary, adopted.token, Path(adopted.data_dir))


def _adoption_step(layout: StateLayout, adoption: Adoption) -> Step:
    data = adoption.to_json()

    def done() -> bool:
        path = adoption_path(layout)
        return path.exists() and path.read_bytes() == data

    return Step("write the adoption record", done, lambda: write_adoption(layout, adoption))


def spec_text(spec: ClusterSpec) -> str:
    data = spec.model_dump(mode="json", exclude_defaults=True)
    header = (
        f"# Cluster {spec.name}, adopted by `etcdforge adopt` from its running members.\n"
        "# Next: `etcdforge plan -f THIS_FILE` lists what is wrong and the conversion;\n"
        "# `etcdforge apply -f THIS_FILE` converts it live, one member at a time.\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


def _spec_step(output: Path, spec: ClusterSpec) -> Step:
    data = spec_text(spec).encode()

    def done() -> bool:
        return output.exists() and output.read_bytes() == data

    return Step(f"write {output}", done, lambda: atomic_write(output, data, PUBLIC_FILE))


def _refuse_other_file(output: Path, spec: ClusterSpec) -> None:
    if output.exists() and output.read_bytes() != spec_text(spec).encode():
        raise AdoptError(
            f"{output}: already exists with other content; remove it or pass another -o"
        )
