"""aios.v1.LLMCore over gRPC: bridges the engine thread's events to a response stream."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from aios.v1 import llm_core_pb2, llm_core_pb2_grpc
from services.llm_core.core import GenerationRequest, LLMCore
from services.llm_core.engine import ErrorEvent, Event, FinishEvent, FinishReason
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
            s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed if s.HasField("seed") else None, list(s.stop)
        ),
        request_id=request.syscall_id,
    )


class LLMCoreServicer(llm_core_pb2_grpc.LLMCoreServicer):
    def __init__(self, core: LLMCore, redis_ok: Callable[[], Awaitable[bool]]) -> None:
        self.core = core
        self.redis_ok = redis_ok

    async def Generate(self, request, context):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        seq = self.core.start(request_from_proto(request), lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        try:
            while True:
                event = await events.get()
                if isinstance(event, ErrorEvent):
                    raise event.error
                if isinstance(event, FinishEvent):
                    yield llm_core_pb2.GenerateChunk(
                        text=event.text,
                        finish_reason=FINISH_REASONS[event.reason],
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                    )
                    return
                yield llm_core_pb2.GenerateChunk(
                    text=event.text, token_id=event.token_id, completion_tokens=event.completion_tokens
                )
        finally:
            if not seq.finished:
                self.core.cancel(seq)

    async def Info(self, request, context):
        engine = self.core.engine
        return llm_core_pb2.InfoResponse(
            model_path=str(self.core.model.path),
            model_description=self.core.model.description,
            n_ctx=engine.config.n_ctx,
            max_sequence_tokens=engine.config.max_sequence_tokens,
            redis_ok=await self.redis_ok(),
            **engine.stats(),
        )
