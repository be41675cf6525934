"""The admin machine's side of `up` and `apply`: the state directory and the cluster record.

Both commands keep the same state on the admin machine (directories, the PKI, `cluster.json`), so
the steps that write it, and the rule that neither changes membership, live here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from etcdforge.binaries import EtcdBinary, format_version
from etcdforge.errors import SpecError
from etcdforge.fsutil import PRIVATE_DIR, ensure_dir
from etcdforge.layout import StateLayout
from etcdforge.ops.plan import Step
from etcdforge.record import ClusterRecord, MemberRecord, write_record
from etcdforge.spec import ClusterSpec


@dataclass(frozen=True)
class Deployment:
    """What `up` and `apply` both report: which cluster, where its state is, which etcd."""

    warnings: tuple[str, ...]  # shown before the summary
    cluster: str
    state_dir: Path
    version: str


def dir_step(title: str, path: Path) -> Step:
    def done() -> bool:
        return path.is_dir() and (path.stat().st_mode & 0o777) == PRIVATE_DIR

    return Step(title, done, lambda: ensure_dir(path))


def record_step(layout: StateLayout, record: ClusterRecord) -> Step:
    data = record.to_json()

    def done() -> bool:
        try:
            return layout.cluster_file.read_bytes() == data
        except FileNotFoundError:
            return False

    return Step("write the cluster record", done, lambda: write_record(layout, record))


def state_dir_steps(layout: StateLayout) -> list[Step]:
    return [
        dir_step("create the state directory", layout.root),
        dir_step("create the PKI directory", layout.pki_dir),
    ]


def build_record(
    spec: ClusterSpec,
    layout: StateLayout,
    binary: EtcdBinary,
    token: str,
    data_dir: Path | None = None,
) -> ClusterRecord:
    """The record of `spec` deployed; `data_dir` is the one path every host uses, if on hosts."""
    return ClusterRecord(
        name=spec.name,
        token=token,
        binary=str(binary.path),
        version=format_version(binary.version),
        members=tuple(
            MemberRecord(
                m.name,
                m.client_url,
                m.peer_url,
                str(data_dir if data_dir is not None else layout.member(m.name).data_dir),
            )
            for m in spec.members
        ),
        spec=spec.model_dump(mode="json"),
        state_dir=str(layout.root),
    )


def _same_members(spec: ClusterSpec, record: ClusterRecord) -> bool:
    wanted = [(m.name, m.client_url, m.peer_url) for m in spec.members]
    return wanted == [(m.name, m.client_url, m.peer_url) for m in record.members]


def check_against_record(spec: ClusterSpec, record: ClusterRecord | None) -> None:
    if record is None or _same_members(spec, record):
        return
    deployed = ", ".join(f"{m.name}={m.client_url}" for m in record.members)
    raise SpecError(
        f"cluster {spec.name} at {record.state_dir} was deployed with members {deployed}; "
        "`up` does not change membership: run `etcdforge down --purge` to start over"
    )
