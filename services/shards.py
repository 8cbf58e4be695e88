"""A manager run as several shards: which shard holds an agent's data, and one client per shard.

Memory and storage can each run as several processes (shards), each with its own SQLite volume; an agent's data lives
on exactly one shard, chosen by consistent hashing of the agent id over the shard *names* (memory, memory_2, ...): a
shard that moves to another host keeps its data, and adding a shard moves about 1/N of the agents (`aios reshard`
moves their data, offline). The kernel routes every memory and storage syscall with it, the tool manager its file
tools; `deploy/reshard.py` uses the same ring to decide what moves.
"""

from __future__ import annotations

import bisect
import hashlib
from typing import Sequence

from google.protobuf.descriptor import ServiceDescriptor

from services.manager_client import ManagerClient

VIRTUAL_NODES = 128  # points per shard on the ring: agents spread within a few percent of evenly


def _point(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class ShardRing:
    """Consistent hashing: agent id -> shard name."""

    def __init__(self, names: Sequence[str], virtual_nodes: int = VIRTUAL_NODES) -> None:
        if not names or len(set(names)) != len(names):
            raise ValueError(f"shard names must be one or more, all different: {list(names)}")
        self.names = list(names)
        ring = sorted((_point(f"{name}#{i}"), name) for name in names for i in range(virtual_nodes))
        self._points = [point for point, _ in ring]
        self._owners = [name for _, name in ring]

    def owner(self, agent_id: str) -> str:
        if len(self.names) == 1:
            return self.names[0]
        index = bisect.bisect(self._points, _point(agent_id)) % len(self._points)
        return self._owners[index]


class ShardedManager:
    """One manager service as one or more shards, each called through its own ManagerClient."""

    def __init__(self, clients: Sequence[ManagerClient]) -> None:
        self.clients = list(clients)
        self.ring = ShardRing([client.name for client in clients])
        self._by_name = {client.name: client for client in clients}

    def for_agent(self, agent_id: str) -> ManagerClient:
        """The shard that holds `agent_id`'s data."""
        return self._by_name[self.ring.owner(agent_id)]

    async def close(self) -> None:
        for client in self.clients:
            await client.close()


def parse_named_addresses(values: Sequence[str], kind: str) -> list[tuple[str, str]]:
    """`--<kind> [NAME=]HOST:PORT` options -> (name, address); unnamed ones are kind, kind_2, kind_3, ..."""
    named = []
    for index, value in enumerate(values):
        name, _, address = value.rpartition("=")
        name = name or (kind if index == 0 else f"{kind}_{index + 1}")
        if not address or ":" not in address:
            raise ValueError(f"--{kind.replace('_', '-')} {value!r}: expected [NAME=]HOST:PORT")
        named.append((name, address))
    if len({name for name, _ in named}) != len(named):
        raise ValueError(f"--{kind.replace('_', '-')} names must differ: {[name for name, _ in named]}")
    return named


def sharded_manager(values: Sequence[str], kind: str, stub_class: type, cluster_secret: str,
                    batched: ServiceDescriptor | None = None) -> ShardedManager:
    """A ShardedManager from `--<kind>` options (unary calls on a Batched stream with `batched`, the service)."""
    return ShardedManager([ManagerClient(name, address, stub_class, cluster_secret, batched)
                           for name, address in parse_named_addresses(values, kind)])
