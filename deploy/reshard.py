"""`aios reshard`: moves each agent's memory and storage to the shard a new layout puts it on, offline.

Memory and storage shards are named memory, memory_2, ... (storage likewise), each with its own directory under
`$AIOS_HOME/data/`, and an agent's data lives on the shard its id hashes to among the names (services/shards.py).
Changing the number of shards moves about 1/N of the agents. With AIOS stopped, this moves them:

- memory: the rows of an agent (its entries with their numbers, the next number, its add request ids; the
  full-text index follows by trigger) are copied into the new shard's file in one transaction, and only after that
  commit deleted from the old one;
- storage: the rows of an agent's namespace (every version, its usage, the grants it gave, its search index) are
  moved the same way. The request ids of writes (a 24-hour cache that makes a retried write happen once) stay on the shard that
  executed them: they name the caller, not the namespace written, and no retry crosses an offline reshard.

Nothing is ever only in flight: at every moment each agent's data is whole on at least one shard. `shards.json`
says "resharding" from the first move to the last, and `aios up` refuses to start meanwhile; an interrupted run is
finished by running it again (it scans every shard of both layouts and moves what is not where it belongs; a copy
left over by the interruption is replaced by the source, which no one has written since).
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Callable

from deploy.cluster import read_layout, replica_names, write_layout
from services.durable_sqlite import connect_durable, transaction
from services.memory.database import AGENT_TABLES as MEMORY_TABLES, FILE_NAME as MEMORY_FILE, open_database
from services.shards import ShardRing
from services.storage.core import RecordStore, index_search_rows

# Storage tables of an agent's namespace and the column naming that agent.
STORAGE_TABLES = (("versions", "agent_id"), ("usage", "agent_id"), ("grants", "owner"), ("search", "agent_id"))
STORAGE_FILE = "storage.sqlite3"


def _move_agent(source_path: Path, target_path: Path, tables: tuple[tuple[str, str], ...], value: str,
                derived: Callable[[sqlite3.Connection, str], None] = lambda db, value: None) -> None:
    """Copies the rows naming one agent from one shard's file into another's, replacing any copy an interrupted run
    left there, in one transaction; deletes them from the source only once that committed. `derived(db, value)`
    makes the agent's rows that follow from the moved ones (by their row ids) again, on each side."""
    target = connect_durable(target_path)
    target.execute("ATTACH DATABASE ? AS source", (str(source_path),))
    with transaction(target):
        for table, column in tables:
            # Every column but a table's own row id (memory's entries get a new one; the index follows by trigger).
            columns = ", ".join(row[1] for row in target.execute(f"PRAGMA main.table_info({table})") if row[1] != "id")
            target.execute(f"DELETE FROM main.{table} WHERE {column}=?", (value,))
            target.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM source.{table} "
                           f"WHERE {column}=?", (value,))
        derived(target, value)
    target.execute("DETACH DATABASE source")
    target.close()
    source = connect_durable(source_path)
    with transaction(source):
        for table, column in tables:
            source.execute(f"DELETE FROM {table} WHERE {column}=?", (value,))
        derived(source, value)
    source.close()


def reshard_memory(data: Path, sources: list[str], targets: list[str]) -> int:
    """Moves the rows of every agent on the `sources` shards that the ring of `targets` puts elsewhere; returns how
    many agents moved."""
    ring, moved, ready = ShardRing(targets), 0, set()
    for name in sources:
        source = open_database(data / name)  # today's schema; agent files of an older AIOS moved in
        ready.add(name)
        agents = source.execute("SELECT agent_id, key FROM agents ORDER BY agent_id").fetchall()
        source.close()
        for agent, key in agents:
            destination = ring.owner(agent)
            if destination != name:
                if destination not in ready:  # the schema, on a new shard
                    (data / destination).mkdir(mode=0o700, parents=True, exist_ok=True)
                    open_database(data / destination).close()
                    ready.add(destination)
                _move_agent(data / name / MEMORY_FILE, data / destination / MEMORY_FILE, MEMORY_TABLES, key)
                moved += 1
    return moved


def reshard_storage(data: Path, sources: list[str], targets: list[str]) -> int:
    """Moves the rows of every agent on the `sources` shards that the ring of `targets` puts elsewhere; returns how
    many agents moved."""
    ring, moved, ready = ShardRing(targets), 0, set()
    for name in sources:
        path = data / name / STORAGE_FILE
        if not path.exists():
            continue
        RecordStore(path).close()  # a database from an older AIOS gets today's schema first
        ready.add(name)
        source = connect_durable(path)
        agents = sorted({row[0] for table, column in STORAGE_TABLES
                         for row in source.execute(f"SELECT DISTINCT {column} FROM {table}")})
        source.close()
        for agent in agents:
            destination = ring.owner(agent)
            if destination != name:
                if destination not in ready:  # the schema, on a new shard
                    RecordStore(data / destination / STORAGE_FILE).close()
                    ready.add(destination)
                _move_agent(path, data / destination / STORAGE_FILE, STORAGE_TABLES, agent, index_search_rows)
                moved += 1
    return moved


def reshard(home: Path, counts: dict[str, int], say: Callable[[str], None] = lambda line: None) -> dict[str, int]:
    """Moves memory and storage data of the home at rest to the layout `counts` ({"memory": N, "storage": M});
    returns how many agents moved per kind."""
    layout = read_layout(home)
    old = {kind: layout[kind] for kind in ("memory", "storage")}
    write_layout(home, {**old, "resharding_to": counts})
    moved = {}
    for kind, move in (("memory", reshard_memory), ("storage", reshard_storage)):
        targets = replica_names(kind, counts[kind])
        # Every shard directory there is: an interrupted run (to another layout, even) may have moved some already.
        sources = [p.name for p in sorted((home / "data").glob(f"{kind}*"))
                   if p.is_dir() and re.fullmatch(rf"{kind}(_[0-9]+)?", p.name)]
        say(f"{kind}: {old[kind]} -> {counts[kind]} shards ...")
        moved[kind] = move(home / "data", sources, targets)
        say(f"{kind}: moved {moved[kind]} agents' data")
    write_layout(home, counts)
    return moved
