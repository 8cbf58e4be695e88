"""Context snapshots: a preempted generation as one binary value in Redis.

A snapshot holds everything needed to continue a generation on any LLM core
that shares the Redis: the llama.cpp sequence state (the KV cache of that one
sequence), the tokens so far, the sampling parameters and the sampler's RNG
state. It is written lazily (only when the slot is needed) by a background
writer so that the decode loop never waits on Redis.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from redis.exceptions import RedisError

from services.errors import FailedPrecondition, NotFound, PermissionDenied, Unavailable
from services.llm_core.sampling import SamplingConfig

log = logging.getLogger("aios.llm_core.snapshot")

MAGIC = b"AIOSSNP1"
KEY_PREFIX = "aios:snap:"
_HEADER = struct.Struct("<8sI")


def snapshot_key(request_id: str) -> str:
    return KEY_PREFIX + request_id


@dataclass(frozen=True)
class ContextShape:
    """What a restoring context must match: llama.cpp refuses state from another stream layout."""

    model: str
    n_vocab: int
    n_seq_max: int
    kv_unified: bool


@dataclass
class Snapshot:
    request_id: str
    agent_id: str
    shape: ContextShape
    prompt: list[int]
    generated: list[int]
    n_past: int
    next_token: int | None
    sampling: SamplingConfig
    rng_state: dict[str, Any]
    prefix_reused: int
    kv: bytes | bytearray | memoryview = b""
    created_at: float = field(default_factory=time.time)

    def header(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "agent_id": self.agent_id,
            "shape": asdict(self.shape),
            "prompt": self.prompt,
            "generated": self.generated,
            "n_past": self.n_past,
            "next_token": self.next_token,
            "sampling": {**asdict(self.sampling), "stop": list(self.sampling.stop),
                         "turn_end": list(self.sampling.turn_end)},
            "rng_state": self.rng_state,
            "prefix_reused": self.prefix_reused,
            "created_at": self.created_at,
        }

    def to_bytes(self) -> bytes:
        head = json.dumps(self.header(), separators=(",", ":")).encode()
        return b"".join((_HEADER.pack(MAGIC, len(head)), head, self.kv))

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Snapshot":
        magic, n = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise FailedPrecondition("the stored value is not an AIOS snapshot (bad magic)")
        h = json.loads(blob[_HEADER.size : _HEADER.size + n])
        sampling = h["sampling"]
        return cls(
            request_id=h["request_id"],
            agent_id=h["agent_id"],
            shape=ContextShape(**h["shape"]),
            prompt=h["prompt"],
            generated=h["generated"],
            n_past=h["n_past"],
            next_token=h["next_token"],
            sampling=SamplingConfig(**{**sampling, "stop": tuple(sampling["stop"]),
                                       "turn_end": tuple(sampling.get("turn_end", ()))}),
            rng_state=h["rng_state"],
            prefix_reused=h["prefix_reused"],
            kv=memoryview(blob)[_HEADER.size + n :],
            created_at=h["created_at"],
        )

    @property
    def size(self) -> int:
        return len(self.kv)


class KvSnapshotStore:
    """Snapshots in Redis (one key per generation, with a TTL), written in the background.

    Until a snapshot is written, and if Redis refuses it, it is kept in this
    process (up to `local_limit_bytes`), so a resume on the same core never
    depends on Redis.
    """

    def __init__(self, url: str, ttl_s: float = 600.0, local_limit_bytes: int = 1 << 30) -> None:
        self.redis = redis.Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self.ttl_ms = int(ttl_s * 1000)
        self.local_limit_bytes = local_limit_bytes
        self._local: OrderedDict[str, Snapshot] = OrderedDict()
        self._local_bytes = 0
        self._lock = threading.Lock()
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshot-writer")
        self.saved = 0
        self.saved_bytes = 0

    # ---- writing (from the engine thread) -----------------------------------------

    def put(self, snapshot: Snapshot) -> Future:
        """Keeps the snapshot locally and queues its write to Redis; the future completes once written (or refused)."""
        with self._lock:
            self._keep_locked(snapshot)
        return self._writer.submit(self._write, snapshot)

    def _keep_locked(self, snapshot: Snapshot) -> None:
        old = self._local.pop(snapshot.request_id, None)
        if old is not None:
            self._local_bytes -= old.size
        self._local[snapshot.request_id] = snapshot
        self._local_bytes += snapshot.size
        while self._local_bytes > self.local_limit_bytes and len(self._local) > 1:
            _, dropped = self._local.popitem(last=False)
            self._local_bytes -= dropped.size
            log.warning("dropped local copy of snapshot %s (local limit reached)", dropped.request_id)

    def _write(self, snapshot: Snapshot) -> bool:
        """Whether Redis took it (else it stays local: only this core can resume it)."""
        blob = snapshot.to_bytes()
        try:
            self.redis.set(snapshot_key(snapshot.request_id), blob, px=self.ttl_ms)
        except (RedisError, OSError) as exc:
            log.warning("snapshot %s stays local: Redis refused it (%s)", snapshot.request_id, exc)
            return False
        with self._lock:
            self.saved += 1
            self.saved_bytes += len(blob)
            if self._local.get(snapshot.request_id) is snapshot:
                del self._local[snapshot.request_id]
                self._local_bytes -= snapshot.size
        return True

    def flush(self) -> None:
        """Waits until every queued write has been attempted."""
        self._writer.submit(lambda: None).result()

    # ---- reading and forgetting (any thread) ---------------------------------------

    def take(self, request_id: str, agent_id: str) -> Snapshot:
        """The snapshot to resume, checked for ownership; NOT_FOUND once expired or discarded."""
        with self._lock:
            snapshot = self._local.get(request_id)
        if snapshot is None:
            try:
                blob = self.redis.get(snapshot_key(request_id))
            except (RedisError, OSError) as exc:
                raise Unavailable(f"cannot load snapshot {request_id!r}: Redis is unreachable ({exc})") from None
            if blob is None:
                raise NotFound(
                    f"no snapshot for generation {request_id!r}: it finished, was discarded, or expired "
                    f"(snapshots live {self.ttl_ms // 1000} s)"
                )
            snapshot = Snapshot.from_bytes(blob)
        if snapshot.agent_id != agent_id:
            raise PermissionDenied(f"generation {request_id!r} belongs to another agent")
        return snapshot

    def forget(self, request_id: str) -> bool:
        """Drops the local copy and the Redis key (after any queued write of it)."""
        self.flush()
        with self._lock:
            local = self._local.pop(request_id, None)
            if local is not None:
                self._local_bytes -= local.size
        try:
            removed = bool(self.redis.delete(snapshot_key(request_id)))
        except (RedisError, OSError):
            removed = False
        return removed or local is not None

    def forget_all(self, keep: set[str] = frozenset()) -> int:
        """Drops every snapshot, local and in Redis, but those of the request ids in `keep`; returns how many."""
        self.flush()
        with self._lock:
            local = set(self._local) - keep
            for request_id in local:
                self._local_bytes -= self._local.pop(request_id).size
        try:
            kept = {snapshot_key(request_id).encode() for request_id in keep}
            keys = [k for k in self.redis.scan_iter(match=KEY_PREFIX + "*", count=1000) if k not in kept]
            if keys:
                self.redis.delete(*keys)
        except (RedisError, OSError) as exc:
            log.warning("could not delete the snapshots in Redis (%s); they expire on their own", exc)
            keys = []
        return len(local | {k.decode().removeprefix(KEY_PREFIX) for k in keys})

    def count_in_redis(self) -> int:
        try:
            return sum(1 for _ in self.redis.scan_iter(match=KEY_PREFIX + "*", count=1000))
        except (RedisError, OSError):
            return 0

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self.redis.close()
