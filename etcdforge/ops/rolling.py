"""One rolling-restart policy for every cluster, local or on hosts.

What etcd reads only at start-up (its trusted CA files, its binary, its settings) changes through
rolling restarts: a health gate before each member, followers first, leadership handed to the
healthy follower furthest ahead before a leader goes down, and the next member only once every
member is healthy again. Never more than one member down; writers see at most one quick leader
change, never an election timeout.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Mapping

from etcdforge.errors import EtcdClientError
from etcdforge.ops.health import (
    HEALTH_TIMEOUT,
    hand_off_leadership,
    leader_or_none,
    require_healthy,
    wait_healthy,
)
from etcdforge.ops.plan import Progress
from etcdforge.record import ClusterRecord
from etcdforge.services.runtime import MemberRuntime

#: What to do to one member while it is the one down; by default `runtime.restart`.
MemberAction = Callable[[str], Awaitable[None]]


def followers_first(names: list[str], leader: str | None) -> list[str]:
    """The order of a roll: the leader last, so leadership moves once, not once per member."""
    return sorted(names, key=lambda n: n == leader)


async def rolling_restart(
    record: ClusterRecord,
    runtime: MemberRuntime,
    reasons: Mapping[str, str],
    progress: Progress,
    timeout: float = HEALTH_TIMEOUT,
    action: MemberAction | None = None,
    verb: str = "restart",
) -> list[str]:
    """Restart (or `action`) each member named in `reasons`, one at a time; returns the order.

    `verb` names what `action` does in progress lines and refusals ("defragment").
    """
    if not reasons:
        return []
    order = followers_first(list(reasons), await leader_or_none(record))
    for name in order:
        await restart_one(record, runtime, name, reasons[name], progress, timeout, action, verb)
    return order


async def restart_one(
    record: ClusterRecord,
    runtime: MemberRuntime,
    name: str,
    reason: str,
    progress: Progress,
    timeout: float = HEALTH_TIMEOUT,
    action: MemberAction | None = None,
    verb: str = "restart",
) -> None:
    """Gate, hand off if it leads, restart, wait until every member is healthy again."""
    label = runtime.label(name)
    progress.step("cluster", f"wait for every member to be healthy before {verb}ing {name}")
    await require_healthy(record, runtime, f"{verb}ing {name}", timeout)
    moved = False
    with contextlib.suppress(EtcdClientError):  # no hand-off possible: an election follows
        if len(record.members) > 1:  # a lone member has nobody to hand leadership to
            moved = await hand_off_leadership(record, name)
    why = [reason] if reason else []
    why += ["leadership handed to a caught-up follower first"] if moved else []
    progress.step(
        label, f"{verb} {runtime.service_name(name)}" + (f": {'; '.join(why)}" if why else "")
    )
    await (action or runtime.restart)(name)
    await wait_healthy(record, runtime, timeout)
