"""The membership plan (ops.member_plan): pure, from the spec and a live member list."""

from __future__ import annotations

import pytest

from etcdforge.client import EndpointStatus, Member
from etcdforge.errors import SpecError, UnsafeOperationError
from etcdforge.ops.member_plan import (
    ChangeKind,
    LiveMember,
    MemberChange,
    Replacement,
    Wanted,
    catch_up,
    live_members,
    plan_membership,
    promotion_warning,
)
from etcdforge.ops.membership import join_list


def wanted(*names: str) -> list[Wanted]:
    return [Wanted(n, f"https://{n}:2380", f"https://{n}:2379") for n in names]


def live(
    *names: str,
    down: tuple[str, ...] = (),
    leader: str | None = None,
    learner: str | None = None,
) -> list[LiveMember]:
    members = [
        LiveMember(
            id=f"id-{n}",
            name=n,
            peer_urls=(f"https://{n}:2380",),
            client_urls=(f"https://{n}:2379",),
            is_learner=n == learner,
            healthy=n not in down,
            is_leader=n == (leader or names[0]),
        )
        for n in names
    ]
    return members


def kinds(plan: object) -> list[tuple[str, str]]:
    return [(c.kind.value, c.name) for c in plan.changes]  # type: ignore[attr-defined]


def test_same_members_plan_nothing() -> None:
    plan = plan_membership(wanted("a", "b", "c"), live("a", "b", "c"))
    assert plan.changes == () and plan.voters == 3 and plan.final == 3


def test_grow_adds_one_at_a_time_and_says_why_each_is_safe() -> None:
    plan = plan_membership(wanted("a", "b", "c", "d", "e"), live("a", "b", "c"))
    assert kinds(plan) == [("add", "d"), ("add", "e")]
    lines = plan.describe()
    assert lines[0].startswith("1. add d (https://d:2380) as a learner, then promote it: ")
    assert "quorum stays 2 of 3" in lines[0] and "4 voting members, quorum 3" in lines[0]
    assert "quorum stays 3 of 4" in lines[1] and "5 voting members, quorum 3" in lines[1]


def test_grow_from_one_member() -> None:
    assert kinds(plan_membership(wanted("a", "b", "c"), live("a"))) == [
        ("add", "b"),
        ("add", "c"),
    ]


def test_shrink_removes_followers_then_the_leader() -> None:
    plan = plan_membership(wanted("b", "c", "e"), live("a", "b", "c", "d", "e", leader="a"))
    assert kinds(plan) == [("remove", "d"), ("remove", "a")]
    assert "it leads: leadership moves" in plan.changes[1].why
    assert "3 voting members stay, quorum 2" in plan.changes[1].why


def test_removing_two_of_three_is_refused() -> None:
    with pytest.raises(UnsafeOperationError, match=r"removing 2 of 3 voting members .* leaves 1"):
        plan_membership(wanted("a"), live("a", "b", "c"))


def test_removing_a_healthy_member_that_leaves_too_few_healthy_is_refused() -> None:
    with pytest.raises(UnsafeOperationError, match="not removing e: it would leave 2 healthy of 4"):
        plan_membership(
            wanted("a", "b", "c", "d"),
            live("a", "b", "c", "d", "e", down=("d", "c")),
            allow_even=True,
        )


def test_a_member_that_is_down_is_removed_before_members_are_added() -> None:
    plan = plan_membership(wanted("a", "b", "d"), live("a", "b", "c", down=("c",)))
    assert kinds(plan) == [("remove", "c"), ("add", "d")]
    assert "not healthy, so it holds no quorum" in plan.changes[0].why


def test_adding_to_an_unhealthy_cluster_is_refused() -> None:
    with pytest.raises(
        UnsafeOperationError, match=r"not adding d: the cluster is not healthy \(c not"
    ):
        plan_membership(wanted("a", "b", "c", "d", "e"), live("a", "b", "c", down=("c",)))


def test_an_even_result_needs_allow_even() -> None:
    with pytest.raises(SpecError, match="leaves 4 voting members, an even count"):
        plan_membership(wanted("a", "b", "c", "d"), live("a", "b", "c"))
    plan = plan_membership(wanted("a", "b", "c", "d"), live("a", "b", "c"), allow_even=True)
    assert kinds(plan) == [("add", "d")]


