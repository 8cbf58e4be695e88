"""Fixtures of the unit tests that need a real redis-server."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from deploy.cluster import Cluster, ClusterConfig


@pytest.fixture
def redis_alone(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of Redis alone, started as `aios up` starts it (its ACL user, which reaches aios:* keys only)."""
    cluster = Cluster(ClusterConfig(home=tmp_path / "home"))
    cluster.restart_service("redis")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_url(redis_alone: Cluster) -> str:
    return redis_alone.redis_url
