"""Who is calling: agents, their tokens and the operator, kept in Redis so every kernel replica and restart sees them.

An agent id names an agent; only a token proves one. A token is 256 random
bits; Redis keeps its SHA-256, never the token. The operator's token lives in a
0600 file that `aios up` writes; the kernel keeps only its hash too.

Redis layout:
- `aios:agents`  hash  agent id -> JSON of the agent (name, priority, weight, quota, revoked_at,
                                   token_hint, registered_by, token_sha256)
- `aios:tokens`  hash  SHA-256 of a live token -> agent id (a revoked token is deleted from it)
- `aios:agents:epoch`  counter of revocations and replaced tokens (EPOCH_KEY)

Checked tokens are cached, so checking one costs a hash and a dict lookup; a
revocation takes effect at once on the kernel that made it and within about
EPOCH_CHECK_S on any other kernel replica (see EPOCH_KEY).
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import secrets
import time
from dataclasses import asdict, astuple, dataclass, field, replace
from typing import Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.credentials import AGENT_TOKEN_PREFIX, Metadata, bearer_token, new_secret, same_secret, token_hash
from services.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated, Unavailable

log = logging.getLogger("aios.kernel.identity")

AGENTS_KEY = "aios:agents"
TOKENS_KEY = "aios:tokens"
MAX_NAME_CHARS = 64
MAX_PRIORITY = 10
MAX_WEIGHT = 100.0
T = TypeVar("T")
# Incremented with every revocation and every replaced token, in the same transaction. Each kernel reads it every
# EPOCH_CHECK_S and, when it moved, checks all the tokens it caches at once: a revocation ends a token on the kernel
# that made it at once and on every other within about EPOCH_CHECK_S, and an agent's steady calls never wait for Redis.
EPOCH_KEY = "aios:agents:epoch"
EPOCH_CHECK_S = 0.25
CHECK_CHUNK = 1000  # agents per Redis read when checking cached tokens
CACHE_PRUNE_AT = 10_000  # cached tokens before the idle ones are dropped
CACHE_IDLE_S = 300.0  # how long a cached token may go unused before it can be dropped
USE_RESOLUTION_S = 1.0  # a cached token's last use is noted to within this (not rewritten on every call)
# While Redis is unreachable, cached tokens are taken for this long after the last check of EPOCH_KEY (agents keep
# working through a Redis restart, and no revocation can happen meanwhile); a token not cached waits up to
# REDIS_WAIT_S for Redis to be back.
STALE_OK_S = 300.0
REDIS_WAIT_S = 5.0
REDIS_RETRY_S = 0.1
TOKEN_HINT_CHARS = len(AGENT_TOKEN_PREFIX) + 4


class Role(enum.Enum):
    OPERATOR = "operator"
    AGENT = "agent"


@dataclass(frozen=True)
class Quota:
    """An agent's limits; 0 means unlimited (in a request: the kernel's default)."""

    tokens_per_minute: int = 0
    concurrent_syscalls: int = 0
    tool_slots: int = 0

    def or_defaults(self, defaults: "Quota") -> "Quota":
        """Each unset field takes the default's value."""
        return Quota(*(mine or default for mine, default in zip(astuple(self), astuple(defaults))))


