"""aios.v1.Storage over gRPC: translates messages to RecordStore calls.

Store calls run on the store's group-commit thread (services/durable_sqlite.py): the event loop keeps serving
while a group of writes commits with one fsync.
"""

from __future__ import annotations

from aios.v1 import storage_pb2, storage_pb2_grpc
from services.errors import require
from services.storage.core import Access, Grant, RecordInfo, RecordStore


def info_to_proto(info: RecordInfo) -> storage_pb2.StorageRecordInfo:
    return storage_pb2.StorageRecordInfo(
        key=info.key, size=info.size, metadata=info.metadata, updated_at=info.updated_at, version=info.version,
        deleted=info.deleted, restored_from=info.restored_from, owner_agent_id=info.owner,
    )


def grant_to_proto(grant: Grant) -> storage_pb2.StorageGrant:
    return storage_pb2.StorageGrant(grantee_agent_id=grant.grantee, key=grant.key, prefix=grant.prefix,
                                    access=int(grant.access), owner_agent_id=grant.owner)


class StorageServicer(storage_pb2_grpc.StorageServicer):
    def __init__(self, store: RecordStore) -> None:
        self.store = store

    async def Write(self, request, context):
        info = await self.store.commits.run(
            self.store.write, request.agent_id, request.key, request.data, dict(request.metadata), request.owner_agent_id,
            request.request_id,
        )
        return info_to_proto(info)

    async def Read(self, request, context):
        info, data = await self.store.commits.run(
            self.store.read, request.agent_id, request.key, request.version, request.owner_agent_id,
            request.offset, request.length,
        )
        return storage_pb2.StorageRecord(info=info_to_proto(info), data=data)

    async def List(self, request, context):
        infos = await self.store.commits.run(self.store.list, request.agent_id, request.prefix)
        return storage_pb2.StorageListResponse(records=[info_to_proto(i) for i in infos])

    async def Delete(self, request, context):
        info = await self.store.commits.run(self.store.delete, request.agent_id, request.key, request.purge, request.owner_agent_id,
                                       request.request_id)
        return storage_pb2.StorageDeleteResponse(key=info.key, version=info.version)

    async def History(self, request, context):
        infos = await self.store.commits.run(self.store.history, request.agent_id, request.key, request.owner_agent_id)
        return storage_pb2.StorageListResponse(records=[info_to_proto(i) for i in infos])

    async def Rollback(self, request, context):
        info = await self.store.commits.run(
            self.store.rollback, request.agent_id, request.key, request.version, request.owner_agent_id, request.request_id
        )
        return info_to_proto(info)

    async def Search(self, request, context):
        hits = await self.store.commits.run(
            self.store.search, request.agent_id, request.query, request.limit or 10, request.prefix, dict(request.metadata)
        )
        return storage_pb2.StorageSearchResponse(
            hits=[storage_pb2.StorageSearchHit(info=info_to_proto(h.info), score=h.score, snippet=h.snippet) for h in hits]
        )

    async def Grant(self, request, context):
        require(request.access in (0, *Access), f"access {request.access} is not a GrantAccess (READ or READ_WRITE)")
        access = Access(request.access or Access.READ)
        grant = await self.store.commits.run(
            self.store.grant, request.agent_id, request.grantee_agent_id, request.key, request.prefix, access
        )
        return grant_to_proto(grant)

    async def Revoke(self, request, context):
        grant = await self.store.commits.run(self.store.revoke, request.agent_id, request.grantee_agent_id, request.key, request.prefix)
        return grant_to_proto(grant)

    async def ListGrants(self, request, context):
        given, received = await self.store.commits.run(self.store.grants, request.agent_id)
        return storage_pb2.StorageListGrantsResponse(
            grants=[grant_to_proto(g) for g in given], received=[grant_to_proto(g) for g in received]
        )

    async def Usage(self, request, context):
        usage = await self.store.commits.run(self.store.usage, request.agent_id)
        return storage_pb2.StorageUsage(
            bytes=usage.bytes, records=usage.records, quota_bytes=usage.quota_bytes, quota_records=usage.quota_records
        )
