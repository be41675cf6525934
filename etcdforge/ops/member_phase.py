"""The membership phase of `up` and `apply`: plan from the live member list, then change it.

Runs before any other change, so that the files and services phases that follow see the members
the spec lists; also finishes a replacement that `member replace` started (its marker in the
state dir names the member and the ID it had).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

from etcdforge.errors import EtcdClientError
from etcdforge.layout import StateLayout
from etcdforge.ops.member_plan import MemberPlan, Wanted, plan_membership
from etcdforge.ops.member_record import clear_replacement, read_replacement
from etcdforge.ops.membership import ELECTION_GRACE, MemberOptions, Membership, observe
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.target import Selection, spec_for_up
from etcdforge.record import ClusterRecord

if TYPE_CHECKING:
    from etcdforge.spec import ClusterSpec


@dataclass(frozen=True)
class MembershipResult:
    """What a membership phase did (or, on a dry run, would do, with why each step is safe)."""

    steps: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    joining: tuple[str, ...] = ()  # members a dry run would add


async def converge_membership(
    changes: Membership,
    layout: StateLayout,
    options: MemberOptions,
    progress: Progress = SILENT,
    dry_run: bool = False,
) -> MembershipResult:
    """`up`'s and `apply`'s membership phase: plan from the live members (and the replacement
    `member replace` started, if any), then change them one at a time. A cluster that does not
    answer is left to the caller's start steps when nothing about its members changes."""
    replacement = read_replacement(layout)
    unchanged = replacement is None and same_members(changes.spec, changes.record)
    try:  # only a learner left half-way can be pending: no need to wait out an election
        live = await changes.observe(0.0 if unchanged else ELECTION_GRACE)
    except EtcdClientError:
        if unchanged:
            return MembershipResult()
        raise
    plan = changes.plan(live, options.allow_even, replacement)
    if dry_run:
        return MembershipResult(tuple(plan.describe()), joining=_joining(plan))
    await changes.check(plan, live, options, replacement)  # refusals before the phase shows
    if plan.changes or changes.leftovers(live, replacement):
        progress.phase("membership")
    done = await changes.converge(options, replacement, live)
    if replacement is not None:
        clear_replacement(layout)  # converged: the member runs under its new ID
    return MembershipResult(tuple(done), tuple(changes.warnings))


def preview(
    selection: Selection, members: int | None, allow_even: bool
) -> tuple[str, MemberPlan] | None:
    """The cluster's name and the membership plan `up`/`apply` would follow now, read-only, so
    the command can ask
    before removing members; None when nothing is deployed or the cluster does not answer (the
    command itself then says why). An unsafe change is refused here already."""
    spec, layout, record = spec_for_up(selection, members, allow_even)
    if record is None:
        return None
    replacement = read_replacement(layout)
    grace = 0.0 if replacement is None and same_members(spec, record) else ELECTION_GRACE
    try:
        live = asyncio.run(observe(record, spec.client_endpoints, grace))
    except EtcdClientError:
        return None
    wanted = [Wanted(m.name, m.peer_url, m.client_url) for m in spec.members]
    recorded = [m.name for m in record.members]
    return spec.name, plan_membership(wanted, live, recorded, allow_even, replacement)


def _joining(plan: MemberPlan) -> tuple[str, ...]:
    return tuple(c.name for c in plan.additions)


def same_members(spec: ClusterSpec, record: ClusterRecord) -> bool:
    """The spec lists exactly the recorded members, at the same addresses."""
    wanted = sorted((m.name, m.client_url, m.peer_url) for m in spec.members)
    return wanted == sorted((m.name, m.client_url, m.peer_url) for m in record.members)
