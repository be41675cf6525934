"""`etcdforge member replace NAME`: rebuild a member whose data or host is lost, under its name.

As etcd's runtime-reconfiguration guide says for a failed machine
(https://etcd.io/docs/v3.5/op-guide/runtime-configuration/#replace-a-failed-machine): remove the
old member first, then add the new one, which joins as a learner on an empty data dir and is
promoted once it has caught up. Removing first is also what works on etcd before 3.5.30, which
refuses `member add` while any voting member is down (etcd #21640); the quorum check below makes
sure the members that stay can carry the cluster meanwhile.

The spec may give the member a new address or host (a destroyed machine replaced by another);
its old host, when it still answers, has its etcd stopped and its data set aside; when it does
not, it is skipped with a warning.

The command checks everything first (the name, that the member is really lost unless `force`,
that no other learner exists, that the others hold a quorum without it), then writes a marker
(`<state>/replace.json`: the name and the ID it had) and runs `up`/`apply`'s own membership phase,
which sees the marker and plans "remove the old ID, add the name" from the live member list. So
a kill at any point resumes on rerun (of `member replace` or of `up`/`apply`), and the files and
services phases that follow leave every member's settings naming the new member list.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from etcdforge.errors import EtcdClientError, SpecError, UnsafeOperationError
from etcdforge.names import unknown_member
from etcdforge.ops.apply import apply
from etcdforge.ops.health import HEALTH_TIMEOUT
from etcdforge.ops.member_plan import LiveMember, MemberPlan, Replacement, Wanted
from etcdforge.ops.member_plan import plan_membership as plan_changes
from etcdforge.ops.member_record import read_replacement, write_replacement
from etcdforge.ops.membership import MemberOptions, observe
from etcdforge.ops.plan import SILENT, Progress
from etcdforge.ops.target import Selection, require_converted, spec_for_up
from etcdforge.ops.up import up
from etcdforge.record import ClusterRecord
from etcdforge.spec import ClusterSpec


@dataclass(frozen=True)
class ReplaceResult:
    cluster: str
    name: str
    old_id: str
    state_dir: Path
    steps: tuple[str, ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class ReplacePlan:
    """What `member replace` will do, checked: shown before the user confirms."""

    cluster: str
    replacement: Replacement
    plan: MemberPlan
    resumed: bool  # a replacement of this member was already under way

    def describe(self) -> list[str]:
        return self.plan.describe()


def plan_replace(selection: Selection, name: str, force: bool = False) -> ReplacePlan:
    """Check the replacement against the spec and the live cluster; changes nothing."""
    spec, record = _load(selection)
    spec.member(name)  # a name the spec does not have: one line listing the members it has
    marker = read_replacement(record.layout)
    if marker is not None and marker.name != name:
        raise UnsafeOperationError(
            f"member {marker.name} of cluster {spec.name} is being replaced; finish that first "
            f"with `etcdforge member replace {marker.name} -f FILE`"
        )
    try:
        live = asyncio.run(observe(record, spec.client_endpoints))
    except EtcdClientError as exc:
        raise UnsafeOperationError(f"not replacing {name}: {exc}") from None
    replacement = marker or _new_replacement(spec, record, live, name, force)
    wanted = [Wanted(m.name, m.peer_url, m.client_url) for m in spec.members]
    plan = plan_changes(wanted, live, [m.name for m in record.members], True, replacement)
    others = sorted({c.name for c in plan.changes} - {name})
    if others:
        raise SpecError(
            f"{selection.file}: the spec also changes members {', '.join(others)}; apply that "
            f"first (`etcdforge {'apply' if spec.on_hosts else 'up'} -f FILE`), then replace {name}"
        )
    return ReplacePlan(spec.name, replacement, plan, marker is not None)


def _new_replacement(
    spec: ClusterSpec, record: ClusterRecord, live: tuple[LiveMember, ...], name: str, force: bool
) -> Replacement:
    recorded = next((m for m in record.members if m.name == name), None)
    old = next(
        (
            m
            for m in live
            if m.name == name or (recorded is not None and recorded.peer_url in m.peer_urls)
        ),
        None,
    )
    if old is None and recorded is None:
        raise SpecError(unknown_member(record.members, name, spec.name))
    if old is not None and old.healthy and not force:
        raise UnsafeOperationError(
            f"member {name} is healthy; replacing it throws its data away and resyncs it from "
            "the others: pass --force to replace it anyway"
        )
    if old is None:  # removed from the cluster already (by hand): only the add is left
        assert recorded is not None
        return Replacement(name, "", recorded.peer_url)
    return Replacement(name, old.id, old.peer_urls[0] if old.peer_urls else "")


def replace(
    selection: Selection,
    name: str,
    force: bool = False,
    purge_data: bool = False,
    progress: Progress = SILENT,
    timeout: float = HEALTH_TIMEOUT,
    allow_even: bool = False,
    checked: ReplacePlan | None = None,
) -> ReplaceResult:
    """Check (unless the caller just did: `checked`), mark, then let `up`/`apply` remove the
    old member and add the new one; they plan every step again from the live member list."""
    checked = checked or plan_replace(selection, name, force)
    spec, record = _load(selection)
    if not checked.resumed:
        write_replacement(record.layout, checked.replacement)
    options = MemberOptions(purge_data=purge_data, allow_even=allow_even)
    if spec.on_hosts:
        done = apply(selection, progress=progress, timeout=timeout, options=options)
        steps, warnings = done.membership, done.warnings
    else:
        ran = up(
            selection, allow_even=allow_even, progress=progress, timeout=timeout, options=options
        )
        steps, warnings = ran.membership, ran.warnings
    return ReplaceResult(
        spec.name, name, checked.replacement.old_id, record.layout.root, steps, warnings
    )


def _load(selection: Selection) -> tuple[ClusterSpec, ClusterRecord]:
    if selection.file is None:
        raise SpecError("member replace needs the cluster YAML: pass -f cluster.yaml")
    spec, layout, record = spec_for_up(selection, None, allow_even=True)
    if record is None:
        raise SpecError(
            f"cluster {spec.name} is not deployed at {layout.root}; nothing to replace "
            f"(`etcdforge {'apply' if spec.on_hosts else 'up'} -f FILE` deploys it)"
        )
    require_converted(record, "member replace")
    return spec, record
