"""Integration fixtures: a real AIOS (real processes, Redis, model) in a temporary home."""

from __future__ import annotations

from typing import Iterator

import pytest

import aios
from deploy.cluster import Cluster, ClusterConfig


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    home = tmp_path_factory.mktemp("aios-home")
    with Cluster(ClusterConfig(home=home, slots=4)) as running:
        yield running


@pytest.fixture(scope="session")
def kernel(cluster: Cluster) -> Iterator[aios.Connection]:
    with cluster.connect() as connection:
        yield connection


@pytest.fixture
def agent(kernel: aios.Connection, request: pytest.FixtureRequest) -> aios.Agent:
    return kernel.register(request.node.name[:64])
