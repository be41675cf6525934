"""Shared fixtures: real local etcd clusters, started once per test module where that is safe."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from etcdforge.ops.down import down
from etcdforge.ops.env import env_vars
from etcdforge.ops.target import Selection
from etcdforge.ops.up import up
from tests.helpers import LocalCluster, require_binary, spec_data, write_spec

ClusterFactory = Callable[..., LocalCluster]

# Real test hosts (tests/fleet.py) and etcd release tarballs served on loopback.
pytest_plugins = ["tests.fleet_plugin", "tests.apply_helpers"]


@pytest.fixture(autouse=True)
def _isolated_state_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No test ever touches the user's real state directory or default cluster."""
    monkeypatch.setenv("ETCDFORGE_STATE_HOME", str(tmp_path_factory.mktemp("state-home")))


def start_cluster(
    directory: Path, name: str, count: int = 3, version: str = "3.5.1", **extra: Any
) -> LocalCluster:
    binary = require_binary(version)
    data = spec_data(name, count, binary, **extra)
    spec_path = write_spec(directory, data)
    state_dir = directory / "state"
    selection = Selection(file=spec_path, state_dir=state_dir)
    up(selection, allow_even=count % 2 == 0)
    return LocalCluster(spec_path, state_dir, data, env_vars(selection))


def stop_cluster(cluster: LocalCluster) -> None:
    selection = Selection(file=cluster.spec_path, state_dir=cluster.state_dir)
    if (cluster.state_dir / "cluster.json").exists():
        down(selection, purge=True)


@pytest.fixture(scope="module")
def cluster_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterFactory]:
    """Start clusters for a module; every one is stopped and purged when the module ends."""
    started: list[LocalCluster] = []

    def make(name: str = "t", count: int = 3, version: str = "3.5.1", **extra: Any) -> LocalCluster:
        cluster = start_cluster(tmp_path_factory.mktemp(name), name, count, version, **extra)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        stop_cluster(cluster)


@pytest.fixture(scope="module")
def cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    """One healthy 3-member etcd 3.5.1 cluster shared by a module's read-mostly tests."""
    return cluster_factory("shared")
