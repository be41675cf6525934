"""Members of a local cluster joining and leaving: their files under the state dir, and the
supervisor that runs them (`services.local`).

A member's flags file is what it starts with. A joining member's says initial-cluster-state
existing and lists the live members; `up` later rewrites every member's flags file to name the
final member list (etcd reads those flags only when a member bootstraps or joins, so nobody
restarts for it). A member that leaves keeps its certificates and log; its data dir is renamed
aside (`data.removed-<time>`), so the same name can join again later on an empty one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from etcdforge import render
from etcdforge.binaries import Version, parse_version
from etcdforge.errors import PKIError
from etcdforge.fsutil import PRIVATE_FILE, atomic_write, remove_tree
from etcdforge.layout import StateLayout
from etcdforge.ops.admin_state import dir_step
from etcdforge.ops.cert_import import import_marker, peer_allowed_cn
from etcdforge.ops.certs import member_pki_steps
from etcdforge.ops.health import HEALTH_TIMEOUT
from etcdforge.ops.membership import Membership
from etcdforge.ops.plan import SILENT, Progress, Step, execute
from etcdforge.record import ClusterRecord, MemberRecord, write_record
from etcdforge.services.local import LocalRuntime
from etcdforge.spec import ClusterSpec


def flags_step(path: Path, flags: list[str], name: str) -> Step:
    """Keep the flags on disk: what a member runs with is inspectable and diffable."""
    data = "".join(f"{flag}\n" for flag in flags).encode()

    def done() -> bool:
        try:
            return path.read_bytes() == data
        except FileNotFoundError:
            return False

    return Step(
        f"write etcd flags for {name}", done, lambda: atomic_write(path, data, PRIVATE_FILE)
    )


def set_aside(data_dir: Path, purge: bool) -> Path | None:
    """Rename a data dir out of the way (or delete it with `purge`); where it went, if anywhere."""
    if not data_dir.exists():
        return None
    if purge:
        remove_tree(data_dir)
        return None
    target = data_dir.with_name(f"{data_dir.name}.removed-{time.strftime('%Y%m%dT%H%M%S')}")
    data_dir.rename(target)
    return target


class LocalProvisioner:
    """`ops.membership.Provisioner` for members that run on this machine."""

    def __init__(
        self,
        spec: ClusterSpec,
        layout: StateLayout,
        runtime: LocalRuntime,
        version: Version,
        progress: Progress,
    ) -> None:
        self.spec, self.layout, self.runtime, self.progress = spec, layout, runtime, progress
        self.version = version

    def data_dir(self, name: str) -> str:
        return str(self.layout.member(name).data_dir)

    async def has_data(self, name: str) -> bool:
        return (self.layout.member(name).data_dir / "member").exists()

    async def provision(self, name: str, token: str, initial_cluster: str) -> None:
        if import_marker(self.layout) is not None:
            raise PKIError(
                f"cluster {self.spec.name} runs on an imported PKI ({self.layout.pki_dir}), so "
                f"etcdforge issues no certificates for a new member {name}; add its address to "
                "server.pem and peer.pem and import them again with `up --pki-dir`"
            )
        member = self.spec.member(name)
        files = self.layout.member(name)
        settings = render.etcd_settings(
            self.spec,
            member,
            files,
            token,
            initial_state="existing",
            peer_allowed_cn=peer_allowed_cn(self.layout),
            initial_cluster=initial_cluster,
            version=self.version,  # the settings `up` renders: no restart after joining
        )
        steps = [
            *member_pki_steps(self.spec, self.layout, member),
            dir_step(f"create the data directory of {name}", files.data_dir),
            flags_step(files.flags_file, render.as_flags(settings), name),
        ]
        execute(steps, self.progress, where=name)

    async def retire(self, member: MemberRecord, purge_data: bool) -> str | None:
        await self.runtime.stop(member.name)  # etcd exits by itself once removed; make sure
        await asyncio.to_thread(set_aside, self.layout.member(member.name).data_dir, purge_data)
        return None


def membership(
    spec: ClusterSpec,
    layout: StateLayout,
    record: ClusterRecord,
    progress: Progress = SILENT,
    timeout: float = HEALTH_TIMEOUT,
) -> Membership:
    """The membership machinery of a local cluster, saving the record into its state dir."""
    runtime = LocalRuntime(record)
    version = parse_version(record.version)
    provisioner = LocalProvisioner(spec, layout, runtime, version, progress)
    return Membership(
        record, spec, runtime, provisioner, lambda r: write_record(layout, r), progress, timeout
    )
