"""aios.v1.Memory over gRPC: translates messages to MemoryStore calls."""

from __future__ import annotations

from aios.v1 import memory_pb2, memory_pb2_grpc
from services.memory.core import MemoryEntry, MemoryStore


def entry_to_proto(entry: MemoryEntry) -> memory_pb2.MemoryEntry:
    return memory_pb2.MemoryEntry(
        id=entry.id,
        agent_id=entry.agent_id,
        text=entry.text,
        metadata=entry.metadata,
        created_at=entry.created_at,
        updated_at=entry.updated_at,
    )


class MemoryServicer(memory_pb2_grpc.MemoryServicer):
    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    async def Add(self, request, context):
        return entry_to_proto(self.store.add(request.agent_id, request.text, dict(request.metadata)))

    async def Get(self, request, context):
        return entry_to_proto(self.store.get(request.agent_id, request.id))

    async def List(self, request, context):
        entries, token = self.store.list(request.agent_id, request.page_size, request.page_token)
        return memory_pb2.MemoryListResponse(entries=[entry_to_proto(e) for e in entries], next_page_token=token)

    async def Delete(self, request, context):
        return memory_pb2.MemoryDeleteResponse(id=self.store.delete(request.agent_id, request.id).id)

    async def Stats(self, request, context):
        return memory_pb2.MemoryStatsResponse(**self.store.stats())
