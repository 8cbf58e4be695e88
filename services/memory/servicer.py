"""aios.v1.Memory over gRPC: translates messages to MemoryStore calls.

Store calls run on the store's group-commit thread (services/durable_sqlite.py): the event loop keeps serving
while a group of writes from many agents commits with one fsync.
"""

from __future__ import annotations

from aios.v1 import memory_pb2, memory_pb2_grpc
from services.memory.database import MemoryEntry
from services.memory.core import MemoryStore, entry_id


def entry_to_proto(entry: MemoryEntry) -> memory_pb2.MemoryEntry:
    return memory_pb2.MemoryEntry(
        id=entry_id(entry),
        agent_id=entry.agent_id,
        text=entry.text,
        metadata=entry.metadata,
        created_at=entry.created_at,
        updated_at=entry.updated_at,
        role=entry.role,
    )


class MemoryServicer(memory_pb2_grpc.MemoryServicer):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def Add(self, request, context):
        entry = await self.store.commits.run(self.store.add, request.agent_id, request.text, dict(request.metadata), request.role,
                                        request.request_id)
        return entry_to_proto(entry)

    async def Get(self, request, context):
        return entry_to_proto(await self.store.commits.run(self.store.get, request.agent_id, request.id))

    async def Update(self, request, context):
        entry = await self.store.commits.run(
            self.store.update, request.agent_id, request.id, request.text, dict(request.metadata), list(request.remove_metadata)
        )
        return entry_to_proto(entry)

    async def List(self, request, context):
        entries, token = await self.store.commits.run(self.store.list, request.agent_id, request.page_size, request.page_token)
        return memory_pb2.MemoryListResponse(entries=[entry_to_proto(e) for e in entries], next_page_token=token)

    async def Delete(self, request, context):
        entry = await self.store.commits.run(self.store.delete, request.agent_id, request.id)
        return memory_pb2.MemoryDeleteResponse(id=entry_id(entry))

    async def Search(self, request, context):
        hits = await self.store.commits.run(
            self.store.search, request.agent_id, request.query, request.limit or 10, dict(request.metadata)
        )
        return memory_pb2.MemorySearchResponse(
            hits=[memory_pb2.MemorySearchHit(entry=entry_to_proto(h.entry), score=h.score, snippet=h.snippet) for h in hits]
        )

    async def RecentTurns(self, request, context):
        entries = await self.store.commits.run(self.store.recent_turns, request.agent_id, request.limit)
        return memory_pb2.MemoryListResponse(entries=[entry_to_proto(e) for e in entries])

    async def Stats(self, request, context):
        return memory_pb2.MemoryStatsResponse(**await self.store.commits.run(self.store.stats))
