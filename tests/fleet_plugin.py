"""pytest fixtures for the test fleet (real Debian hosts with systemd and sshd; tests/fleet.py).

Register it once, from tests/conftest.py::

    pytest_plugins = ["tests.fleet_plugin"]

(or ad hoc: ``python3 -m pytest -p tests.fleet_plugin ...``). Then, in any test::

    @pytest.mark.slow
    def test_deploy(fleet3: list[Host]) -> None:
        a, b, c = fleet3
        a.ssh("sudo", "-n", "true", user="deploy")

Fixtures (all session-scoped, all hosts powered off and removed at session end):

- ``fleet``: the Fleet itself (``fleet.ssh_key``, ``fleet.known_hosts``, ``fleet.hosts``).
- ``fleet_factory``: ``make(count) -> list[Host]``, boots ``count`` *new* hosts on each call.
- ``fleet3`` / ``fleet5``: 3 and 5 hosts, disjoint, so a 3-member and a 5-member cluster can
  coexist. Measured on 2 cores: 3 hosts boot in ~0.8 s, 5 in ~1.5 s (in parallel); an idle
  host costs ~15 MB RAM (the overlay shares the page cache) and no CPU.

Hosts are shared by the whole session: a test that changes one (cut network, stopped units,
installed files) must undo it (``with host.network_cut(): ...``, try/finally).

If the machine cannot run the fleet (not root, tools missing) the fixtures skip, except under
CI (env CI=true), where they fail: CI must never silently skip the real-host tests. Tests that
use these fixtures get the ``slow`` marker automatically (``-m "not slow"`` leaves them out).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.fleet import Fleet, Host, fleet_available

FLEET_FIXTURES = frozenset({"fleet", "fleet_factory", "fleet3", "fleet5"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: starts real etcd clusters or test hosts")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if FLEET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes", "on"}


def require_fleet() -> None:
    """Skip (or, in CI, fail) the calling test or fixture if this machine cannot run the fleet."""
    reason = fleet_available()
    if reason is None:
        return
    if _in_ci():
        pytest.fail(f"test fleet required in CI but unavailable: {reason}", pytrace=False)
    pytest.skip(f"test fleet unavailable: {reason}")


@pytest.fixture(scope="session")
def fleet() -> Iterator[Fleet]:
    """The session's Fleet; every host it started is torn down when the session ends."""
    require_fleet()
    instance = Fleet()
    try:
        yield instance
    finally:
        instance.close()


@pytest.fixture(scope="session")
def fleet_factory(fleet: Fleet) -> Callable[[int], list[Host]]:
    """``make(count)``: boot ``count`` new hosts (each call gets fresh ones)."""
    return fleet.start


@pytest.fixture(scope="session")
def fleet3(fleet_factory: Callable[[int], list[Host]]) -> list[Host]:
    """Three running hosts, shared by the session."""
    return fleet_factory(3)


@pytest.fixture(scope="session")
def fleet5(fleet_factory: Callable[[int], list[Host]]) -> list[Host]:
    """Five running hosts, distinct from fleet3's, shared by the session."""
    return fleet_factory(5)
