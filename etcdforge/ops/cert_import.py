"""Importing a PKI laid out as the seed leaves it (`up --pki-dir`), and verifying it later."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from etcdforge import pki
from etcdforge.cluster_certs import required_hosts
from etcdforge.errors import PKIError
from etcdforge.fsutil import PRIVATE_FILE, PUBLIC_FILE, atomic_write
from etcdforge.layout import StateLayout
from etcdforge.ops.cert_check import CertEntry, check_entry, seed_entries
from etcdforge.ops.certs import (
    IMPORT_MARKER,
    SEED_FILES,
    cluster_pki_steps,
    common_name,
    copy_step,
    utcnow,
)
from etcdforge.ops.plan import Step

if TYPE_CHECKING:  # the spec pulls in pydantic; gencert and check never need it
    from etcdforge.spec import ClusterSpec


# --- importing a seed PKI ------------------------------------------------------------------


def import_marker(layout: StateLayout) -> dict[str, Any] | None:
    path = layout.pki_dir / IMPORT_MARKER
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise PKIError(
            f"{path}: unreadable import marker; remove it and rerun `up --pki-dir`"
        ) from None
    return data if isinstance(data, dict) else None


def validate_seed(
    spec: ClusterSpec, directory: Path, member_dirs: Mapping[str, Path] | None = None
) -> None:
    """Refuse a seed PKI that etcd would reject, before anything is copied or started.

    With `member_dirs` each member's server and peer pair (and a copy of ca.pem) comes from its
    own directory and is checked against its own address; `directory` holds the CA and client.
    """
    if not directory.is_dir():
        raise PKIError(f"{directory}: no such directory; pass the directory that holds ca.pem")
    shared = ("client", "ca") if member_dirs else ("server", "peer", "client", "ca")
    _require_files(directory, shared)
    groups = [(directory, [m.address for m in spec.members])]
    if member_dirs:
        groups = [(directory, [])]
        for member in spec.members:
            _require_files(member_dirs[member.name], ("server", "peer", "ca"))
            groups.append((member_dirs[member.name], [member.address]))
    for source, addresses in groups:
        _check_entries(source, addresses)


def _require_files(directory: Path, roles: Sequence[str]) -> None:
    for role in roles:
        cert_name, key_name = SEED_FILES[role]
        if not (directory / cert_name).exists():
            raise PKIError(
                f"{directory / cert_name}: missing; the directory needs ca.pem, server.pem, "
                "peer.pem and client.pem with their -key.pem files (cfssljson -bare names)"
            )
        if role != "ca" and not (directory / key_name).exists():
            raise PKIError(f"{directory / key_name}: missing; it is the key of {cert_name}")


def _check_entries(directory: Path, addresses: list[str]) -> None:
    entries = seed_entries(directory, addresses)
    wanted = {SEED_FILES[r][0] for r in ("ca", "server", "peer", "client")}
    now = utcnow()
    for entry in entries:
        if entry.cert.name not in wanted:
            continue
        row = check_entry(entry, dt.timedelta(0), now)
        if row.problems:
            fix = "reissue it (etcdforge certs gencert)"
            if any(p.startswith("no SAN for") for p in row.problems):
                fix = "reissue it with every member address (and 127.0.0.1) in the CSR's hosts"
            raise PKIError(f"{entry.cert}: {'; '.join(row.problems)}; {fix}")


def _import_pairs(
    layout: StateLayout,
    spec: ClusterSpec,
    directory: Path,
    member_dirs: Mapping[str, Path] | None = None,
) -> list[tuple[Path, Path, int]]:
    ca, ca_key = (directory / n for n in SEED_FILES["ca"])
    client, client_key = (directory / n for n in SEED_FILES["client"])
    pairs = [
        (ca, layout.ca_cert, PUBLIC_FILE),
        (ca, layout.peer_ca_cert, PUBLIC_FILE),
        (client, layout.admin_cert, PUBLIC_FILE),
        (client_key, layout.admin_key, PRIVATE_FILE),
    ]
    if ca_key.exists():
        pairs += [(ca_key, layout.ca_key, PRIVATE_FILE), (ca_key, layout.peer_ca_key, PRIVATE_FILE)]
    for member in spec.members:
        files = layout.member(member.name)
        own = member_dirs[member.name] if member_dirs else directory
        server, server_key = (own / n for n in SEED_FILES["server"])
        peer, peer_key = (own / n for n in SEED_FILES["peer"])
        pairs += [
            (server, files.server_cert, PUBLIC_FILE),
            (server_key, files.server_key, PRIVATE_FILE),
            (peer, files.peer_cert, PUBLIC_FILE),
            (peer_key, files.peer_key, PRIVATE_FILE),
            (ca, files.trusted_ca, PUBLIC_FILE),
            (ca, files.peer_trusted_ca, PUBLIC_FILE),
        ]
    return pairs


def import_steps(
    spec: ClusterSpec,
    layout: StateLayout,
    directory: Path,
    member_dirs: Mapping[str, Path] | None = None,
    origin: str | None = None,
) -> list[Step]:
    """Copy a seed PKI into the state dir; refuse to overwrite certificates that differ.

    `member_dirs` and `origin` serve `adopt`: each member's own pair, read from its host, and
    where the PKI came from (the marker's `source`) instead of a directory kept on this machine.
    """
    directory = directory.absolute()
    validate_seed(spec, directory, member_dirs)
    pairs = _import_pairs(layout, spec, directory, member_dirs)
    for source, target, _ in pairs:
        if target.exists() and target.read_bytes() != source.read_bytes():
            raise PKIError(
                f"{target}: cluster {spec.name} already has other certificates than {directory} "
                "(its own, or renewed since the import); run `etcdforge up` without --pki-dir, "
                "or `etcdforge down --purge` to start over"
            )
    steps = [
        copy_step(
            f"import {source.name} as {target.relative_to(layout.root)}", source, target, mode
        )
        for source, target, mode in pairs
    ]
    peer_dir = member_dirs[spec.members[0].name] if member_dirs else directory
    marker = {
        "source": origin or str(directory),
        "peer_cn": common_name(pki.load_cert(peer_dir / SEED_FILES["peer"][0])),
    }
    data = (json.dumps(marker, indent=2) + "\n").encode()
    marker_path = layout.pki_dir / IMPORT_MARKER

    def marker_done() -> bool:
        return marker_path.exists() and json.loads(marker_path.read_text()) == marker

    steps.append(
        Step(
            "record that the PKI is imported",
            marker_done,
            lambda: atomic_write(marker_path, data, PRIVATE_FILE),
        )
    )
    return steps


def _verify_step(name: str, entries: list[CertEntry]) -> Step:
    def problems() -> list[str]:
        now = utcnow()
        rows = [check_entry(e, dt.timedelta(0), now) for e in entries]
        return [f"{r.file}: {r.status}" for r in rows if not r.ok]

    def fail() -> None:
        raise PKIError(
            f"{problems()[0]}; run `etcdforge certs renew --member {name}` "
            "(or `etcdforge up --pki-dir DIR` with fixed files)"
        )

    return Step(f"check imported certificates of {name}", lambda: not problems(), fail)


def imported_verify_steps(spec: ClusterSpec, layout: StateLayout) -> list[Step]:
    """An imported PKI is the user's: `up` checks it and says what to do, never reissues."""
    steps = []
    for member in spec.members:
        files = layout.member(member.name)
        entries = [
            CertEntry(
                f"{member.name}/server",
                pki.Role.SERVER,
                files.server_cert,
                files.server_key,
                files.trusted_ca,
                required_hosts(member.address, pki.Role.SERVER),
            ),
            CertEntry(
                f"{member.name}/peer",
                pki.Role.PEER,
                files.peer_cert,
                files.peer_key,
                files.peer_trusted_ca,
                required_hosts(member.address, pki.Role.PEER),
            ),
        ]

        steps.append(_verify_step(member.name, entries))
    return steps


def pki_steps(spec: ClusterSpec, layout: StateLayout, pki_dir: Path | None = None) -> list[Step]:
    """What `up` runs for certificates: import a seed PKI, verify an imported one, or issue."""
    if pki_dir is not None:
        return import_steps(spec, layout, pki_dir)
    if import_marker(layout) is not None:
        return imported_verify_steps(spec, layout)
    return cluster_pki_steps(spec, layout)


def peer_allowed_cn(layout: StateLayout, pki_dir: Path | None = None) -> str | None:
    """The CN the peer port accepts when peers and clients share a CA (an imported PKI)."""
    if pki_dir is not None:
        return common_name(pki.load_cert(pki_dir / SEED_FILES["peer"][0]))
    marker = import_marker(layout)
    return str(marker["peer_cn"]) if marker is not None else None
