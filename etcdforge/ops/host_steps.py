"""The steps that converge one host's files to what it should hold (`ops.desired`).

Each step checks the host first (content hash, mode and owner; unit state), so a rerun skips what
is done; `explain` gives `plan` a short summary of what a step would change.
"""

from __future__ import annotations

import difflib
import functools
import shlex
from collections.abc import Callable, Sequence
from pathlib import PurePosixPath

from etcdforge import release as releases
from etcdforge.errors import HostError
from etcdforge.hosts import Host, file_matches, sha256
from etcdforge.ops.desired import Desired, read_or_none
from etcdforge.ops.plan import AsyncStep, Probe, probed
from etcdforge.ops.preflight import HostFacts
from etcdforge.services import systemd
from etcdforge.spec import ClusterSpec, HostPathsSpec

DISTRO_UNIT = "etcd.service"


def file_step(
    host: Host,
    title: str,
    path: PurePosixPath,
    data: Callable[[], bytes | None],
    mode: int,
    owner: str,
    secret: bool = False,
) -> AsyncStep:
    def check() -> list[str] | None:
        wanted = data()
        return None if wanted is None else file_matches(path, wanted, mode, owner)

    async def run() -> None:  # right after is_done said no (`execute_async`)
        wanted = data()
        if wanted is None:
            raise HostError(f"{host.label}: internal: no content for {path}")
        await host.write_file(path, wanted, mode, owner, checked=True)

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

    return probed(title, Probe(host, check), run, explain)


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
    async def run() -> None:
        for argv in do:
            await host.run(argv)

    return probed(title, Probe(host, lambda: check), run)


def _dirs_step(host: Host, paths: HostPathsSpec) -> AsyncStep:
    user = paths.user
    wanted = [
        (paths.config_dir, "755", "root", "root"),
        (paths.pki_dir, "750", "root", user),
        (paths.data_dir, "700", user, user),
    ]
    expect = "\n".join(f"{mode} {uid}:{gid}" for _, mode, uid, gid in wanted)
    compare = 'want=$1; shift; [ "$(stat -c "%a %U:%G" -- "$@")" = "$want" ]'
    check = ["sh", "-c", compare, "sh", expect, *(str(w[0]) for w in wanted)]

    async def run() -> None:  # one round trip for the three
        install = (
            ["install", "-d", "-m", mode, "-o", uid, "-g", gid, "--", str(path)]
            for path, mode, uid, gid in wanted
        )
        await host.run(["sh", "-c", " && ".join(map(shlex.join, install))])

    title = f"create {paths.config_dir}, {paths.pki_dir}, {paths.data_dir} (0700 {user})"
    return probed(title, Probe(host, lambda: check), run)


def host_steps(
    spec: ClusterSpec,
    host: Host,
    facts: HostFacts,
    release: releases.Release,
    want: Desired,
    taking_over: bool = False,
) -> list[AsyncStep]:
    """In order: distribution unit off, user, release, directories, PKI, env file, unit.

    `taking_over`: the host still runs an adopted member under its own unit, which the rolling
    conversion switches off (`ops.convert`); until then ours is installed but not enabled.
    """
    paths = spec.host_paths
    steps: list[AsyncStep] = []
    distro = facts.distro
    if distro.fragment and distro.fragment != str(paths.unit) and distro.switched_on:
        steps += [] if taking_over else [_distro_step(host, paths.unit.name, distro.fragment)]
    steps.append(_user_step(host, paths))
    steps += _release_steps(host, paths, release)
    steps.append(_dirs_step(host, paths))
    steps += _file_steps(host, paths, want)
    steps += _unit_steps(host, paths, enable=not taking_over)
    return steps


def _user_step(host: Host, paths: HostPathsSpec) -> AsyncStep:
    user = paths.user
    useradd = ["useradd", "--system", "--user-group", "--no-create-home"]
    useradd += ["--home-dir", str(paths.data_dir), "--shell", "/usr/sbin/nologin", user]
    return _command_step(host, f"create system user {user}", ["id", "-u", user], [useradd])


def _release_steps(host: Host, paths: HostPathsSpec, release: releases.Release) -> list[AsyncStep]:
    """The release goes in beside the others; which one runs (`current`) is switched per
    member in the services phase, right before that member starts or restarts. A host with no
    `current` yet (new, rebuilt, or adopted: its etcd runs its own binary) gets it pointed here,
    so `etcdctl`/`etcdutl` work at once (a restore runs them before any member starts)."""

    return [
        probed(
            f"install etcd {release.tag} into {releases.version_dir(paths, release)}",
            Probe(host, lambda: releases.installed_check(paths, release)),
            lambda: releases.install(host, paths, release),
        ),
        probed(
            f"point {paths.releases_dir}/current at {release.tag} (the host's first release)",
            Probe(host, lambda: releases.current_check(paths)),
            lambda: releases.point_current(host, paths, release.tag),
        ),
        probed(
            f"link {paths.bin_dir}/etcd{{,ctl,utl}} through {paths.releases_dir}/current",
            Probe(host, lambda: releases.links_check(paths)),
            lambda: releases.link_bins(host, paths),
        ),
    ]


def _file_steps(host: Host, paths: HostPathsSpec, want: Desired) -> list[AsyncStep]:
    """Keys 0600 to the etcd user; certificates 0644; the env file readable by etcd alone."""
    user = paths.user
    steps = []
    for host_path, source, secret in want.pki:
        mode, owner = (0o600, f"{user}:{user}") if secret else (0o644, "root:root")
        data = functools.partial(read_or_none, source)
        steps.append(file_step(host, f"write {host_path}", host_path, data, mode, owner, secret))
    env = systemd.env_file(paths)
    env_data = want.env_text.encode()
    steps.append(file_step(host, f"write {env}", env, lambda: env_data, 0o640, f"root:{user}"))
    unit = PurePosixPath(paths.unit)
    unit_data = want.unit_text.encode()
    steps.append(file_step(host, f"write {unit}", unit, lambda: unit_data, 0o644, "root:root"))
    return steps


def _unit_steps(host: Host, paths: HostPathsSpec, enable: bool = True) -> list[AsyncStep]:
    unit = paths.unit.name

    reloaded = Probe(host, lambda: systemd.reloaded_check(unit, str(paths.unit)))
    steps = [probed("systemctl daemon-reload", reloaded, lambda: systemd.daemon_reload(host))]
    if enable:
        steps.append(
            probed(
                f"enable {unit}",
                Probe(host, lambda: systemd.enabled_check(unit)),
                lambda: systemd.enable(host, unit),
            )
        )
    return steps


def _distro_step(host: Host, unit: str, fragment: str) -> AsyncStep:
    """The distribution's own etcd unit would start a plain-http member: switch it off."""
    if unit == DISTRO_UNIT:  # ours, in /etc/systemd/system, shadows the vendor file
        title = f"stop and disable the distribution's {DISTRO_UNIT} ({fragment})"
        action = systemd.disable_now
    else:
        title = f"mask the distribution's {DISTRO_UNIT} ({fragment})"
        action = systemd.mask_now
    off = Probe(host, lambda: systemd.off_check(DISTRO_UNIT))
    return probed(title, off, lambda: action(host, DISTRO_UNIT))
