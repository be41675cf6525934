"""The cluster checks: versions, health and the cluster's shape.

Sources, as cited on each check:

- Versions: etcdforge's own release policy (`binaries.check_version`: known-bad 3.5.0-3.5.2 and
  etcd's production minimums, never restated here), the advisory table
  (`advisories`, shared with `upgrade`), etcd's support policy (the current and the previous minor
  line; etcd docs op-guide/versioning).
- Health: `/health` and Maintenance.Status of every member; one leader; an odd voter count (etcd
  FAQ "Why an odd number of cluster members?"); a learner is ready once its raft index reaches
  90% of the leader's (etcd server `isLearnerReady`); a term that moves during the check means an
  election; a clock drift above 1 s is what etcd's peer prober warns about (rafthttp "prober
  found high clock drift"), and `apply`'s preflight refuses 60 s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from etcdforge.advisories import clean_from, remedy
from etcdforge.binaries import check_version, format_version, parse_version, version_problem
from etcdforge.client import EndpointStatus
from etcdforge.errors import BinaryError
from etcdforge.ops.check_model import (
    Check,
    Facts,
    MemberFacts,
    Verdict,
    failed,
    for_cluster,
    passed,
    per_member,
    warned,
)
from etcdforge.ops.check_sources import CURRENT_MINOR, advisories_for
from etcdforge.ops.preflight import MAX_CLOCK_SKEW

LEARNER_READY = 0.9
CLOCK_DRIFT_WARN = 1.0
ETCD_VERSIONING = "etcd docs op-guide/versioning"


def _is_learner(status: EndpointStatus | None) -> bool:
    return status is not None and status.is_learner and status.member_id is not None


def _reachable(statuses: Mapping[str, EndpointStatus]) -> list[EndpointStatus]:
    return [s for s in statuses.values() if s.member_id is not None]


# --- versions -----------------------------------------------------------------------------


def known_bad(member: MemberFacts, facts: Facts) -> Verdict:
    version = parse_version(facts.member_version(member.name))
    problem = version_problem(version)
    if problem is None:
        return passed(f"etcd {format_version(version)}")
    fix = "upgrade to the latest patch release of the line (etcd.version, then `apply`)"
    try:
        note = check_version(version, not facts.on_hosts, facts.allow_unsafe_version)
    except BinaryError:
        return failed(problem, fix)
    return warned(note or problem, fix)


def advisories(member: MemberFacts, facts: Facts) -> Verdict:
    """A warning, not a failure: the cluster serves correctly today, and the fix is a patch
    upgrade the operator schedules (a known-bad release is `version-known-bad`'s failure)."""
    version = parse_version(facts.member_version(member.name))
    found = advisories_for(version)
    if not found:
        return passed(f"etcd {format_version(version)}: no known advisory")
    listed = "; ".join(f"{f.advisory.name} ({remedy(f.advisory, version)})" for f in found)
    clean = clean_from(version)
    target = (
        f"etcd {format_version(clean)} or later"
        if clean is not None
        else f"a newer minor line than {version[0]}.{version[1]}"
    )
    return warned(listed, f"upgrade to {target}: `etcdforge upgrade --to VERSION`")


def mixed_versions(facts: Facts) -> Verdict:
    by_version: dict[str, list[str]] = {}
    for name, status in facts.status_start.items():
        if status.version:
            by_version.setdefault(status.version, []).append(name)
    if len(by_version) <= 1:
        return passed(f"etcd {next(iter(by_version), facts.version)} on every member")
    seen = "; ".join(f"{v} on {', '.join(n)}" for v, n in sorted(by_version.items()))
    return warned(seen, "finish the rolling upgrade so every member runs one release")


def minor_behind(member: MemberFacts, facts: Facts) -> Verdict:
    version = parse_version(facts.member_version(member.name))
    behind = CURRENT_MINOR[1] - version[1] if version[0] == CURRENT_MINOR[0] else 99
    line = f"{version[0]}.{version[1]}"
    current = ".".join(map(str, CURRENT_MINOR))
    if behind <= 0:
        return passed(f"{line}: the current minor line")
    if behind == 1:
        return passed(f"{line}: maintained (current {current})")
    return warned(
        f"{line}: {behind} minor lines behind {current}, out of support (no security fixes)",
        "upgrade one minor line at a time, latest patch first",
    )


# --- health and shape ---------------------------------------------------------------------


def healthy(member: MemberFacts, facts: Facts) -> Verdict:
    status = facts.status_start.get(member.name)
    if status is None:
        return failed("no status", "check the member")
    if _is_learner(status) and status.error is not None and not status.errors:
        return passed("learner: answers status (learners do not serve /health)")
    if status.healthy:
        role = "leader" if status.is_leader else "follower"
        return passed(f"healthy {role}, term {status.raft_term}, index {status.raft_index}")
    return failed(status.error or "unhealthy", f"look at the member's log on {member.label}")


def one_leader(facts: Facts) -> Verdict:
    reachable = _reachable(facts.status_start)
    leaders = {s.leader for s in reachable if s.leader and s.leader != "0"}
    leading = [n for n, s in facts.status_start.items() if s.is_leader]
    if len(leaders) == 1 and len(leading) == 1:
        return passed(f"{leading[0]} leads")
    if not leaders:
        return failed("no leader: the cluster has no quorum", "bring a majority of members up")
    return failed(
        f"members disagree on the leader ({len(leaders)} leader ids)",
        "check the network between members and their logs",
    )


def odd_voters(facts: Facts) -> Verdict:
    if facts.member_list is None:
        return warned(
            f"member list not read: {facts.errors.get('member_list', '?')}", "check health"
        )
    voters = [m for m in facts.member_list if not m.is_learner]
    tolerates = (len(voters) - 1) // 2
    if len(voters) % 2:
        return passed(f"{len(voters)} voting members (tolerates {tolerates} down)")
    return warned(
        f"{len(voters)} voting members: tolerates no more failures than {len(voters) - 1}",
        "add or remove one member",
    )


def learner_progress(member: MemberFacts, facts: Facts) -> Verdict:
    start, end = facts.status_start.get(member.name), facts.status_end.get(member.name)
    if start is None or start.member_id is None:
        return warned("not read: the member did not answer", "check health")
    if not start.is_learner:
        return passed("voting member")
    leader = next((s for s in facts.status_start.values() if s.is_leader), None)
    mine, top = start.raft_index or 0, (leader.raft_index or 0) if leader else 0
    if top and mine >= LEARNER_READY * top:
        return passed(f"learner in sync (index {mine} of {top}): ready to promote")
    later = (end.raft_index or 0) if end is not None else 0
    if later > mine:
        return warned(f"learner catching up (index {mine} → {later}, leader {top})", "wait")
    return failed(
        f"learner stuck at index {mine} (leader {top})",
        "check its log; remove it and add it again if it does not move",
    )


def term_churn(facts: Facts) -> Verdict:
    before = max((s.raft_term or 0 for s in _reachable(facts.status_start)), default=0)
    after = max((s.raft_term or 0 for s in _reachable(facts.status_end)), default=0)
    if not before:
        return warned("not read: no member answered", "check health")
    if after <= before:
        return passed(f"raft term {before} throughout")
    return warned(
        f"raft term {before} → {after} during the check: leader election(s)",
        "look for elections in the members' logs (slow disk, network, CPU)",
    )


def clock_skew(member: MemberFacts, facts: Facts) -> Verdict:
    skew = member.clock_skew
    if skew is None:
        return warned(f"not measured: {member.error or 'no probe'}", "make the host reachable")
    if not facts.on_hosts:
        return passed("local member: the admin machine's clock")
    seen = f"{skew:+.2f} s from the admin machine"
    if abs(skew) <= CLOCK_DRIFT_WARN:
        return passed(seen)
    fix = f"fix NTP on {member.label}"
    return failed(seen, fix) if abs(skew) > MAX_CLOCK_SKEW else warned(seen, fix)


HEALTH_SOURCE = "etcd Maintenance.Status and /health"

CLUSTER_CHECKS: Sequence[Check] = (
    Check(
        "version-known-bad",
        "no known-bad etcd release",
        "etcdforge release policy (binaries.check_version): etcd CHANGELOG-3.5, 3.5.3 fixes",
        per_member(known_bad),
    ),
    Check(
        "version-advisories",
        "no security advisory open",
        "etcd security advisories and data-loss fixes (table: advisories.ADVISORIES)",
        per_member(advisories),
    ),
    Check("version-mixed", "one etcd release", ETCD_VERSIONING, for_cluster(mixed_versions)),
    Check("version-behind", "a maintained minor line", ETCD_VERSIONING, per_member(minor_behind)),
    Check("health", "member healthy", HEALTH_SOURCE, per_member(healthy)),
    Check("health-leader", "exactly one leader", HEALTH_SOURCE, for_cluster(one_leader)),
    Check(
        "voters-odd",
        "odd voting member count",
        "etcd FAQ: why an odd number of cluster members",
        for_cluster(odd_voters),
    ),
    Check(
        "learner-progress",
        "no learner stuck behind",
        "etcd server isLearnerReady (90% of the leader's index)",
        per_member(learner_progress),
    ),
    Check(
        "raft-term",
        "no election during the check",
        "etcd raft: a new term is a new election",
        for_cluster(term_churn),
    ),
    Check(
        "clock-skew",
        "clock within 1 s of the admin machine",
        "etcd rafthttp prober (drift > 1 s); apply preflight (60 s)",
        per_member(clock_skew),
    ),
)
