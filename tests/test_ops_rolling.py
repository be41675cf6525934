"""The pure parts of the one rolling policy: member order and the leadership successor."""

from __future__ import annotations

from etcdforge.client import EndpointStatus
from etcdforge.ops.health import successor
from etcdforge.ops.rolling import followers_first


def _status(endpoint: str, member: str, index: int, **extra: object) -> EndpointStatus:
    fields: dict[str, object] = {"healthy": True, "leader": "1", "raft_index": index}
    fields.update(extra)
    return EndpointStatus(endpoint=endpoint, member_id=member, **fields)  # type: ignore[arg-type]


def test_followers_first_puts_only_the_leader_last() -> None:
    assert followers_first(["a", "b", "c"], "a") == ["b", "c", "a"]
    assert followers_first(["a", "b", "c"], "b") == ["a", "c", "b"]
    assert followers_first(["a", "b"], None) == ["a", "b"]
    assert followers_first(["a", "c"], "b") == ["a", "c"]  # the leader is not being restarted


def test_successor_is_the_healthy_voter_furthest_ahead() -> None:
    statuses = [
        _status("https://a", "1", 100),
        _status("https://b", "2", 90),
        _status("https://c", "3", 99),
    ]
    chosen = successor(statuses, "https://a")
    assert chosen is not None and chosen.member_id == "3"


def test_successor_skips_unhealthy_learners_and_the_leaving_member() -> None:
    statuses = [
        _status("https://a", "1", 100),
        _status("https://b", "2", 120, healthy=False),
        _status("https://c", "3", 130, is_learner=True),
        _status("https://d", "4", 80),
    ]
    chosen = successor(statuses, "https://a")
    assert chosen is not None and chosen.member_id == "4"
    assert successor(statuses[:3], "https://a") is None
