"""Generations a kernel suspended when it stopped gracefully (`aios down`), kept in Redis until their agents return.

A stopping kernel context-switches each running generation out of the LLM core, which writes its snapshot to Redis
(under the syscall id), and stores here what the next kernel needs to continue it: the request as the core first
got it (with the seed the kernel fixed) and the tokens and texts already streamed.
When the agent's SDK asks again (KernelGenerateRequest.resume_syscall_id), the next kernel takes the suspension
(once: a second ask finds nothing) and continues the generation from its snapshot, or by replaying the tokens when
the snapshot is gone. Both live SUSPENDED_TTL_S, as long as the cores keep snapshots by default.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, fields

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from aios.v1 import llm_core_pb2

log = logging.getLogger("aios.kernel.suspensions")

KEY_PREFIX = "aios:suspended:"
SUSPENDED_TTL_S = 600  # the LLM core's default --snapshot-ttl


@dataclass
class Suspension:
    syscall_id: str
    agent_id: str
    request: llm_core_pb2.GenerateRequest  # as first sent to the core
    token_ids: list[int]  # streamed before the stop, in order
    texts: list[str]  # the text each of those tokens' chunk carried
    prompt_tokens: int
    recoveries: int

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["request"] = base64.b64encode(self.request.SerializeToString()).decode()
        return json.dumps(data)

    @classmethod
    def from_json(cls, blob: bytes | str) -> "Suspension":
        data = json.loads(blob)
        data["request"] = llm_core_pb2.GenerateRequest.FromString(base64.b64decode(data["request"]))
        return cls(**data)


class SuspendedGenerations:
    def __init__(self, redis: aioredis.Redis, ttl_s: int = SUSPENDED_TTL_S) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    async def put(self, suspension: Suspension) -> bool:
        """Stores it; False (logged) when Redis is unreachable: its agent then continues it by replay."""
        try:
            await self.redis.set(KEY_PREFIX + suspension.syscall_id, suspension.to_json(), ex=self.ttl_s)
            return True
        except (RedisError, OSError) as exc:
            log.warning("could not keep suspended generation %s (%s); its agent will continue it by replay",
                        suspension.syscall_id, exc)
            return False

    async def take(self, syscall_id: str, agent_id: str) -> Suspension | None:
        """The agent's suspended generation `syscall_id`, removed so that only one caller continues it; None when
        there is none (never suspended, expired, taken already, or another agent's: that one stays)."""
        key = KEY_PREFIX + syscall_id
        try:
            blob = await self.redis.get(key)
            if blob is None:
                return None
            suspension = Suspension.from_json(blob)
            if suspension.agent_id != agent_id or not await self.redis.delete(key):
                return None
        except (RedisError, OSError) as exc:
            log.warning("could not read suspended generation %s (%s); continuing it by replay", syscall_id, exc)
            return None
        return suspension

    async def ids(self) -> list[str]:
        """Every suspended generation's syscall id (their snapshots must outlive a core reset)."""
        try:
            return [key.decode().removeprefix(KEY_PREFIX)
                    async for key in self.redis.scan_iter(match=KEY_PREFIX + "*", count=1000)]
        except (RedisError, OSError) as exc:
            log.warning("could not list suspended generations (%s)", exc)
            return []
