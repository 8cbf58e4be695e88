"""aios.v1.Storage over gRPC: translates messages to RecordStore calls.

SQLite commits fsync, so calls run in a worker thread to keep the event loop free.
"""

from __future__ import annotations

import asyncio

from aios.v1 import storage_pb2, storage_pb2_grpc
from services.storage.core import RecordInfo, RecordStore


def info_to_proto(info: RecordInfo) -> storage_pb2.StorageRecordInfo:
    return storage_pb2.StorageRecordInfo(
        key=info.key, size=info.size, metadata=info.metadata, updated_at=info.updated_at
    )


class StorageServicer(storage_pb2_grpc.StorageServicer):
    def __init__(self, store: RecordStore) -> None:
        self.store = store

    async def Write(self, request, context):
        info = await asyncio.to_thread(
            self.store.write, request.agent_id, request.key, request.data, dict(request.metadata)
        )
        return info_to_proto(info)

    async def Read(self, request, context):
        info, data = await asyncio.to_thread(self.store.read, request.agent_id, request.key)
        return storage_pb2.StorageRecord(info=info_to_proto(info), data=data)

    async def List(self, request, context):
        infos = await asyncio.to_thread(self.store.list, request.agent_id, request.prefix)
        return storage_pb2.StorageListResponse(records=[info_to_proto(i) for i in infos])

    async def Delete(self, request, context):
        key = await asyncio.to_thread(self.store.delete, request.agent_id, request.key)
        return storage_pb2.StorageDeleteResponse(key=key)
