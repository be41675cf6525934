"""`etcdforge reset`: take a host cluster apart again, removing only what `apply` put there.

Every host is logged in to and checked before anything is removed anywhere. A data dir is deleted
only with `purge_data`, and only if its environment file carries this cluster's token: reset never
deletes another cluster's data. Without `purge_data` the data dir and the environment file that
identifies it (the token) stay, so a later `apply` picks the member up again on its data.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from etcdforge import release
from etcdforge.host_logins import close_all, connect_all
from etcdforge.hosts import Host, fan_out
from etcdforge.ops import preflight
from etcdforge.ops.apply import load_host_spec
from etcdforge.ops.plan import SILENT, AsyncStep, Progress, execute_async
from etcdforge.ops.preflight import DataDirOwner, foreign_data
from etcdforge.ops.target import Selection
from etcdforge.services import systemd
from etcdforge.spec import ClusterSpec, HostPathsSpec

NOT_DELETING = "not deleting anything; move it away by hand if you are sure"


@dataclass(frozen=True)
class ResetResult:
    cluster: str
    removed: tuple[tuple[str, tuple[str, ...]], ...]  # (host label, steps done)
    purged_data: bool
    record_removed: Path | None


def _absent(host: Host, *paths: PurePosixPath) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        tests = " && ".join(
            f'[ ! -e "${i + 1}" ] && [ ! -L "${i + 1}" ]' for i in range(len(paths))
        )
        return (await host.run(["sh", "-c", tests, "sh", *map(str, paths)], check=False)).code == 0

    return check


def reset_steps(
    host: Host, paths: HostPathsSpec, token: str | None, purge_data: bool
) -> list[AsyncStep]:
    """Stop, then remove in reverse order of `apply`; data only with `purge_data`."""
    unit = paths.unit.name
    env = systemd.env_file(paths)
    releases = PurePosixPath(paths.releases_dir)
    steps = [_stop_step(host, paths)]
    if purge_data:
        data = PurePosixPath(paths.data_dir)
        title = f"delete the data dir {paths.data_dir}"
        steps.append(AsyncStep(title, _absent(host, data), lambda: _purge(host, paths, token)))

    async def remove_unit() -> None:
        await host.run(["rm", "-f", "--", str(paths.unit)])
        await systemd.forget_unit(host, unit)

    async def remove_config() -> None:
        await host.run(["rm", "-rf", "--", str(paths.pki_dir)])
        if purge_data:
            await host.run(["rm", "-f", "--", str(env)])
        await host.run(["rmdir", "--", str(paths.config_dir)], check=False)

    async def links_gone() -> bool:
        return not await release.our_links(host, paths)

    config = [PurePosixPath(paths.pki_dir)] + ([env] if purge_data else [])
    config_gone = _absent(host, *config)

    async def config_removed() -> bool:
        """Ours gone, and the directory too unless it holds files of someone else's (a reset
        cut short between the removals and the `rmdir` leaves it empty: not done yet)."""
        left = ["sh", "-c", '[ -d "$1" ] && [ -z "$(ls -A -- "$1")" ]', "sh", str(paths.config_dir)]
        return await config_gone() and (await host.run(left, check=False)).code != 0

    return [
        *steps,
        AsyncStep(f"remove {paths.unit}", _absent(host, PurePosixPath(paths.unit)), remove_unit),
        AsyncStep(
            f"remove {paths.pki_dir}" + (f" and {env}" if purge_data else ""),
            config_removed,
            remove_config,
        ),
        AsyncStep(
            f"remove the links in {paths.bin_dir}",
            links_gone,
            lambda: release.remove_links(host, paths),
        ),
        AsyncStep(
            f"remove {releases}",
            _absent(host, releases),
            lambda: host.run(["rm", "-rf", "--", str(releases)]),
        ),
    ]


def _stop_step(host: Host, paths: HostPathsSpec) -> AsyncStep:
    """Done only once the member is really stopped: one still stopping (a reset killed while
    stopping it) is waited for, never deleted from under. A unit whose file a cut-short reset
    already removed (no fragment) is still ours while systemd has it loaded."""
    unit = paths.unit.name

    async def stopped() -> bool:
        state = await systemd.unit_state(host, unit)
        if state.fragment not in ("", str(paths.unit)):
            return True  # another unit of that name (the distribution's): not ours to stop
        # Not stopping, not waiting to restart (auto-restart), not starting: stopped for good.
        return state.active in ("inactive", "failed") and state.enabled != "enabled"

    async def stop() -> None:
        if (await systemd.unit_state(host, unit)).fragment:
            await systemd.disable_now(host, unit)
        else:
            await systemd.stop_now(host, unit)

    return AsyncStep(f"stop and disable {unit}", stopped, stop)


async def _purge(host: Host, paths: HostPathsSpec, token: str | None) -> None:
    # Checked again right before deleting: the data may have changed since preflight.
    facts = await preflight.probe(host, paths)
    if facts.data_owner(token) is DataDirOwner.OTHER:
        raise foreign_data(host.label, paths.data_dir, facts.env_token, NOT_DELETING)
    await host.run(["rm", "-rf", "--", str(paths.data_dir)])


def reset(
    selection: Selection, purge_data: bool = False, progress: Progress = SILENT
) -> ResetResult:
    spec, layout, previous = load_host_spec(selection, allow_even=True)
    token = previous.token if previous is not None else None
    removed = asyncio.run(_reset(spec, token, purge_data, progress))
    record_removed = None
    if purge_data and layout.cluster_file.exists():
        # The cluster is gone; a new `apply` must get a new token. The PKI (CA keys) stays.
        layout.cluster_file.unlink()
        record_removed = layout.cluster_file
    return ResetResult(spec.name, removed, purge_data, record_removed)


async def _reset(
    spec: ClusterSpec, token: str | None, purge_data: bool, progress: Progress
) -> tuple[tuple[str, tuple[str, ...]], ...]:
    paths = spec.host_paths
    progress.phase("connect")
    hosts = await connect_all(spec)
    try:
        progress.phase("preflight")

        # Login and sudo on every host first: nothing is removed anywhere unless all answer.
        async def check(host: Host) -> None:
            facts = await preflight.probe(host, paths)
            if purge_data and facts.data_owner(token) is DataDirOwner.OTHER:
                raise foreign_data(host.label, paths.data_dir, facts.env_token, NOT_DELETING)

        await fan_out(list(hosts.values()), lambda h: h.label, check)

        async def one(host: Host) -> tuple[str, tuple[str, ...]]:
            steps = reset_steps(host, paths, token, purge_data)
            result = await execute_async(steps, progress, where=host.label)
            return host.label, result.changed

        progress.phase("remove")
        results = await fan_out(list(hosts.values()), lambda h: h.label, one)
    finally:
        await close_all(hosts)
    return tuple(results)
