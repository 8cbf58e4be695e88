"""aios.v1.LLMCore over gRPC: bridges the engine thread's events to a response stream."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from aios.v1 import llm_core_pb2, llm_core_pb2_grpc
from services import tracing
from services.errors import InvalidArgument
from services.llm_core.core import GenerationRequest, LLMCore
from services.llm_core.engine import (
    Delivery,
    ErrorEvent,
    Sequence,
    Event,
    FinishEvent,
    FinishReason,
    PreemptedEvent,
    TokenEvent,
)
from services.llm_core.sampling import SamplingConfig

FINISH_REASONS = {
    FinishReason.STOP: llm_core_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_core_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP_STRING: llm_core_pb2.FINISH_REASON_STOP_STRING,
    FinishReason.CONTEXT: llm_core_pb2.FINISH_REASON_CONTEXT,
}


def request_from_proto(request: llm_core_pb2.GenerateRequest) -> GenerationRequest:
    s = request.sampling
    return GenerationRequest(
        prompt=request.prompt,
        messages=[(m.role, m.content) for m in request.messages],
        sampling=SamplingConfig.checked(
            s.max_tokens,
            s.temperature,
            s.top_p,
            s.top_k,
            s.seed if s.HasField("seed") else None,
            list(s.stop),
            s.ignore_eos,
            s.json_schema,
        ),
        request_id=request.syscall_id,
        agent_id=request.agent_id,
        replay=tuple(request.replay_token_ids),
        replay_in_batch=request.replay_in_batch,
    )


def chunk_for(event: Event) -> llm_core_pb2.GenerateChunk:
    if isinstance(event, TokenEvent):
        return llm_core_pb2.GenerateChunk(
            text=event.text, token_id=event.token_id, completion_tokens=event.completion_tokens, slot=event.slot
        )
    if isinstance(event, PreemptedEvent):
        return llm_core_pb2.GenerateChunk(
            finish_reason=llm_core_pb2.FINISH_REASON_PREEMPTED, completion_tokens=event.completion_tokens
        )
    assert isinstance(event, FinishEvent)
    return llm_core_pb2.GenerateChunk(
        text=event.text,
        finish_reason=FINISH_REASONS[event.reason],
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        prefix_tokens_reused=event.prefix_reused,
        hidden_tokens=event.hidden_tokens,
        replay_divergences=event.replay_divergences,
    )


class TokenChunks:
    """Packs one stream's token events into chunks of up to `size` tokens (GenerateRequest.tokens_per_chunk): fewer
    messages to the kernel, whose every message costs CPU that the model's threads wait for. The stream's first
    token goes alone, so its arrival still times the first token (and a moved sequence's arrival)."""

    def __init__(self, size: int) -> None:
        self.size = max(size, 1)
        self.held: list[TokenEvent] = []
        self.sent = False

    def add(self, event: TokenEvent) -> llm_core_pb2.GenerateChunk | None:
        """The chunk to send now, if `event` completes one."""
        self.held.append(event)
        return self.flush() if len(self.held) >= self.size or not self.sent else None

    def flush(self) -> llm_core_pb2.GenerateChunk | None:
        """The tokens held back as one chunk (None if there are none): before any chunk that is not a token."""
        if not self.held:
            return None
        held, self.held, self.sent = self.held, [], True
        if len(held) == 1:
            return chunk_for(held[0])
        return llm_core_pb2.GenerateChunk(
            text="".join(e.text for e in held), token_ids=[e.token_id for e in held],
            token_texts=[e.text for e in held], completion_tokens=held[-1].completion_tokens, slot=held[-1].slot)


def core_info(core: LLMCore) -> llm_core_pb2.InfoResponse:
    """What the core reports of itself without asking Redis (Info adds that); from any thread."""
    engine, store = core.engine, core.snapshots
    status = engine.status()
    costs = [llm_core_pb2.StepCost(sequences=sequences, tokens_each=each, seconds=seconds)
             for sequences, each, seconds in status.pop("step_costs", ())]  # (none from the instant test double)
    steps = {kind: [llm_core_pb2.StepTally(sequences=sequences, steps=count, seconds=seconds)
                    for sequences, count, seconds in status.pop(kind, ())] for kind in ("prompt_steps", "plain_steps")}
    return llm_core_pb2.InfoResponse(
        model_path=str(core.model.path),
        model_description=core.model.description,
        n_ctx=engine.config.resident * engine.config.max_sequence_tokens,
        max_sequence_tokens=engine.config.max_sequence_tokens,
        snapshots_saved=store.saved,
        snapshot_bytes_saved=store.saved_bytes,
        step_costs=costs,
        **steps,
        **status,
    )


# InfoResponse's fields counted since start: counters in Prometheus (services/metrics.py), the others gauges.
INFO_COUNTERS = {"tokens_generated", "steps", "preemptions", "resumes_resident", "snapshots_saved",
                 "snapshots_restored", "snapshot_bytes_saved", "prefill_tokens_saved", "prefill_tokens",
                 "decode_seconds", "sample_seconds", "schedule_seconds", "kv_copy_seconds", "idle_seconds",
                 "decode_rows", "prefix_restores_from_ram", "draft_tokens", "draft_tokens_accepted", "padded_steps",
                 "bridged_steps"}


class EventSink:
    """Where one Generate call's events arrive, on its event loop: called from any thread (a sequence's `emit`), or
    handed a decode step's events for many calls at once (`deliver`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def __call__(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    @staticmethod
    def deliver(events: Delivery) -> None:
        """BatchEngine.deliver: a step's events into their sinks with one wakeup of the loop, not one per token
        (every sequence of a served core emits into the EventSink of its Generate call, all on one loop)."""
        events[0][0].loop.call_soon_threadsafe(EventSink._put_all, events)

    @staticmethod
    def _put_all(events: list[tuple["EventSink", Event]]) -> None:
        for sink, event in events:
            sink.queue.put_nowait(event)


class LLMCoreServicer(llm_core_pb2_grpc.LLMCoreServicer):
    def __init__(self, core: LLMCore, redis_ok: Callable[[], Awaitable[bool]]) -> None:
        self.core = core
        self.redis_ok = redis_ok
        core.engine.deliver = EventSink.deliver

    async def Generate(self, request, context):
        emit = EventSink(asyncio.get_running_loop())
        events = emit.queue
        if request.resume:
            if request.prompt or request.messages or request.HasField("sampling"):
                raise InvalidArgument("a resume continues the generation as it was: leave prompt, messages and sampling empty")
            seq = await self._off_loop(self.core.resume, request.syscall_id, request.agent_id, emit)
        else:
            # Tokenizing a long prompt takes a while: in a thread, so other streams keep flowing meanwhile.
            seq = await self._off_loop(self.core.start, request_from_proto(request), emit)
        parked = False
        chunks = TokenChunks(request.tokens_per_chunk)
        try:
            while True:
                event = await events.get()
                if isinstance(event, TokenEvent):
                    if packed := chunks.add(event):
                        yield packed
                    continue
                if held := chunks.flush():
                    yield held
                if isinstance(event, ErrorEvent):
                    raise event.error
                parked = isinstance(event, PreemptedEvent)
                chunk = chunk_for(event)
                last = parked or isinstance(event, FinishEvent)
                if last:  # the generation's summary on its span (if tracing)
                    tracing.annotate(**{"aios.syscall_id": request.syscall_id, "aios.parked": parked,
                                        "aios.prompt_tokens": chunk.prompt_tokens,
                                        "aios.completion_tokens": chunk.completion_tokens,
                                        "aios.prefix_tokens_reused": chunk.prefix_tokens_reused})
                yield chunk
                if last:
                    return
        finally:
            if not seq.status.ended and not parked:  # the caller went away mid-generation
                self.core.cancel(seq)

    async def _off_loop(self, start: Callable[..., Sequence], *args: object) -> Sequence:
        """`start(*args)` in a worker thread; a caller that leaves meanwhile gets its sequence cancelled, not orphaned."""
        work = asyncio.ensure_future(asyncio.to_thread(start, *args))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            work.add_done_callback(lambda done: done.exception() is None and self.core.cancel(done.result()))
            raise

    async def Preempt(self, request, context):
        if not request.syscall_id:
            raise InvalidArgument("syscall_id is required")
        preempted = await asyncio.to_thread(self.core.preempt, request.syscall_id, request.swap_out)
        return llm_core_pb2.PreemptResponse(preempted=preempted)

    async def Discard(self, request, context):
        if not request.syscall_id:
            raise InvalidArgument("syscall_id is required")
        discarded = await asyncio.to_thread(self.core.discard, request.syscall_id, request.agent_id)
        return llm_core_pb2.DiscardResponse(discarded=discarded)

    async def Reset(self, request, context):
        parked, snapshots = await asyncio.to_thread(self.core.reset, set(request.keep_syscall_ids))
        return llm_core_pb2.ResetResponse(parked=parked, snapshots=snapshots)

    async def Info(self, request, context):
        info = core_info(self.core)
        info.snapshots_in_redis = await asyncio.to_thread(self.core.snapshots.count_in_redis)
        info.redis_ok = await self.redis_ok()
        return info
