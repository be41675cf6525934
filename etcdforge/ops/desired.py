"""What one host should hold, rendered on the admin machine, and what its service then needs.

Pure rendering plus one read of the live process: `plan` shows it, `apply` converges to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from etcdforge import render
from etcdforge.binaries import Version
from etcdforge.layout import StateLayout
from etcdforge.ops.cert_import import peer_allowed_cn
from etcdforge.release import Release, version_dir
from etcdforge.services import systemd
from etcdforge.services.runtime import ServiceAction
from etcdforge.services.systemd import SystemdRuntime
from etcdforge.spec import ClusterSpec, HostPathsSpec, MemberSpec


@dataclass(frozen=True)
class Desired:
    """What one host should hold, rendered on the admin machine."""

    env_text: str
    unit_text: str
    pki: list[tuple[PurePosixPath, Path, bool]]  # host path, admin source, is a private key


def host_member_files(paths: HostPathsSpec) -> render.MemberFiles:
    return render.MemberFiles(data_dir=Path(paths.data_dir), pki_dir=Path(paths.pki_dir))


def desired(
    spec: ClusterSpec,
    layout: StateLayout,
    member: MemberSpec,
    token: str,
    initial_state: str = "new",
    initial_cluster: str | None = None,
    version: Version | None = None,
) -> Desired:
    """`initial_state`/`initial_cluster`: see `render.etcd_settings` (a member that joins);
    `version`: the release the member runs (which corruption checks it supports)."""
    paths = spec.host_paths
    files = host_member_files(paths)
    allowed_cn = peer_allowed_cn(layout)  # an imported single-CA PKI: pin the peer port
    settings = render.etcd_settings(
        spec,
        member,
        files,
        token,
        initial_state,
        peer_allowed_cn=allowed_cn,
        initial_cluster=initial_cluster,
        version=version,
    )
    env_text = render.as_env_file(settings)
    local = layout.member(member.name)
    pki = [
        (PurePosixPath(files.trusted_ca), local.trusted_ca, False),
        (PurePosixPath(files.peer_trusted_ca), local.peer_trusted_ca, False),
        (PurePosixPath(files.server_cert), local.server_cert, False),
        (PurePosixPath(files.server_key), local.server_key, True),
        (PurePosixPath(files.peer_cert), local.peer_cert, False),
        (PurePosixPath(files.peer_key), local.peer_key, True),
    ]
    cas = b"".join(read_or_none(src) or b"" for _, src, _ in pki[:2])
    unit_text = systemd.render_unit(paths, spec.name, member.name, extra=cas)
    return Desired(env_text, unit_text, pki)


async def service_action(
    runtime: SystemdRuntime, name: str, paths: HostPathsSpec, release: Release, want: Desired
) -> ServiceAction | None:
    """Decided from the live process, so a run killed after writing files still restarts."""
    running = await runtime.running_with(name)
    return systemd.service_action(
        running, want.env_text, want.unit_text, version_dir(paths, release)
    )


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
