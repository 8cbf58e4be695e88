"""Integration fixtures: a real AIOS (real processes, Redis, model) in a temporary home, booted once per session by
the SDK's pytest plugin (sdk/aios/pytest_plugin.py, the fixtures agent authors use), 4 slots."""

from __future__ import annotations

from typing import Iterator

import pytest

import aios
from aios.pytest_plugin import AiosSystem
from deploy.cluster import Cluster


@pytest.fixture(scope="session")
def cluster(aios_system: AiosSystem) -> Cluster:
    return aios_system.cluster


@pytest.fixture(scope="session")
def kernel(aios_system: AiosSystem) -> Iterator[aios.Connection]:
    yield aios_system.operator


@pytest.fixture
def agent(aios_agent: aios.Agent) -> aios.Agent:
    return aios_agent
