"""Membership changes as a plan: which members to add and remove, in which order, and why each
change is safe. Pure: decided from the members wanted and the live member list alone.

etcd's runtime-reconfiguration guide is the reference
(https://etcd.io/docs/v3.5/op-guide/runtime-configuration/):

- "All changes to the cluster must be done sequentially": one member is added or removed at a
  time, and the caller plans again from the live member list before each change, so an
  interrupted run resumes where it stopped and never repeats a change.
- "Add a new member as learner" (etcd 3.4+): a new member joins as a non-voting learner, which
  does not count toward the quorum until it has caught up and is promoted; etcd holds one
  learner at a time ("too many learner members in cluster").
- "Replace a failed machine": remove the failed member first, then add the new one.
- "Strict reconfiguration check mode": etcd refuses a change that would leave fewer started
  members than the new quorum; the plan refuses it first, counting *healthy* members, and names
  the member and the fix instead of etcd's "re-configuration failed".

Two rules of etcdforge's own on top: the members that stay must be a majority of the voting
members as they are now (so a spec that lost lines by mistake cannot shrink a cluster to a
minority of itself: removing 2 of 3 is refused), and an even final count needs `--allow-even`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from etcdforge.client import EndpointStatus, Member
from etcdforge.errors import SpecError, UnsafeOperationError

#: etcd promotes a learner once its raft log reaches 90% of the leader's (etcdserver's
#: readyPercent; "can only promote a learner member which is in sync with leader").
PROMOTE_READY = 0.9
#: Releases that did not persist a learner's promotion to the v3 store (etcd #19557).
PROMOTION_NOT_PERSISTED = ((3, 5, 1), (3, 5, 19))
SAFE_BEFORE_36 = "3.5.32"  # the upgrade guide's minimum before any 3.6 upgrade


class ChangeKind(StrEnum):
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class Wanted:
    """A member the spec wants: its name and URLs."""

    name: str
    peer_url: str
    client_url: str


@dataclass(frozen=True)
class LiveMember:
    """One entry of the live member list, with what its status said (if it answered)."""

    id: str
    name: str  # "" until the member has started and published its name
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...] = ()
    is_learner: bool = False
    healthy: bool = False
    is_leader: bool = False
    raft_index: int | None = None
    version: str | None = None

    @property
    def label(self) -> str:
        return self.name or f"{self.id} ({', '.join(self.peer_urls)})"


@dataclass(frozen=True)
class Replacement:
    """A member being rebuilt under its own name (`member replace`): the ID it had."""

    name: str
    old_id: str
    old_peer_url: str


@dataclass(frozen=True)
class MemberChange:
    kind: ChangeKind
    name: str
    peer_url: str
    client_url: str = ""
    member_id: str | None = None  # the live ID: a member to remove, a learner to finish
    why: str = ""  # why the change is safe, for `plan`
    replacing: bool = False

    @property
    def title(self) -> str:
        if self.kind is ChangeKind.ADD:
            resume = " (registered already: finish it)" if self.member_id else ""
            return f"add {self.name} ({self.peer_url}) as a learner, then promote it{resume}"
        what = "the old member" if self.replacing else "member"
        return f"remove {what} {self.name} (ID {self.member_id}) from the cluster"


@dataclass(frozen=True)
class MemberPlan:
    changes: tuple[MemberChange, ...]
    voters: int  # voting members now
    final: int  # voting members once every change is done

    @property
    def removals(self) -> list[MemberChange]:
        return [c for c in self.changes if c.kind is ChangeKind.REMOVE]

    @property
    def additions(self) -> list[MemberChange]:
        return [c for c in self.changes if c.kind is ChangeKind.ADD]

    def describe(self) -> list[str]:
        """One line per change, in order, each with why it is safe."""
        return [f"{i}. {c.title}: {c.why}" for i, c in enumerate(self.changes, 1)]


@dataclass(frozen=True)
class MemberOptions:
    """What the user allowed: which members may be removed, and what happens to their data."""

    remove_any: bool = False  # --yes
    confirmed: frozenset[str] = frozenset()  # removals the user confirmed interactively
    purge_data: bool = False
    allow_even: bool = False

    def may_remove(self, name: str) -> bool:
        return self.remove_any or name in self.confirmed


#: The default: nothing removed without the user's confirmation, data kept.
CAUTIOUS = MemberOptions()


def check_confirmed(plan: MemberPlan, options: MemberOptions, cluster: str) -> None:
    """Members the spec dropped leave only with the user's confirmation (a replaced member's
    removal was confirmed by `member replace`, which left its marker)."""
    refused = [c.name for c in plan.removals if not c.replacing and not options.may_remove(c.name)]
    if refused:
        raise UnsafeOperationError(
            f"the spec no longer lists {', '.join(refused)}: they would be removed from cluster "
            f"{cluster}; confirm on a terminal, or pass --yes"
        )


def quorum(voters: int) -> int:
    return voters // 2 + 1


def live_members(
    members: Sequence[Member], statuses: Sequence[EndpointStatus]
) -> tuple[LiveMember, ...]:
    """The member list joined with the statuses of the members that answered."""
    by_id = {s.member_id: s for s in statuses if s.member_id is not None and s.error is None}
    result = []
    for m in members:
        status = by_id.get(m.id)
        result.append(
            LiveMember(
                id=m.id,
                name=m.name,
                peer_urls=m.peer_urls,
                client_urls=m.client_urls,
                is_learner=m.is_learner,
                healthy=status is not None and status.healthy,
                is_leader=status is not None and status.is_leader,
                raft_index=status.raft_index if status is not None else None,
                version=status.version if status is not None else None,
            )
        )
    return tuple(result)


def find_by_peer(live: Sequence[LiveMember], peer_url: str) -> LiveMember | None:
    return next((m for m in live if peer_url in m.peer_urls), None)


def plan_membership(
    wanted: Sequence[Wanted],
    live: Sequence[LiveMember],
    recorded: Collection[str] = (),
    allow_even: bool = False,
    replacement: Replacement | None = None,
) -> MemberPlan:
    """The changes that turn `live` into `wanted`, in a safe order; refuses what is unsafe.

    `recorded`: names etcdforge registered (the cluster record), so a learner of ours that the
    spec no longer wants is removed, while a learner someone else added is refused.
    """
    voters = [m for m in live if not m.is_learner]
    _check_identities(wanted, live, replacement)
    _check_learners(live, wanted, recorded)
    removals = _removals(wanted, live, replacement)
    additions = _additions(wanted, live, replacement)
    final = len(wanted)
    if final % 2 == 0 and (removals or additions) and not allow_even:
        raise SpecError(
            f"the change leaves {final} voting members, an even count that tolerates no more "
            f"failures than {final - 1}; use an odd count or pass --allow-even"
        )
    _check_majority_stays(voters, removals)
    ordered = _order_removals(removals)
    _check_quorum(voters, ordered)
    # Learners, members that are down and a replaced member go before any addition (a failed
    # member is removed first: etcd before 3.5.30 refuses `member add` while a voter is down,
    # etcd #21640); healthy members leave only after the additions, keeping fault tolerance.
    first = [r for r in ordered if r[1].is_learner or not r[1].healthy or r[0].replacing]
    later = [r for r in ordered if r not in first]
    if additions:
        leaving = {m.id for _, m in first}
        _check_healthy_for_adding(additions[0].name, [m for m in voters if m.id not in leaving])
    changes = _assemble(first, additions, later, len(voters))
    return MemberPlan(tuple(changes), len(voters), final)


def _check_identities(
    wanted: Sequence[Wanted], live: Sequence[LiveMember], replacement: Replacement | None
) -> None:
    """A name or an address means one member: refuse a spec that moves or renames one."""
    for want in wanted:
        at_url = find_by_peer(live, want.peer_url)
        if at_url is not None and at_url.name and at_url.name != want.name:
            raise SpecError(
                f"member {want.name}: {want.peer_url} belongs to live member {at_url.name} "
                f"(ID {at_url.id}); give {want.name} its own address, or keep the name"
            )
        if at_url is None and want.client_url in {u for m in live for u in m.client_urls}:
            raise SpecError(
                f"member {want.name}: {want.client_url} is the client URL of another live "
                "member; give it its own address or ports"
            )
        named = [m for m in live if m.name == want.name and want.peer_url not in m.peer_urls]
        if named and not (replacement and replacement.name == want.name):
            old = named[0]
            raise SpecError(
                f"member {want.name} runs at {', '.join(old.peer_urls)} in the cluster but the "
                f"spec moves it to {want.peer_url}; rebuild it there with "
                f"`etcdforge member replace {want.name} -f FILE`"
            )


def _check_learners(
    live: Sequence[LiveMember], wanted: Sequence[Wanted], recorded: Collection[str]
) -> None:
    learners = [m for m in live if m.is_learner]
    if len(learners) > 1:
        names = ", ".join(m.label for m in learners)
        raise UnsafeOperationError(
            f"the cluster has {len(learners)} learners ({names}); remove all but one with "
            "`etcdctl member remove ID` first"
        )
    if not learners:
        return
    learner = learners[0]
    ours = learner.name in recorded or any(w.peer_url in learner.peer_urls for w in wanted)
    if not ours:
        raise UnsafeOperationError(
            f"member {learner.label} is a learner that etcdforge did not add, and etcd holds one "
            "learner at a time; promote it and add it to the spec, or remove it with "
            f"`etcdctl member remove {learner.id}`"
        )


def _removals(
    wanted: Sequence[Wanted], live: Sequence[LiveMember], replacement: Replacement | None
) -> list[tuple[MemberChange, LiveMember]]:
    urls = {w.peer_url for w in wanted}
    found = []
    for member in live:
        replaced = replacement is not None and member.id == replacement.old_id
        if not replaced and urls & set(member.peer_urls):
            continue
        name = member.name or (replacement.name if replaced and replacement else member.label)
        change = MemberChange(
            ChangeKind.REMOVE,
            name,
            member.peer_urls[0] if member.peer_urls else "",
            member_id=member.id,
            replacing=replaced,
        )
        found.append((change, member))
    return found


def _additions(
    wanted: Sequence[Wanted], live: Sequence[LiveMember], replacement: Replacement | None
) -> list[MemberChange]:
    old_id = replacement.old_id if replacement is not None else None
    current = [m for m in live if m.id != old_id]  # a replaced member's ID never comes back
    adds = []
    for want in wanted:
        present = find_by_peer(current, want.peer_url)
        if present is not None and not present.is_learner:
            continue
        adds.append(
            MemberChange(
                ChangeKind.ADD,
                want.name,
                want.peer_url,
                want.client_url,
                member_id=present.id if present is not None else None,
            )
        )
    # The registered learner first: etcd takes no second one until it is promoted.
    return sorted(adds, key=lambda a: a.member_id is None)


def _check_majority_stays(
    voters: Sequence[LiveMember], removals: Sequence[tuple[MemberChange, LiveMember]]
) -> None:
    leaving = [m for _, m in removals if not m.is_learner]
    staying = len(voters) - len(leaving)
    if leaving and staying < quorum(len(voters)):
        names = ", ".join(m.label for m in leaving)
        raise UnsafeOperationError(
            f"removing {len(leaving)} of {len(voters)} voting members ({names}) leaves "
            f"{staying}, fewer than a majority of the {len(voters)} there are now; remove fewer "
            "members (the ones that stay must hold a quorum of today's cluster)"
        )


def _order_removals(
    removals: list[tuple[MemberChange, LiveMember]],
) -> list[tuple[MemberChange, LiveMember]]:
    """Learners and members that are down first (they hold no quorum), the leader last."""
    return sorted(
        removals,
        key=lambda r: (not r[1].is_learner, not r[0].replacing, r[1].healthy, r[1].is_leader),
    )


def _check_quorum(
    voters: Sequence[LiveMember], ordered: Sequence[tuple[MemberChange, LiveMember]]
) -> None:
    remaining = list(voters)
    for change, member in ordered:
        if member.is_learner:
            continue
        remaining = [m for m in remaining if m.id != member.id]
        healthy = sum(m.healthy for m in remaining)
        if healthy < quorum(len(remaining)):
            down = ", ".join(m.label for m in remaining if not m.healthy)
            raise UnsafeOperationError(
                f"not removing {change.name}: it would leave {healthy} healthy of "
                f"{len(remaining)} voting members, fewer than their quorum of "
                f"{quorum(len(remaining))} (not healthy: {down}); make them healthy first"
            )


def _check_healthy_for_adding(name: str, staying: Sequence[LiveMember]) -> None:
    down = [m.label for m in staying if not m.healthy]
    if down:
        raise UnsafeOperationError(
            f"not adding {name}: the cluster is not healthy ({', '.join(down)} not healthy); "
            "make every member healthy first (`etcdforge status`), or rebuild a lost one with "
            "`etcdforge member replace NAME`"
        )


def _assemble(
    first: Sequence[tuple[MemberChange, LiveMember]],
    additions: Sequence[MemberChange],
    later: Sequence[tuple[MemberChange, LiveMember]],
    voters: int,
) -> list[MemberChange]:
    """The changes in order, each with why it is safe given the voting members at that point."""
    changes = []
    for change, member in [*first, *((a, None) for a in additions), *later]:
        if member is None:
            why = (
                f"a learner does not vote, so the quorum stays {quorum(voters)} of {voters} "
                f"while it catches up; promoted once in sync with the leader: {voters + 1} "
                f"voting members, quorum {quorum(voters + 1)}"
            )
            voters += 1
        elif member.is_learner:
            why = "a learner does not vote: the quorum does not change"
        else:
            voters -= 1
            state = "healthy" if member.healthy else "not healthy, so it holds no quorum"
            lead = "; it leads: leadership moves to a caught-up follower first"
            why = f"{state}{lead * member.is_leader}; {voters} voting members stay, quorum "
            why += str(quorum(voters))
        changes.append(replace(change, why=why))
    return changes


def promotion_warning(versions: Collection[str]) -> str | None:
    """etcd #19557: 3.5.1-3.5.19 did not persist a promotion to the v3 store; say what to do."""
    low, high = PROMOTION_NOT_PERSISTED
    affected = sorted(v for v in versions if low <= _version(v) <= high)
    if not affected:
        return None
    return (
        f"a learner was promoted on etcd {', '.join(dict.fromkeys(affected))}, which does not "
        f"persist promotions to the v3 store (etcd #19557): upgrade to {SAFE_BEFORE_36} or "
        "later before any upgrade to 3.6"
    )


def _version(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(".")[:3])
    except ValueError:
        return ()


def catch_up(learner_index: int | None, leader_index: int | None) -> float | None:
    """How far a learner's raft log is, as a fraction of the leader's."""
    if learner_index is None or not leader_index:
        return None
    return min(learner_index / leader_index, 1.0)
