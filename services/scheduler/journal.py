"""Syscall records in Redis, so that an agent can still read them after the kernel that made them died.

The kernel keeps its records in memory (services/scheduler/syscalls.py) and
this journal copies every new and finished one to Redis in the background: one
pipeline every FLUSH_EVERY_S, each record under `aios:syscall:<id>` for
RECORD_TTL_S. A kernel killed with -9 loses at most the last interval's changes;
Redis itself keeps them as its append-only file does (fsync every second). A
record that was still queued or running when its kernel died reads back as
FAILED/UNAVAILABLE, saying so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import fields
from operator import attrgetter

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.scheduler.syscalls import Resource, SyscallRecord, SyscallState

log = logging.getLogger("aios.kernel.journal")

KEY_PREFIX = "aios:syscall:"
RECORD_TTL_S = 7 * 24 * 3600
FLUSH_EVERY_S = 0.1
MAX_PENDING = 100_000  # records waiting for Redis while it is down; beyond, the oldest changes are dropped
WRITE_CHUNK = 1000  # records per Redis command
# One command writes many records: redis-py spends ~45 us of the kernel's CPU per command of a pipeline, ~5 us per
# record of one script call.
WRITE_RECORDS = "for i, key in ipairs(KEYS) do redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1]) end return #KEYS"
# What a record keeps in Redis: its identity, outcome, counts and times (not the scheduler's working state).
PERSISTED = ("id", "agent_id", "kind", "resource", "priority", "weight", "state", "created_at", "started_at",
             "finished_at", "error", "error_code", "tokens_in", "tokens_out", "queued_s", "running_s",
             "preempted_s", "preemptions", "recoveries", "retries", "core", "migrations")
# Fields persisted since, after the kernel id in the list (a list from before they were lacks them).
ADDED = ("trace_id",)
assert set(PERSISTED) | set(ADDED) <= {f.name for f in fields(SyscallRecord)}
_record_fields = attrgetter(*PERSISTED, *ADDED)  # one C call for every field (a record encoded in 6.1 us, not 8.2)


class RecordJournal:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.kernel_id = secrets.token_hex(8)  # tells this kernel's unfinished records from a dead kernel's
        self._pending: dict[str, SyscallRecord] = {}
        self._task: asyncio.Task | None = None
        self._write = redis.register_script(WRITE_RECORDS)

    def changed(self, record: SyscallRecord) -> None:
        """Queues the record's current state for the next flush (called on creation and on finishing)."""
        self._pending.pop(record.id, None)  # re-inserted last: the oldest changes are the first to go
        self._pending[record.id] = record
        while len(self._pending) > MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="syscall-journal")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_EVERY_S)
            await self.flush()

    async def flush(self) -> None:
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        records = list(batch.values())
        try:
            for first in range(0, len(records), WRITE_CHUNK):
                chunk = records[first:first + WRITE_CHUNK]
                await self._write(keys=[KEY_PREFIX + record.id for record in chunk],
                                  args=[RECORD_TTL_S, *(json.dumps(self._as_json(record)) for record in chunk)])
        except (RedisError, OSError) as exc:
            log.warning("syscall records not written to Redis (%s); retrying", exc)
            for record in batch.values():
                self._pending.setdefault(record.id, record)

    def _as_json(self, record: SyscallRecord) -> list:
        """The record's PERSISTED fields in order, then this kernel's id, then the ADDED fields: a list, not an object, since encoding the
        names again with every record was a tenth of the kernel's CPU at a thousand syscalls a second."""
        row = list(_record_fields(record))
        row.insert(len(PERSISTED), self.kernel_id)
        return row

    async def load(self, syscall_id: str) -> SyscallRecord | None:
        """A record this kernel no longer holds in memory (an earlier kernel's, or an old one); None if unknown."""
        try:
            blob = await self.redis.get(KEY_PREFIX + syscall_id)
        except (RedisError, OSError):
            return None
        if blob is None:
            return None
        data = json.loads(blob)
        if isinstance(data, list):
            data = dict(zip((*PERSISTED, "kernel", *ADDED), data))
        kernel = data.pop("kernel", "")  # (an object: a record an older kernel wrote)
        record = SyscallRecord(**{**data, "resource": Resource(data["resource"]), "state": SyscallState(data["state"])})
        if not record.finished and kernel != self.kernel_id:
            record.state, record.error_code = SyscallState.FAILED, "UNAVAILABLE"
            record.error = ("the kernel stopped while this syscall ran; the SDKs repeat it by themselves "
                            "(writes with their request id happen once)")
        return record