@dataclass(frozen=True)
class Agent:
    id: str
    name: str
    registered_at: float
    priority: int = 0
    weight: float = 1.0
    quota: Quota = field(default_factory=Quota)
    revoked_at: float = 0.0
    token_hint: str = ""
    registered_by: str = Role.OPERATOR.value
    token_sha256: str = ""

    @property
    def revoked(self) -> bool:
        return self.revoked_at > 0

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if k != "id"})

    @staticmethod
    def from_json(agent_id: str, raw: bytes | str) -> "Agent":
        data = json.loads(raw)
        data["quota"] = Quota(**data.get("quota", {}))
        return Agent(agent_id, **data)


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one kernel RPC."""

    role: Role
    agent: Agent | None = None

    @property
    def label(self) -> str:
        """How the audit log names it."""
        return self.agent.id if self.agent else self.role.value

    def as_agent(self) -> Agent:
        """The calling agent, for syscalls; the operator administers and makes none."""
        if self.agent is None:
            raise PermissionDenied(
                "the operator token administers AIOS and makes no syscalls; register an agent "
                "(`aios agent create NAME`) and call with its token"
            )
        return self.agent

    def require_operator(self, what: str) -> None:
        if self.role is not Role.OPERATOR:
            raise PermissionDenied(f"{what} needs the operator token ($AIOS_HOME/operator.token); agents cannot do it")


OPERATOR = Caller(Role.OPERATOR)


@dataclass(frozen=True)
class RegistrationPolicy:
    """Who may register and what an open registration may ask for."""

    # Anyone who reaches the kernel may register (a trusted single-user machine); else the operator only.
    open: bool = False
    # Ceilings of an open registration's priority and weight (an agent may ask for less, never more).
    open_max_priority: int = 0
    open_max_weight: float = 1.0
    # Limits of an agent registered without explicit ones.
    default_quota: Quota = field(default_factory=Quota)


def _holding(digest: str, agent_id: str, raw: bytes | None) -> Agent | None:
    """The agent of record `raw` if the token with hash `digest` is its current one and it is not revoked."""
    if raw is None:
        return None
    agent = Agent.from_json(agent_id, raw)
    return None if agent.revoked or agent.token_sha256 != digest else agent


class AgentRegistry:
    def __init__(self, redis: aioredis.Redis, operator_token: str, policy: RegistrationPolicy | None = None) -> None:
        self.redis = redis
        self.policy = policy or RegistrationPolicy()
        self._operator_sha256 = token_hash(operator_token)
        self._by_token: dict[str, tuple[Agent, float]] = {}  # token SHA-256 -> (agent, last used)
        self._pruned_at = 0.0
        self._epoch: bytes | None = None  # EPOCH_KEY's value the cache was last checked against
        self._checked_at = time.monotonic()  # when the watcher last read EPOCH_KEY (Redis reachable)
        # Bumped by every change this kernel makes and every change the watcher sees: a token looked up while it moved
        # is not cached, and a re-check it overlapped is not applied.
        self._generation = 0
        self._watcher: asyncio.Task | None = None  # started with the first cached token
        self._closed = False

    # ---- authentication ----------------------------------------------------------------

    async def authenticate(self, metadata: Metadata | None, anonymous_ok: bool = False) -> Caller | None:
        """The caller the call's bearer token proves; UNAUTHENTICATED if it proves none.

        With `anonymous_ok`, a call without any token returns None (open registration)."""
        token = bearer_token(metadata)
        if token is None:
            if anonymous_ok:
                return None
            raise Unauthenticated(
                "no credential: send `authorization: Bearer <token>` metadata with the agent's token "
                "(from RegisterAgent / `aios agent create`), or the operator token in $AIOS_HOME/operator.token"
            )
        digest = token_hash(token)
        if same_secret(digest, self._operator_sha256):
            return OPERATOR
        cached = self._by_token.get(digest)
        now = time.monotonic()
        if cached is not None and now - self._checked_at < STALE_OK_S:
            if now - cached[1] > USE_RESOLUTION_S:
                self._by_token[digest] = (cached[0], now)
            return Caller(Role.AGENT, cached[0])
        generation = self._generation
        agent = await self._agent_of_token(digest, agent_id=cached[0].id if cached else "")
        if agent is None:
            self._by_token.pop(digest, None)
            raise Unauthenticated("the token is unknown or revoked; ask the operator for a new one (`aios agent create`)")
        if self._generation == generation:  # else a revocation may have come in meanwhile: this call only
            self._remember(agent)
        return Caller(Role.AGENT, agent)

    async def _watch(self) -> None:
        """Reads EPOCH_KEY every EPOCH_CHECK_S; when a revocation or a new token (on any kernel) moved it, checks every
        cached token again in one read. One small read a few times a second, whatever the number of agents."""
        while not self._closed:
            try:
                epoch = await self.redis.get(EPOCH_KEY)
                moved = epoch != self._epoch
                if moved:
                    self._generation += 1
                if not moved or await self._check_cached():  # else checked again next time round
                    self._epoch, self._checked_at = epoch, time.monotonic()
            except (RedisError, OSError):
                pass  # Redis is away: cached tokens are taken for STALE_OK_S after the last check
            except Exception:  # noqa: BLE001 - a bug here must not end the checks: tokens would live on unchecked
                log.exception("checking cached tokens failed; trying again")
            await asyncio.sleep(EPOCH_CHECK_S)

    async def _check_cached(self) -> bool:
        """Checks every cached token against the agents' records; drops a revoked or replaced one. False (nothing
        applied) if a change of this kernel overlapped the read."""
        generation = self._generation
        cached = list(self._by_token.items())
        ids = sorted({agent.id for _, (agent, _) in cached})
        records: dict[str, bytes | None] = {}
        for first in range(0, len(ids), CHECK_CHUNK):
            chunk = ids[first:first + CHECK_CHUNK]
            records.update(zip(chunk, await self.redis.hmget(AGENTS_KEY, chunk)))
        if self._generation != generation:
            return False
        for digest, (agent, used) in cached:
            current = _holding(digest, agent.id, records[agent.id])
            if current is None:
                self._by_token.pop(digest, None)
            elif digest in self._by_token:
                self._by_token[digest] = (current, used)
        return True

    async def _agent_of_token(self, digest: str, agent_id: str = "") -> Agent | None:
        """The agent a token hash belongs to, if it is its current token and the agent is not revoked. With the
        `agent_id` it belonged to before (a cached one), one read: a token never moves to another agent, and the
        agent's record says whether it is still the current token."""
        async def lookup() -> tuple[bytes | None, bytes | None]:
            known = agent_id.encode() if agent_id else await self.redis.hget(TOKENS_KEY, digest)
            return known, None if known is None else await self.redis.hget(AGENTS_KEY, known)

        known, raw = await self._redis("check the token", lookup)
        return None if known is None else _holding(digest, known.decode(), raw)

    async def close(self) -> None:
        self._closed = True  # should a cancellation be lost (redis-py turns one into a timeout), the watcher ends anyway
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait([self._watcher], timeout=4 * EPOCH_CHECK_S)

    # ---- administration --------------------------------------------------------------

    async def register(
        self, caller: Caller | None, name: str, priority: int = 0, weight: float = 0.0, quota: Quota = Quota()
    ) -> tuple[Agent, str]:
        """A new agent and its token. `caller` None is an open registration; `weight` 0 means 1."""
        if caller is None:
            if not self.policy.open:
                raise Unauthenticated(
                    "registering an agent needs the operator token ($AIOS_HOME/operator.token, or ask the operator "
                    "to run `aios agent create NAME` and hand you the agent's token)"
                )
        else:
            caller.require_operator("registering an agent")
        name = name.strip()
        if not 1 <= len(name) <= MAX_NAME_CHARS:
            raise InvalidArgument(f"agent name must be 1-{MAX_NAME_CHARS} characters")
        if not 0 <= priority <= MAX_PRIORITY:
            raise InvalidArgument(f"priority is {priority}; it must be 0 (default) to {MAX_PRIORITY}")
        if not (weight == weight and 0.0 <= weight <= MAX_WEIGHT):  # weight == weight refuses NaN
            raise InvalidArgument(f"weight is {weight}; it must be in (0, {MAX_WEIGHT:g}], or 0 for the default 1")
        weight = weight or 1.0
        if caller is None:  # an open registration asks; the ceilings answer
            if priority > self.policy.open_max_priority or weight > self.policy.open_max_weight:
                raise PermissionDenied(
                    f"an open registration may ask for priority <= {self.policy.open_max_priority} and weight <= "
                    f"{self.policy.open_max_weight:g}; the operator grants more (`aios agent create --priority --weight`)"
                )
            if quota != Quota():
                raise PermissionDenied("only the operator sets an agent's quota")
        agent = Agent(
            f"agt-{secrets.token_hex(6)}", name, time.time(), priority, weight, quota.or_defaults(self.policy.default_quota),
            registered_by=Role.OPERATOR.value if caller else "open",
        )
        return await self._with_new_token(agent)

    async def issue_token(self, agent_id: str) -> tuple[Agent, str]:
        """A new token for an agent; its older token stops working (and a revoked agent is active again)."""
        agent = await self.get(agent_id)
        return await self._with_new_token(replace(agent, revoked_at=0.0), old_sha256=agent.token_sha256)

    async def revoke(self, agent_id: str) -> Agent:
        agent = await self.get(agent_id)
        revoked = replace(agent, revoked_at=agent.revoked_at or time.time(), token_sha256="")
        async def write() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(AGENTS_KEY, agent.id, revoked.to_json())
                if agent.token_sha256:
                    pipe.hdel(TOKENS_KEY, agent.token_sha256)
                pipe.incr(EPOCH_KEY)  # every kernel checks its cached tokens again
                await pipe.execute()

        await self._change("revoke the agent", write, ends_a_token=True)
        self._by_token.pop(agent.token_sha256, None)
        return revoked

    async def _with_new_token(self, agent: Agent, old_sha256: str = "") -> tuple[Agent, str]:
        token = new_secret(AGENT_TOKEN_PREFIX)
        agent = replace(agent, token_sha256=token_hash(token), token_hint=token[:TOKEN_HINT_CHARS])
        async def write() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(AGENTS_KEY, agent.id, agent.to_json())
                pipe.hset(TOKENS_KEY, agent.token_sha256, agent.id)
                if old_sha256:
                    pipe.hdel(TOKENS_KEY, old_sha256)
                    pipe.incr(EPOCH_KEY)  # the old token ends on every kernel
                await pipe.execute()

        await self._change("record the agent", write, ends_a_token=bool(old_sha256))
        self._by_token.pop(old_sha256, None)
        self._remember(agent)  # its first call skips Redis
        return agent, token

    async def _change(self, what: str, write: Callable[[], Awaitable[None]], ends_a_token: bool) -> None:
        """A write to agents or tokens. One that `ends_a_token` (a revocation, a replaced token): a lookup or a check
        of cached tokens that overlaps it is not applied. (A new agent's token ends none: registering many agents at
        once leaves the cache alone.)"""
        self._generation += ends_a_token
        await self._redis(what, write)
        self._generation += ends_a_token

    def _remember(self, agent: Agent) -> None:
        """Caches a token's agent; entries unused for CACHE_IDLE_S go, so that the cache holds about the agents active
        lately, not every agent ever registered."""
        if self._watcher is None or self._watcher.done():  # no token is cached unwatched
            self._watcher = asyncio.create_task(self._watch(), name="token-revocations")
        now = time.monotonic()
        if len(self._by_token) >= CACHE_PRUNE_AT and now >= self._pruned_at + EPOCH_CHECK_S:  # not on every miss
            self._by_token = {k: v for k, v in self._by_token.items() if v[1] + CACHE_IDLE_S > now}
            self._pruned_at = now
        self._by_token[agent.token_sha256] = (agent, now)

    @staticmethod
    async def _redis(what: str, operation: Callable[[], Awaitable[T]], wait_s: float = REDIS_WAIT_S) -> T:
        """`operation()`, tried again while Redis cannot be reached (it restarts within a second under `aios up`,
        and answers LOADING while it reads its append-only file) for up to `wait_s`; then UNAVAILABLE."""
        give_up = time.monotonic() + wait_s
        while True:
            try:
                return await operation()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if time.monotonic() >= give_up:
                    raise Unavailable(f"cannot {what}: Redis is unreachable ({exc})") from None
            except RedisError as exc:  # Redis answered, but refused (out of memory, read-only): no use waiting
                raise Unavailable(f"cannot {what}: Redis refused ({exc})") from None
            await asyncio.sleep(REDIS_RETRY_S)  # polling: a restarting Redis announces nothing

    # ---- lookups -----------------------------------------------------------------------

    async def get(self, agent_id: str) -> Agent:
        if not agent_id:
            raise InvalidArgument("agent_id is required")
        raw = await self._redis("look up the agent", lambda: self.redis.hget(AGENTS_KEY, agent_id))
        if raw is None:
            raise NotFound(f"no agent {agent_id!r} is registered")
        return Agent.from_json(agent_id, raw)

    async def all(self, include_revoked: bool = False) -> list[Agent]:
        raw = await self._redis("list agents", lambda: self.redis.hgetall(AGENTS_KEY))
        agents = [Agent.from_json(k.decode(), v) for k, v in raw.items()]
        return sorted((a for a in agents if include_revoked or not a.revoked), key=lambda a: a.registered_at)