def test_a_learner_of_ours_is_finished_first() -> None:
    members = live("a", "b", "c", "e", learner="e")
    plan = plan_membership(wanted("a", "b", "c", "d", "e"), members)
    assert kinds(plan) == [("add", "e"), ("add", "d")]
    assert plan.changes[0].member_id == "id-e" and plan.changes[1].member_id is None


def test_a_learner_registered_but_not_started_is_ours_by_its_address() -> None:
    members = [*live("a", "b", "c"), LiveMember("id-d", "", ("https://d:2380",), is_learner=True)]
    plan = plan_membership(wanted("a", "b", "c", "d"), members, allow_even=True)
    assert [(c.kind, c.member_id) for c in plan.changes] == [(ChangeKind.ADD, "id-d")]


def test_a_learner_someone_else_added_is_refused() -> None:
    members = [*live("a", "b", "c"), LiveMember("id-x", "", ("https://x:2380",), is_learner=True)]
    with pytest.raises(UnsafeOperationError, match="is a learner that etcdforge did not add"):
        plan_membership(wanted("a", "b", "c", "d", "e"), members)


def test_a_learner_of_ours_the_spec_dropped_is_removed() -> None:
    members = live("a", "b", "c", "d", learner="d")
    plan = plan_membership(wanted("a", "b", "c"), members, recorded=["a", "b", "c", "d"])
    assert kinds(plan) == [("remove", "d")]
    assert plan.changes[0].why == "a learner does not vote: the quorum does not change"


def test_moving_a_member_needs_member_replace() -> None:
    spec = [Wanted("c", "https://z:2380", "https://z:2379"), *wanted("a", "b")]
    with pytest.raises(SpecError, match="member replace c -f FILE"):
        plan_membership(spec, live("a", "b", "c"))


def test_an_address_of_another_live_member_is_refused() -> None:
    spec = [*wanted("a", "b"), Wanted("z", "https://c:2380", "https://c:2379")]
    with pytest.raises(SpecError, match="belongs to live member c"):
        plan_membership(spec, live("a", "b", "c"))


def test_a_replacement_removes_the_old_id_first_then_adds_the_name() -> None:
    replacement = Replacement("b", "id-b", "https://b:2380")
    plan = plan_membership(
        wanted("a", "b", "c"), live("a", "b", "c", leader="b"), [], False, replacement
    )
    assert kinds(plan) == [("remove", "b"), ("add", "b")]
    assert plan.changes[0].replacing and "it leads" in plan.changes[0].why
    assert plan.changes[0].title == "remove the old member b (ID id-b) from the cluster"
    # At a new address: the spec's move is what the replacement is for.
    moved = [*wanted("a", "c"), Wanted("b", "https://b2:2380", "https://b2:2379")]
    plan = plan_membership(moved, live("a", "b", "c", down=("b",)), [], False, replacement)
    assert kinds(plan) == [("remove", "b"), ("add", "b")]


def test_live_members_join_statuses_by_id() -> None:
    members = [Member("1", "a", ("p1",), ("c1",)), Member("2", "", ("p2",), (), True)]
    statuses = [
        EndpointStatus("c1", member_id="1", leader="1", raft_index=10, healthy=True),
        EndpointStatus("c2", error="refused"),
    ]
    found = live_members(members, statuses)
    assert found[0].healthy and found[0].is_leader and found[0].raft_index == 10
    assert not found[1].healthy and found[1].is_learner and found[1].label == "2 (p2)"


def test_promotion_warning_names_the_affected_versions() -> None:
    assert promotion_warning(["3.5.20", "3.4.23", "3.5.30"]) is None
    warning = promotion_warning(["3.5.16", "3.5.16", "3.5.30"])
    assert warning is not None
    assert "etcd 3.5.16" in warning and "etcd #19557" in warning and "3.5.32" in warning


def test_catch_up_share() -> None:
    assert catch_up(90, 100) == 0.9
    assert catch_up(120, 100) == 1.0
    assert catch_up(None, 100) is None and catch_up(5, 0) is None


def test_a_joining_member_lists_the_cluster_in_the_spec_order() -> None:
    """Listed as the files phase writes it, so nothing is rewritten once the member is in;
    members the spec does not name (about to leave) come last, the live members always all."""
    change = MemberChange(ChangeKind.ADD, "c", "https://c:2380")
    joined = join_list(live("b", "x", "a"), change, ["a", "b", "c"])
    assert joined == "a=https://a:2380,b=https://b:2380,c=https://c:2380,x=https://x:2380"
    assert join_list(live("b", "a"), change) == "b=https://b:2380,a=https://a:2380,c=https://c:2380"
