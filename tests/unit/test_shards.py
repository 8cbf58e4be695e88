"""Shards: which shard holds an agent (consistent hashing), and `aios reshard` moving data between real SQLite
shards with nothing lost, also when a run is interrupted."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from deploy import reshard as reshard_module
from deploy.cluster import Cluster, ClusterConfig, StartError, check_layout, replica_names
from deploy.reshard import reshard
from services.memory.core import MemoryStore
from services.memory.database import entries_on_disk
from services.shards import ShardRing, parse_named_addresses
from services.storage.core import Access, RecordStore

AGENTS = [f"agt-{i:04d}" for i in range(40)]


def test_agents_spread_evenly_and_a_new_shard_takes_only_its_share_from_the_others():
    agents = [f"agent-{i}" for i in range(20_000)]
    three = ShardRing(replica_names("memory", 3))
    counts = Counter(three.owner(a) for a in agents)
    assert set(counts) == {"memory", "memory_2", "memory_3"}
    assert all(abs(n - len(agents) / 3) < 0.15 * len(agents) / 3 for n in counts.values()), counts
    four = ShardRing(replica_names("memory", 4))
    moved = [a for a in agents if three.owner(a) != four.owner(a)]
    assert all(four.owner(a) == "memory_4" for a in moved)  # nothing moves between the old shards
    assert abs(len(moved) - len(agents) / 4) < 0.15 * len(agents) / 4
    assert ShardRing(["memory"]).owner("anyone") == "memory"


def test_the_ring_hashes_names_not_addresses_and_refuses_duplicates():
    assert ShardRing(["a", "b"]).owner("x") == ShardRing(["a", "b"]).owner("x")
    with pytest.raises(ValueError):
        ShardRing(["a", "a"])
    with pytest.raises(ValueError):
        ShardRing([])


def test_named_address_options():
    assert parse_named_addresses(["h:1", "east=h:2", "h:3"], "llm_core") == [
        ("llm_core", "h:1"), ("east", "h:2"), ("llm_core_3", "h:3")]
    for bad in (["nohostport"], ["a=h:1", "a=h:2"], ["x="]):
        with pytest.raises(ValueError):
            parse_named_addresses(bad, "memory")


def fill(data: Path) -> dict:
    """Every agent's memory and records on one shard of each, as a single-shard AIOS writes them; what each holds."""
    memory, storage = MemoryStore(data / "memory"), RecordStore(data / "storage" / "storage.sqlite3")
    for i, agent in enumerate(AGENTS):
        for n in range(3):
            memory.add(agent, f"{agent} remembers fact {n} about lighthouse {i}", role="user" if n else "")
        storage.write(agent, "notes/a", f"first draft by {agent}".encode(), {"n": str(i)})
        storage.write(agent, "notes/a", f"second draft by {agent} about lighthouses".encode(), request_id=f"r-{i}")
        storage.write(agent, "notes/b", b"other")
        storage.delete(agent, "notes/b")
        storage.grant(agent, AGENTS[(i + 1) % len(AGENTS)], "notes/", prefix=True, access=Access.READ)
    memory.close()
    storage.close()
    return snapshot_of(data, {"memory": 1, "storage": 1})


def snapshot_of(data: Path, counts: dict[str, int]) -> dict:
    """What each agent holds, read through the shard the ring names; and that no other shard holds any of it."""
    held: dict = {}
    rings = {kind: ShardRing(replica_names(kind, n)) for kind, n in counts.items()}
    stores = {name: MemoryStore(data / name) for name in replica_names("memory", counts["memory"])}
    records = {name: RecordStore(data / name / "storage.sqlite3") for name in replica_names("storage", counts["storage"])}
    try:
        for agent in AGENTS:
            memory = stores[rings["memory"].owner(agent)]
            storage = records[rings["storage"].owner(agent)]
            entries, _ = memory.list(agent)
            given, received = storage.grants(agent)
            held[agent] = {
                "memory": [(e.text, e.role) for e in entries],
                "memory_search": [h.entry.text for h in memory.search(agent, "fact 2")],
                "records": [(r.key, r.version, r.metadata) for r in storage.list(agent)],
                "history": [(r.version, r.deleted) for key in ("notes/a", "notes/b") for r in storage.history(agent, key)],
                "text": storage.read(agent, "notes/a")[1],
                "search": [h.info.key for h in storage.search(agent, "lighthouses")],
                "given": sorted((g.grantee, g.key) for g in given),
                "usage": storage.usage(agent).bytes,
            }
            for name in stores:
                assert entries_on_disk(data / name, agent) == (3 if name == rings["memory"].owner(agent) else 0)
            for name, other in records.items():
                if name != rings["storage"].owner(agent):
                    assert other.list(agent) == [] and other.grants(agent)[0] == []
    finally:
        for store in [*stores.values(), *records.values()]:
            store.close()
    return held


