"""The LLM cores behind the kernel: one view of every core's slots, and which core takes each generation.

Plain Python, no sockets: the kernel tells the router where generations start,
stop and park, and asks it where the next one goes. Cache affinity weighed
against load, as llm-d's scorers do: the core that holds the generation (parked
there, its KV resident: moving it costs a snapshot round trip); else the core
that last served the agent (its conversation, hundreds of tokens, is in that
core's prefix cache) unless it is much busier than the least loaded; else the
core that last served the same prompt opening (a shared system prompt: cheap to
prefill again, so only between equally loaded cores); else the least loaded.
Only SERVING cores with a free slot, unless none has one (then the least loaded
serving core queues it). A DRAINING or DOWN core takes nothing new.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from services.errors import NotFound

AFFINITY_ENTRIES = 65_536  # agents and prompt openings remembered per map (least recently used dropped first)
PREFIX_CHARS = 512  # how much of a prompt's opening names its shared prefix
# How much busier (in running generations per slot) the agent's own core may be than the least loaded one and
# still get its next generation: prefilling a conversation again costs more than a somewhat fuller batch.
AGENT_SLACK = 0.25


class CoreState(enum.Enum):
    SERVING = "serving"  # takes new generations
    DRAINING = "draining"  # an operator drains it (`aios drain`): takes nothing new; its generations move away
    DOWN = "down"  # its stream broke and its health check failed: takes nothing until it answers again


@dataclass(eq=False)
class LLMCoreReplica:
    """One LLM core process as the kernel sees it."""

    name: str
    address: str
    slots: int  # generations it decodes at once
    client: Any = None  # the ManagerClient that calls it (None in tests of the routing alone)
    state: CoreState = CoreState.SERVING
    running: set[str] = field(default_factory=set)  # syscall ids of the generations streaming from it
    parked: set[str] = field(default_factory=set)  # syscall ids preempted here whose KV it still holds
    dispatched: int = 0  # streams started on it (first runs, resumes and replays)
    migrated_in: int = 0  # generations that continued here after leaving another core
    migrated_out: int = 0
    migration_seconds: float = 0.0  # summed over migrated_in: from the move's start to the first token here

    @property
    def free(self) -> int:
        return self.slots - len(self.running)

    @property
    def load(self) -> float:
        return len(self.running) / self.slots


def prefix_key(prompt: str, first_message: str) -> str:
    """What names a generation's shared prefix: the opening of its first message (the system prompt), or of its
    raw prompt."""
    return (first_message or prompt)[:PREFIX_CHARS]


class CoreRouter:
    def __init__(self, replicas: list[LLMCoreReplica]) -> None:
        if not replicas:
            raise ValueError("at least one LLM core")
        names = [r.name for r in replicas]
        if len(set(names)) != len(names):
            raise ValueError(f"LLM core names must differ: {names}")
        self.replicas = replicas
        self._by_name = {r.name: r for r in replicas}
        self._agent_core: OrderedDict[str, str] = OrderedDict()
        self._prefix_core: OrderedDict[str, str] = OrderedDict()
        self.on_capacity: Callable[[int], None] = lambda capacity: None  # the LLM queue's resize

    @property
    def capacity(self) -> int:
        """Slots of the cores that take work: how many generations the kernel dispatches at once."""
        return sum(r.slots for r in self.replicas if r.state is CoreState.SERVING)

    def get(self, name: str) -> LLMCoreReplica:
        """A core by its name or its address."""
        for replica in self.replicas:
            if name in (replica.name, replica.address):
                return replica
        raise NotFound(f"no LLM core {name!r}; the kernel has {', '.join(r.name for r in self.replicas)} "
                       "(`aios status` lists them)")

    def holding(self, syscall_id: str) -> LLMCoreReplica | None:
        """The core a generation streams from or is parked on."""
        return next((r for r in self.replicas if syscall_id in r.running or syscall_id in r.parked), None)

    def has_room(self) -> bool:
        return any(r.state is CoreState.SERVING and r.free > 0 for r in self.replicas)

    def pick(self, agent_id: str, prefix: str, holder: LLMCoreReplica | None = None) -> LLMCoreReplica | None:
        """Where a generation goes next (`holder`: the core it was preempted on); None while no core serves."""
        serving = [r for r in self.replicas if r.state is CoreState.SERVING]
        if not serving:
            return None
        candidates = [r for r in serving if r.free > 0] or serving
        least = min(r.load for r in candidates)
        for name, slack in ((holder.name if holder else None, 1.0), (self._agent_core.get(agent_id), AGENT_SLACK),
                            (self._prefix_core.get(prefix), 0.0)):
            replica = self._by_name.get(name) if name else None
            if replica in candidates and replica.load <= least + slack:
                return replica
        return min(candidates, key=lambda r: (r.load, r.dispatched))

    def started(self, replica: LLMCoreReplica, syscall_id: str, agent_id: str, prefix: str) -> None:
        """A generation's stream opened on `replica`."""
        replica.running.add(syscall_id)
        replica.parked.discard(syscall_id)
        replica.dispatched += 1
        for affinity, key in ((self._agent_core, agent_id), (self._prefix_core, prefix)):
            affinity[key] = replica.name
            affinity.move_to_end(key)
            if len(affinity) > AFFINITY_ENTRIES:
                affinity.popitem(last=False)

    def stopped(self, replica: LLMCoreReplica, syscall_id: str, parked: bool) -> None:
        """Its stream ended; `parked`: preempted with its KV left resident on `replica`."""
        replica.running.discard(syscall_id)
        if parked:
            replica.parked.add(syscall_id)

    def moved(self, source: LLMCoreReplica, target: LLMCoreReplica, syscall_id: str) -> None:
        """A generation left `source` (its snapshot is in Redis) to continue on `target`."""
        source.parked.discard(syscall_id)
        source.migrated_out += 1
        target.migrated_in += 1

    def set_state(self, replica: LLMCoreReplica, state: CoreState) -> None:
        if replica.state is not state:
            replica.state = state
            self.on_capacity(self.capacity)

