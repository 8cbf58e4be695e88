"""`aios reshard`: moves each agent's memory and storage to the shard a new layout puts it on, offline.

Memory and storage shards are named memory, memory_2, ... (storage likewise), each with its own directory under
`$AIOS_HOME/data/`, and an agent's data lives on the shard its id hashes to among the names (services/shards.py).
Changing the number of shards moves about 1/N of the agents. With AIOS stopped, this moves them:

- memory: an agent's whole SQLite file (its write-ahead log folded in first) is copied into the new shard's
  directory under a temporary name, synced, renamed into place, and only then removed from the old one;
- storage: the rows of an agent's namespace (every version, its usage, the grants it gave, its search index) are
  copied into the new shard's database in one transaction, and only after that commit deleted from the old one.
  The request ids of writes (a 24-hour cache that makes a retried write happen once) stay on the shard that
  executed them: they name the caller, not the namespace written, and no retry crosses an offline reshard.

Nothing is ever only in flight: at every moment each agent's data is whole on at least one shard. `shards.json`
says "resharding" from the first move to the last, and `aios up` refuses to start meanwhile; an interrupted run is
finished by running it again (it scans every shard of both layouts and moves what is not where it belongs; a copy
left over by the interruption is replaced by the source, which no one has written since).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from deploy.cluster import read_layout, replica_names, write_layout
from services.durable_sqlite import connect_durable, transaction
from services.memory.agent_db import AgentDatabase, remove_database
from services.shards import ShardRing
from services.storage.core import RecordStore

# Storage tables of an agent's namespace and the column naming that agent (the search index is handled apart: FTS5).
STORAGE_TABLES = (("versions", "agent_id"), ("usage", "agent_id"), ("grants", "owner"))
STORAGE_FILE = "storage.sqlite3"


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reshard_memory(data: Path, sources: list[str], targets: list[str]) -> int:
    """Moves every agent file on the `sources` shards that the ring of `targets` puts elsewhere; returns how many."""
    ring, moved = ShardRing(targets), 0
    for name in sources:
        for path in sorted((data / name).glob("*.sqlite3")):
            destination = ring.owner(AgentDatabase.owner_of(path))
            if destination == name:
                continue
            db = connect_durable(path)
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file alone is the whole database
            db.close()
            directory = data / destination
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            staging = directory / (path.stem + ".moving")  # not *.sqlite3: never taken for an agent's file
            shutil.copyfile(path, staging)
            with staging.open("rb") as copy:
                os.fsync(copy.fileno())
            staging.replace(directory / path.name)
            _sync_directory(directory)
            remove_database(path)
            _sync_directory(path.parent)
            moved += 1
    return moved


def reshard_storage(data: Path, sources: list[str], targets: list[str]) -> int:
    """Moves the rows of every agent on the `sources` shards that the ring of `targets` puts elsewhere; returns how
    many agents moved."""
    ring, moved = ShardRing(targets), 0
    for name in sources:
        path = data / name / STORAGE_FILE
        if not path.exists():
            continue
        RecordStore(path).close()  # a database from an older AIOS gets today's schema first
        source = connect_durable(path)
        agents = sorted({row[0] for table, column in STORAGE_TABLES
                         for row in source.execute(f"SELECT DISTINCT {column} FROM {table}")})
        for agent in agents:
            destination = ring.owner(agent)
            if destination == name:
                continue
            target_path = data / destination / STORAGE_FILE
            RecordStore(target_path).close()  # the schema, on a new shard
            target = connect_durable(target_path)
            target.execute("ATTACH DATABASE ? AS source", (str(path),))
            with transaction(target):  # the source's rows replace the same rows (an interrupted run's copy) only
                for table, column in STORAGE_TABLES:
                    columns = ", ".join(row[1] for row in target.execute(f"PRAGMA main.table_info({table})"))
                    target.execute(f"INSERT OR REPLACE INTO main.{table} ({columns}) SELECT {columns} "
                                   f"FROM source.{table} WHERE {column}=?", (agent,))
                target.execute("DELETE FROM main.search WHERE agent_id=? AND key IN "
                               "(SELECT key FROM source.search WHERE agent_id=?)", (agent, agent))
                target.execute("INSERT INTO main.search(body, agent_id, key) SELECT body, agent_id, key "
                               "FROM source.search WHERE agent_id=?", (agent,))
            target.execute("DETACH DATABASE source")
            target.close()
            with transaction(source):  # only once the copy is committed
                for table, column in STORAGE_TABLES:
                    source.execute(f"DELETE FROM {table} WHERE {column}=?", (agent,))
                source.execute("DELETE FROM search WHERE agent_id=?", (agent,))
            moved += 1
        source.close()
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