def test_reshard_moves_every_agent_to_its_new_shard_and_back_with_nothing_lost(tmp_path):
    before = fill(tmp_path / "data")
    moved = reshard(tmp_path, {"memory": 3, "storage": 2})
    assert 0 < moved["memory"] < len(AGENTS) and 0 < moved["storage"] < len(AGENTS)
    assert snapshot_of(tmp_path / "data", {"memory": 3, "storage": 2}) == before
    assert json.loads((tmp_path / "shards.json").read_text()) == {"memory": 3, "storage": 2}
    reshard(tmp_path, {"memory": 1, "storage": 1})
    assert snapshot_of(tmp_path / "data", {"memory": 1, "storage": 1}) == before


def test_a_write_into_another_agents_namespace_leaves_the_writers_own_data_whole_through_a_reshard(tmp_path):
    before = fill(tmp_path / "data")
    reshard(tmp_path, {"memory": 1, "storage": 2})
    ring = ShardRing(replica_names("storage", 2))
    owner = next(a for a in AGENTS if ring.owner(a) == "storage")
    writer = next(a for a in AGENTS if ring.owner(a) == "storage_2" and ShardRing(
        replica_names("storage", 3)).owner(a) == "storage_2")  # stays where it is
    store = RecordStore(tmp_path / "data" / "storage" / "storage.sqlite3")
    store.grant(owner, writer, "shared/", prefix=True, access=Access.READ_WRITE)
    # The write's request id is kept on the owner's shard, under the writer's name.
    store.write(writer, "shared/x", b"from the writer", owner=owner, request_id="w-1")
    store.close()
    reshard(tmp_path, {"memory": 1, "storage": 3})
    after = snapshot_of(tmp_path / "data", {"memory": 1, "storage": 3})
    assert after[writer] == before[writer]
    store = RecordStore(tmp_path / "data" / ShardRing(replica_names("storage", 3)).owner(owner) / "storage.sqlite3")
    try:
        assert store.read(owner, "shared/x")[1] == b"from the writer"
    finally:
        store.close()


def killed_at(real, call: int):
    """`real`, except that its `call`-th call kills the run (as kill -9 would, between two steps of a move)."""
    calls = {"n": 0}

    def step(*args):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt("killed mid-reshard")
        return real(*args)

    return step


def test_an_interrupted_reshard_blocks_the_start_and_finishes_when_run_again(tmp_path, monkeypatch):
    before = fill(tmp_path / "data")
    # A move is two transactions (the copy on the new shard, then the delete on the old): the 4th call is the
    # second agent's delete. Killed there in memory (its rows on both shards) ...
    with monkeypatch.context() as patch:
        patch.setattr(reshard_module, "transaction", killed_at(reshard_module.transaction, 4))
        with pytest.raises(KeyboardInterrupt):
            reshard(tmp_path, {"memory": 2, "storage": 2})
    with pytest.raises(StartError, match="did not finish"):
        check_layout(tmp_path, {"memory": 2, "storage": 2})
    # ... then, run again, in storage the same way.
    storage_part = reshard_module.reshard_storage

    def storage_killed(*args):
        with monkeypatch.context() as patch:
            patch.setattr(reshard_module, "transaction", killed_at(reshard_module.transaction, 4))
            return storage_part(*args)

    with monkeypatch.context() as patch:
        patch.setattr(reshard_module, "reshard_storage", storage_killed)
        with pytest.raises(KeyboardInterrupt):
            reshard(tmp_path, {"memory": 2, "storage": 2})
    reshard(tmp_path, {"memory": 2, "storage": 2})
    assert snapshot_of(tmp_path / "data", {"memory": 2, "storage": 2}) == before
    check_layout(tmp_path, {"memory": 2, "storage": 2})


def test_a_home_does_not_start_with_other_shard_counts_than_its_data(tmp_path):
    reshard(tmp_path, {"memory": 2, "storage": 1})
    with pytest.raises(StartError, match="aios reshard --memory-shards 1 --storage-shards 1"):
        Cluster(ClusterConfig(home=tmp_path)).start()
