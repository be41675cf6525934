"""`etcdforge plan` / `apply`: converge a cluster of real hosts to its spec, over SSH.

Order, so that a mistake anywhere stops before anything changes everywhere:

1. the spec and the release (downloaded, verified, cached here; a bad version refused);
2. every host logged in to and probed in parallel, all preflight checks on all hosts;
3. the PKI and the cluster record on the admin machine (CA keys never leave it);
4. every host's files, in parallel: user, release, stable path, directories, its own keys and
   the CA certificates, the environment file, the unit;
5. services: members that are not running start together (a new cluster needs a quorum to become
   ready); members running with other settings, unit or binary restart one at a time, followers
   first, each only once the whole cluster is healthy.

Every step checks live state first, and restarts are decided from the running process itself,
so a rerun after a kill resumes, and a rerun on a converged cluster changes and restarts nothing.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from etcdforge import release as releases
from etcdforge import render
from etcdforge.binaries import EtcdBinary, check_version, format_version
from etcdforge.errors import HostError, ServiceError, SpecError
from etcdforge.hosts import Host, SSHHost, SSHTarget, fan_out, sha256
from etcdforge.layout import StateLayout
from etcdforge.ops import preflight
from etcdforge.ops.certs import cluster_pki_steps
from etcdforge.ops.plan import AsyncStep, Step, execute, execute_async
from etcdforge.ops.target import Selection, spec_for_up
from etcdforge.ops.up import _dir_step, _record_step, build_record, check_against_record
from etcdforge.record import ClusterRecord, new_token
from etcdforge.services import systemd
from etcdforge.spec import ClusterSpec, HostPathsSpec, MemberSpec, SSHSpec

HEALTH_TIMEOUT = 120.0
HEALTH_POLL = 0.2
DISTRO_UNIT = "etcd.service"

HostProgress = Callable[[str, str], None]


@dataclass(frozen=True)
class HostResult:
    member: str
    label: str
    changes: tuple[str, ...]  # done (apply) or pending with a diff summary (plan)
    service: str | None  # "start", "restart (why)", or None


@dataclass(frozen=True)
class ApplyResult:
    cluster: str
    state_dir: Path
    version: str
    dry_run: bool
    admin_changes: tuple[str, ...]
    hosts: tuple[HostResult, ...]
    warnings: tuple[str, ...]

    @property
    def changed_anything(self) -> bool:
        return bool(self.admin_changes) or any(h.changes or h.service for h in self.hosts)


def target_for(member: MemberSpec) -> SSHTarget:
    ssh = member.ssh
    if ssh is None:
        raise SpecError(f"member {member.name} has no ssh section; `apply` deploys to hosts")
    host = ssh.host or member.address
    return ssh_target(f"{member.name} ({host})", host, ssh)


def ssh_target(label: str, host: str, ssh: SSHSpec) -> SSHTarget:
    """An `ssh` section (a member's, or a control plane's from the command line) as a login."""
    return SSHTarget(
        label=label,
        host=host,
        port=ssh.port,
        user=ssh.user,
        identity_file=ssh.identity_file.expanduser() if ssh.identity_file else None,
        known_hosts=ssh.known_hosts.expanduser() if ssh.known_hosts else None,
        sudo=ssh.sudo,
        connect_timeout=ssh.connect_timeout,
    )


def load_host_spec(
    selection: Selection, allow_even: bool = False
) -> tuple[ClusterSpec, StateLayout, ClusterRecord | None]:
    if selection.file is None:
        raise SpecError("this command needs the cluster YAML: pass -f cluster.yaml")
    spec, layout, previous = spec_for_up(selection, None, allow_even)
    if not spec.on_hosts:
        raise SpecError(
            f"{selection.file}: members have no ssh section, so this is a local cluster; "
            "use `etcdforge up -f` for it, or add ssh sections for real hosts"
        )
    return spec, layout, previous


async def connect_all(spec: ClusterSpec) -> dict[str, Host]:
    """Log in to every host in parallel; on any failure, close the others and raise."""
    hosts: dict[str, Host] = {}

    async def one(member: MemberSpec) -> None:
        hosts[member.name] = await SSHHost.connect(target_for(member))

    try:
        await fan_out(spec.members, lambda m: target_for(m).label, one)
    except BaseException:
        await close_all(hosts)
        raise
    return {m.name: hosts[m.name] for m in spec.members}


async def close_all(hosts: dict[str, Host]) -> None:
    await asyncio.gather(*(h.close() for h in hosts.values()), return_exceptions=True)


def member_files(paths: HostPathsSpec) -> render.MemberFiles:
    pki = Path(paths.pki_dir)
    return render.MemberFiles(
        data_dir=Path(paths.data_dir),
        server_cert=pki / "server.crt",
        server_key=pki / "server.key",
        peer_cert=pki / "peer.crt",
        peer_key=pki / "peer.key",
        trusted_ca=pki / "ca.crt",
        peer_trusted_ca=pki / "peer-ca.crt",
    )


@dataclass(frozen=True)
class Desired:
    """What one host should hold, rendered on the admin machine."""

    env_text: str
    unit_text: str
    pki: list[tuple[PurePosixPath, Path, bool]]  # host path, admin source, is a private key


def desired(spec: ClusterSpec, layout: StateLayout, member: MemberSpec, token: str) -> Desired:
    paths = spec.host_paths
    files = member_files(paths)
    env_text = render.as_env_file(render.etcd_settings(spec, member, files, token))
    local = layout.member(member.name)
    pki = [
        (PurePosixPath(files.trusted_ca), local.trusted_ca, False),
        (PurePosixPath(files.peer_trusted_ca), local.peer_trusted_ca, False),
        (PurePosixPath(files.server_cert), local.server_cert, False),
        (PurePosixPath(files.server_key), local.server_key, True),
        (PurePosixPath(files.peer_cert), local.peer_cert, False),
        (PurePosixPath(files.peer_key), local.peer_key, True),
    ]
    cas = b"".join(_read(src) or b"" for _, src, _ in pki[:2])
    unit_text = systemd.render_unit(paths, spec.name, member.name, extra=cas)
    return Desired(env_text, unit_text, pki)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


# --- steps on one host ------------------------------------------------------------------------


def file_step(
    host: Host,
    title: str,
    path: PurePosixPath,
    data: Callable[[], bytes | None],
    mode: int,
    owner: str,
    secret: bool = False,
) -> AsyncStep:
    async def is_done() -> bool:
        wanted = data()
        state = await host.file_state(path)
        return wanted is not None and state is not None and state.matches(wanted, mode, owner)

    async def run() -> None:
        wanted = data()
        if wanted is None:
            raise HostError(f"{host.label}: internal: no content for {path}")
        await host.write_file(path, wanted, mode, owner)

    async def explain() -> str:
        state = await host.file_state(path)
        if state is None:
            return "create"
        wanted = data()
        notes = []
        if wanted is None:
            notes.append("new certificate")
        elif state.sha256 != sha256(wanted):
            notes.append("content changes" if secret else await _diff(host, path, wanted))
        if state.mode != mode:
            notes.append(f"mode {state.mode:04o} -> {mode:04o}")
        if state.owner != owner:
            notes.append(f"owner {state.owner} -> {owner}")
        return "; ".join(notes)

    return AsyncStep(title, is_done, run, explain)


async def _diff(host: Host, path: PurePosixPath, wanted: bytes) -> str:
    """`+2 -2 lines (ETCD_INITIAL_CLUSTER)`: enough to see what a change is about."""
    old = (await host.read_file(path) or b"").decode(errors="replace").splitlines()
    new = wanted.decode(errors="replace").splitlines()
    added = removed = 0
    keys: list[str] = []
    for line in difflib.unified_diff(old, new, lineterm="", n=0):
        if line.startswith(("+++", "---", "@@")):
            continue
        if line.startswith("+"):
            added += 1
        elif line.startswith("-"):
            removed += 1
        key = line[1:].split("=", 1)[0]
        if "=" in line and key not in keys:
            keys.append(key)
    named = f" ({', '.join(keys[:4])}{', …' if len(keys) > 4 else ''})" if keys else ""
    return f"+{added} -{removed} lines{named}"


def _command_step(
    host: Host, title: str, check: Sequence[str], do: Sequence[Sequence[str]]
) -> AsyncStep:
    async def is_done() -> bool:
        return (await host.run(check, check=False)).code == 0

    async def run() -> None:
        for argv in do:
            await host.run(argv)

    return AsyncStep(title, is_done, run)


def _dirs_step(host: Host, paths: HostPathsSpec) -> AsyncStep:
    user = paths.user
    wanted = [
        (paths.config_dir, "755", "root:root"),
        (paths.pki_dir, "750", f"root:{user}"),
        (paths.data_dir, "700", f"{user}:{user}"),
    ]
    expect = "\n".join(f"{mode} {owner}" for _, mode, owner in wanted)

    async def is_done() -> bool:
        argv = ["stat", "-c", "%a %U:%G", "--", *(str(p) for p, _, _ in wanted)]
        result = await host.run(argv, check=False)
        return result.code == 0 and result.out.strip() == expect

    async def run() -> None:
        for path, mode, owner in wanted:
            uid, gid = owner.split(":")
            await host.run(["install", "-d", "-m", mode, "-o", uid, "-g", gid, "--", str(path)])

    return AsyncStep(
        f"create {paths.config_dir}, {paths.pki_dir}, {paths.data_dir} (0700 {user})",
        is_done,
        run,
    )


def host_steps(
    spec: ClusterSpec,
    host: Host,
    facts: preflight.HostFacts,
    release: releases.Release,
    want: Desired,
) -> list[AsyncStep]:
    paths = spec.host_paths
    user = paths.user
    unit = paths.unit.name
    steps: list[AsyncStep] = []
    distro = facts.values.get("distro_FragmentPath", "")
    distro_on = facts.values.get("distro_UnitFileState") == "enabled" or facts.values.get(
        "distro_ActiveState"
    ) in ("active", "activating")
    if distro and distro != str(paths.unit) and distro_on:
        if unit == DISTRO_UNIT:  # ours, in /etc/systemd/system, shadows the vendor file
            title = f"stop and disable the distribution's {DISTRO_UNIT} ({distro})"
            do = [["systemctl", "disable", "--now", DISTRO_UNIT]]
        else:
            title = f"mask the distribution's {DISTRO_UNIT} ({distro})"
            do = [["systemctl", "mask", "--now", DISTRO_UNIT]]
        check = ["sh", "-c", f"! systemctl is-active -q {DISTRO_UNIT} && "
                 f"! systemctl is-enabled -q {DISTRO_UNIT}"]  # fmt: skip
        steps.append(_command_step(host, title, check, do))
    steps.append(
        _command_step(
            host,
            f"create system user {user}",
            ["id", "-u", user],
            [
                [
                    "useradd",
                    "--system",
                    "--user-group",
                    "--no-create-home",
                    "--home-dir",
                    str(paths.data_dir),
                    "--shell",
                    "/usr/sbin/nologin",
                    user,
                ]
            ],
        )
    )
    steps.append(
        AsyncStep(
            f"install etcd {release.tag} into {releases.version_dir(paths, release)}",
            lambda: releases.is_installed(host, paths, release),
            lambda: releases.install(host, paths, release),
        )
    )
    steps.append(
        AsyncStep(
            f"point {paths.bin_dir}/etcd{{,ctl,utl}} at {release.tag}",
            lambda: releases.is_switched(host, paths, release),
            lambda: releases.switch(host, paths, release),
        )
    )
    steps.append(_dirs_step(host, paths))
    for host_path, source, secret in want.pki:
        mode, owner = (0o600, f"{user}:{user}") if secret else (0o644, "root:root")
        steps.append(
            file_step(
                host,
                f"write {host_path}",
                host_path,
                functools.partial(_read, source),
                mode,
                owner,
                secret,
            )
        )
    env = systemd.env_file(paths)
    steps.append(
        file_step(host, f"write {env}", env, lambda: want.env_text.encode(), 0o640, f"root:{user}")
    )
    steps.append(
        file_step(
            host,
            f"write {paths.unit}",
            PurePosixPath(paths.unit),
            lambda: want.unit_text.encode(),
            0o644,
            "root:root",
        )
    )

    async def reloaded() -> bool:
        state = await systemd.unit_state(host, unit)
        return state.fragment == str(paths.unit) and not state.need_reload

    steps.append(
        AsyncStep(
            "systemctl daemon-reload", reloaded, lambda: host.run(["systemctl", "daemon-reload"])
        )
    )
    steps.append(
        _command_step(
            host,
            f"enable {unit}",
            ["systemctl", "is-enabled", "-q", unit],
            [["systemctl", "enable", "-q", unit]],
        )
    )
    return steps


# --- services ---------------------------------------------------------------------------------


async def service_action(
    spec: ClusterSpec, host: Host, release: releases.Release, want: Desired
) -> str | None:
    state = await systemd.unit_state(host, spec.host_paths.unit.name)
    running = await systemd.running_process(host, state)
    if running is None:
        return "start"
    reasons = systemd.restart_reasons(
        running, want.env_text, want.unit_text, releases.version_dir(spec.host_paths, release)
    )
    return f"restart ({'; '.join(reasons)})" if reasons else None


async def wait_healthy(
    record: ClusterRecord, hosts: dict[str, Host], unit: str, timeout: float
) -> None:
    """Every member answers /health with the admin certificate, or one line says which does not."""
    from etcdforge.client import EtcdClient

    deadline = time.monotonic() + timeout
    last: dict[str, str | None] = {}
    async with EtcdClient(record.endpoints, record.admin_tls, timeout=2.0) as client:
        for _ in range(int(timeout / HEALTH_POLL) + 10):
            results = await asyncio.gather(*(client.health(e) for e in record.endpoints))
            last = {
                e: err for e, (ok, err) in zip(record.endpoints, results, strict=True) if not ok
            }
            if not last or time.monotonic() > deadline:
                break
            await asyncio.sleep(HEALTH_POLL)
    if last:
        endpoint, error = next(iter(last.items()))
        name = record.name_of(endpoint)
        host = hosts[name]
        log = await systemd.journal_tail(host, unit)
        raise ServiceError(
            f"{host.label}: not healthy after {timeout:.0f} s ({error})"
            + (f"; last log: {log[:300]}" if log else "")
            + f"; see `journalctl -u {unit}` on the host"
        )


async def leader_last(record: ClusterRecord, names: list[str]) -> list[str]:
    """Followers first, the leader last: one leader election instead of several."""
    from etcdforge.client import EtcdClient

    async with EtcdClient(record.endpoints, record.admin_tls, timeout=3.0) as client:
        statuses = await client.statuses()
    leaders = {record.name_of(s.endpoint) for s in statuses if s.is_leader}
    return sorted(names, key=lambda n: n in leaders)


async def converge_services(
    spec: ClusterSpec,
    record: ClusterRecord,
    hosts: dict[str, Host],
    actions: dict[str, str | None],
    progress: HostProgress,
    timeout: float,
) -> None:
    unit = spec.host_paths.unit.name
    to_start = [n for n, a in actions.items() if a == "start"]
    to_restart = [n for n, a in actions.items() if a and a.startswith("restart")]
    if to_start:
        for name in to_start:
            progress(hosts[name].label, f"start {unit}")
        # --no-block: a member of a new cluster reports ready only once a quorum has formed.
        await fan_out(
            to_start,
            lambda n: hosts[n].label,
            lambda n: hosts[n].run(["systemctl", "start", "--no-block", unit]),
        )
    if to_start or not to_restart:
        progress("cluster", "wait for every member to be healthy")
        await wait_healthy(record, hosts, unit, timeout)
    for name in await leader_last(record, to_restart) if to_restart else []:
        progress("cluster", f"wait for every member to be healthy before restarting {name}")
        await wait_healthy(record, hosts, unit, timeout)
        progress(hosts[name].label, f"restart {unit}: {actions[name]}")
        await hosts[name].run(["systemctl", "restart", unit], timeout=systemd.RESTART_TIMEOUT)
        await wait_healthy(record, hosts, unit, timeout)


# --- the operation ----------------------------------------------------------------------------


async def probe_all(
    spec: ClusterSpec, hosts: dict[str, Host], token: str | None
) -> dict[str, preflight.HostFacts]:
    """Probe and check every host; the first refusal (naming the others) stops everything."""
    paths = spec.host_paths
    facts: dict[str, preflight.HostFacts] = {}

    async def one(member: MemberSpec) -> None:
        host = hosts[member.name]
        found = await preflight.probe(host, paths)
        preflight.check(host, member, paths, found, token)
        facts[member.name] = found

    await fan_out(spec.members, lambda m: hosts[m.name].label, one)
    return facts


def apply(
    selection: Selection,
    dry_run: bool = False,
    progress: HostProgress | None = None,
    timeout: float = HEALTH_TIMEOUT,
    allow_even: bool = False,
) -> ApplyResult:
    spec, layout, previous = load_host_spec(selection, allow_even)
    check_against_record(spec, previous)
    assert selection.file is not None
    release = releases.resolve(spec.etcd, selection.file.parent)
    warning = check_version(
        release.version, dev_cluster=False, allow_unsafe=spec.etcd.allow_unsafe_version
    )
    show = progress or (lambda _host, _message: None)
    return asyncio.run(_apply(spec, layout, previous, release, dry_run, show, timeout, warning))


async def _apply(
    spec: ClusterSpec,
    layout: StateLayout,
    previous: ClusterRecord | None,
    release: releases.Release,
    dry_run: bool,
    progress: HostProgress,
    timeout: float,
    warning: str | None,
) -> ApplyResult:
    hosts = await connect_all(spec)
    try:
        token = previous.token if previous is not None else None
        facts = await probe_all(spec, hosts, token)
        token = token or new_token(spec.name)
        binary = EtcdBinary(Path(spec.host_paths.bin_dir) / "etcd", release.version)
        record = build_record(spec, layout, binary, token)
        record = _with_host_data_dirs(record, spec)
        admin: list[Step] = [
            _dir_step("create the state directory", layout.root),
            _dir_step("create the PKI directory", layout.pki_dir),
            *cluster_pki_steps(spec, layout),
            _record_step(layout, record),
        ]
        admin_result = execute(admin, lambda m: progress("admin", m), dry_run)
        wants = {m.name: desired(spec, layout, m, token) for m in spec.members}

        async def files(member: MemberSpec) -> tuple[str, ...]:
            host = hosts[member.name]
            steps = host_steps(spec, host, facts[member.name], release, wants[member.name])
            result = await execute_async(steps, lambda m: progress(host.label, m), dry_run)
            return result.pending if dry_run else result.changed

        changes = await fan_out(spec.members, lambda m: hosts[m.name].label, files)
        actions = dict(
            zip(
                [m.name for m in spec.members],
                await asyncio.gather(
                    *(
                        service_action(spec, hosts[m.name], release, wants[m.name])
                        for m in spec.members
                    )
                ),
                strict=True,
            )
        )
        if not dry_run:
            await converge_services(spec, record, hosts, actions, progress, timeout)
    finally:
        await close_all(hosts)
    return ApplyResult(
        cluster=spec.name,
        state_dir=layout.root,
        version=format_version(release.version),
        dry_run=dry_run,
        admin_changes=admin_result.pending if dry_run else admin_result.changed,
        hosts=tuple(
            HostResult(m.name, hosts[m.name].label, tuple(c), actions[m.name])
            for m, c in zip(spec.members, changes, strict=True)
        ),
        warnings=(warning,) if warning else (),
    )


def _with_host_data_dirs(record: ClusterRecord, spec: ClusterSpec) -> ClusterRecord:
    """The record names each member's data dir on its host, not a path on this machine."""
    from dataclasses import replace

    data_dir = str(spec.host_paths.data_dir)
    return replace(record, members=tuple(replace(m, data_dir=data_dir) for m in record.members))
