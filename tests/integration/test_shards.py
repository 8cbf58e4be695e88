"""Memory and storage as several shards behind the kernel, and `aios reshard` between layouts, on real processes.

The LLM core runs the instant backend (a test double that answers without a model): nothing here generates text,
and a model load per cluster would only cost time.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import aios
from deploy.cluster import Cluster, ClusterConfig
from services.memory.database import entries_on_disk
from services.shards import ShardRing

INSTANT = {"llm_core": ["--backend", "instant"]}


def storage_rows(home: Path, shard: str, agent_id: str) -> int:
    db = sqlite3.connect(f"file:{home / 'data' / shard / 'storage.sqlite3'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT count(*) FROM versions WHERE agent_id=?", (agent_id,)).fetchone()[0]
    finally:
        db.close()


def test_each_agents_data_lives_on_its_shard_and_grants_reach_across_shards(tmp_path):
    config = ClusterConfig(home=tmp_path, slots=2, memory_shards=2, storage_shards=2, extra_args=INSTANT)
    with Cluster(config) as cluster, cluster.connect() as kernel:
        agents = [kernel.register(f"sharded-{i}") for i in range(12)]
        storage_ring, memory_ring = ShardRing(["storage", "storage_2"]), ShardRing(["memory", "memory_2"])
        for agent in agents:
            agent.storage_write("notes/plan", f"plan of {agent.name}")
            agent.memory_add(f"{agent.name} likes tide tables")
            assert agent.call_tool("file_write", path="log.txt", content=agent.name)["version"] == 1  # via tools
        for agent in agents:
            home_shard = storage_ring.owner(agent.id)
            other = "storage_2" if home_shard == "storage" else "storage"
            assert storage_rows(tmp_path, home_shard, agent.id) == 2 and storage_rows(tmp_path, other, agent.id) == 0
            mine = memory_ring.owner(agent.id)
            assert entries_on_disk(tmp_path / "data" / mine, agent.id) == 1
            assert entries_on_disk(tmp_path / "data" / ("memory_2" if mine == "memory" else "memory"), agent.id) == 0
            assert agent.call_tool("file_read", path="log.txt")["content"] == agent.name
        assert {storage_ring.owner(a.id) for a in agents} == {"storage", "storage_2"}  # both shards in use
        owner = agents[0]
        reader = next(a for a in agents if storage_ring.owner(a.id) != storage_ring.owner(owner.id))
        owner.storage_grant(reader.id, "notes/", prefix=True)
        assert reader.storage_read("notes/plan", owner=owner.id) == f"plan of {owner.name}".encode()
        received = reader.storage_grants().received
        assert [(g.owner_agent_id, g.key) for g in received] == [(owner.id, "notes/")]
        with pytest.raises(aios.SyscallError) as refused:  # a grant covers what it names, on every shard
            agents[2 if agents[2] is not reader else 3].storage_read("notes/plan", owner=owner.id)
        assert refused.value.code.name == "PERMISSION_DENIED"
        status = kernel.status()
        assert {s.name for s in status.services} >= {"memory", "memory_2", "storage", "storage_2"}
        assert all(s.healthy for s in status.services)
        assert status.memory.entries == len(agents)  # every shard's counters added up


def test_a_reshard_moves_every_agents_data_and_loses_nothing(tmp_path):
    config = ClusterConfig(home=tmp_path, slots=2, extra_args=INSTANT)
    written = {}
    with Cluster(config) as cluster, cluster.connect() as kernel:
        agents = [kernel.register(f"resharded-{i}") for i in range(16)]
        for i, agent in enumerate(agents):
            agent.storage_write("a", f"one {i}")
            agent.storage_write("a", f"two {i}")
            agent.memory_add(f"memory {i} of the harbour")
            written[agent.id] = (agent.token, [e.text for e in agent.memory_list()], agent.storage_history("a"))
        agents[0].storage_grant(agents[1].id, "a")
    # Offline: the layout the data has refuses another start ...
    with pytest.raises(Exception, match="aios reshard --memory-shards 2 --storage-shards 3"):
        Cluster(ClusterConfig(home=tmp_path, memory_shards=2, storage_shards=3, extra_args=INSTANT)).start()
    moved = subprocess.run([sys.executable, "-m", "deploy.cli", "--home", str(tmp_path), "reshard",
                            "--memory-shards", "2", "--storage-shards", "3"], capture_output=True, text=True, timeout=120)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert "agents' storage moved" in moved.stdout
    config = ClusterConfig(home=tmp_path, slots=2, memory_shards=2, storage_shards=3, extra_args=INSTANT)
    with Cluster(config) as cluster:
        ring = ShardRing(["storage", "storage_2", "storage_3"])
        assert {ring.owner(agent_id) for agent_id in written} == {"storage", "storage_2", "storage_3"}
        for agent_id, (token, memories, history) in written.items():
            with cluster.connect(token) as connection:
                agent = connection.agent()  # its token still proves it
                assert [e.text for e in agent.memory_list()] == memories
                assert agent.storage_history("a") == history
                assert storage_rows(tmp_path, ring.owner(agent_id), agent_id) == 2
        first, second = list(written)[:2]
        with cluster.connect(written[second][0]) as connection:
            assert connection.agent().storage_read("a", owner=first) == b"two 0"  # the grant moved with its owner
