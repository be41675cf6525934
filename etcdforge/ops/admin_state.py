"""The admin machine's side of `up` and `apply`: the state directory and the cluster record.

Both commands keep the same state on the admin machine (directories, the PKI, `cluster.json`), so
the steps that write it live here once. Membership changes are `ops.membership`'s: by the time
the record is written here, the live members are the spec's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from etcdforge.binaries import EtcdBinary, format_version
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
    previous: ClusterRecord | None = None,
) -> ClusterRecord:
    """The record of `spec` deployed; `data_dir` is the one path every host uses, if on hosts.

    Members keep the initial-cluster-state `previous` records for them: "existing" for those
    that joined a running cluster.
    """
    states = initial_states(spec, previous)
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
                states[m.name],
            )
            for m in spec.members
        ),
        spec=spec.model_dump(mode="json"),
        state_dir=str(layout.root),
    )


def initial_states(spec: ClusterSpec, previous: ClusterRecord | None) -> dict[str, str]:
    """Each member's initial-cluster-state: "new" when it bootstraps the cluster, else as
    recorded, and "existing" for a member the record does not know (it joins)."""
    known = {(m.name, m.peer_url): m.initial_state for m in previous.members} if previous else {}
    fallback = "existing" if previous is not None else "new"
    return {m.name: known.get((m.name, m.peer_url), fallback) for m in spec.members}
