"""The sweep harness's own rules, without a cluster: where points go and how a missed one moves."""

from __future__ import annotations

import random

from tests.killsweep import _moved_in, kill_points
from tests.killsweep_run import Aim, KillPoint, Line, same_step

TIMELINE = [
    Line(0.5, "→ m1: stop"),
    Line(1.0, "→ m2: stop"),
    Line(5.0, "→ m3: remove /opt/etcd"),
    Line(6.0, "done"),
]


def test_points_split_between_boundaries_and_instants() -> None:
    points = kill_points(TIMELINE, 6.0, 4, random.Random(7))
    assert len(points) == 4
    assert sum(p.boundary for p in points) == 2
    assert all(-1 <= p.index < len(TIMELINE) and p.delay < 6.0 for p in points)


def test_a_point_the_run_outran_moves_into_the_time_it_had() -> None:
    late = KillPoint(2, 4.0, "→ m3: remove /opt/etcd")
    other = KillPoint(0, 0.0, "→ m1: stop")
    aim = Aim(TIMELINE, [other, late])
    aim.seen("→ m3: remove /opt/etcd", 100.0)  # the rerun skipped m1 and m2: done already
    outran = aim.outran(101.0)  # and ended 1 s after the line, before the 4 s delay
    assert outran == (late, KillPoint(2, 0.5, late.text))
    assert _moved_in([other, late], outran) == [other, KillPoint(2, 0.5, late.text)]


def test_nothing_moves_when_no_point_was_armed() -> None:
    aim = Aim(TIMELINE, [KillPoint(1, 0.2, "→ m2: stop")])
    aim.seen("→ m1: stop", 10.0)
    assert aim.outran(11.0) is None
    assert _moved_in([KillPoint(1, 0.2, "→ m2: stop")], None) == [KillPoint(1, 0.2, "→ m2: stop")]


def test_a_step_is_the_same_step_whatever_its_numbers() -> None:
    first = same_step("→ admin: snapshot verified: revision 86, 94 keys (3.7 MiB in 0.5 s)")
    assert first == same_step("→ admin: snapshot verified: revision 112, 120 keys (4 MiB in 1 s)")
    kept = "→ m2 (etcd-1): start etcd on etcd 3.5.30"
    assert same_step(kept) == kept
    assert same_step("→ m1: stop") != same_step("→ m2: stop")
