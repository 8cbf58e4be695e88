"""The HTTP door: OpenAI's API over the kernel, for agents written with any framework.

FastAPI routes that only translate (services/gateway/openai_api.py does the
mapping): the API key is the calling agent's token, passed to the kernel as
`authorization: Bearer <token>`, so every request is that agent's syscall,
queued, scheduled, preemptible, counted and limited like any other. The gateway
holds no credential of its own.
"""

from __future__ import annotations

import json
import time
from typing import Any, AsyncIterator

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from grpc_health.v1 import health_pb2, health_pb2_grpc

from aios.client import open_channel, syscall_error
from aios.v1 import kernel_pb2, kernel_pb2_grpc
from services.credentials import bearer_metadata
from services.metrics import RpcMetrics
from services.tracing import TRACEPARENT, trace_id_of
from services.gateway.openai_api import (
    ApiError,
    ChatPlan,
    chat_chunk,
    chat_completion,
    completion_id,
    finish_reason,
    kernel_error,
    parse_reply,
    plan_chat,
    plan_completion,
    text_completion,
    usage,
)


class KernelDoor:
    """The gateway's channel to the kernel; every call carries the caller's own token."""

    def __init__(self, address: str, root_certificates: bytes | None = None, server_name: str | None = None) -> None:
        self.channel = open_channel(address, root_certificates, server_name, aio=True)
        self.stub = kernel_pb2_grpc.KernelStub(self.channel)

    async def healthy(self) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def api_key(request: Request) -> tuple[tuple[str, str], ...]:
    """The caller's token as kernel metadata; 401 in OpenAI's shape without one."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "You didn't provide an API key. Send `Authorization: Bearer <token>`, where the token is "
                            "an AIOS agent token (`aios agent create NAME` prints one).", code="invalid_api_key")
    traceparent = request.headers.get(TRACEPARENT, "")  # an OpenTelemetry-traced client's: the kernel's syscall joins
    return (*bearer_metadata(token.strip()), *(((TRACEPARENT, traceparent),) if trace_id_of(traceparent) else ()))


def translated(exc: grpc.aio.AioRpcError) -> ApiError:
    error = syscall_error(exc)  # the SDK's reading of a kernel error: code, message, retry-after hint
    return kernel_error(error.code, error.message, error.retry_after)


async def json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


REQUESTS = RpcMetrics("aios_http_requests", "HTTP requests answered, by route (METHOD /path) and status code")


HTTP_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class CountRequests:
    """ASGI middleware: every request into REQUESTS, under its route's path (a path no route matched counts as one,
    so that clients cannot grow the metrics with made-up paths); the time is until the response began."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status, answered = time.perf_counter(), "500", None

        async def sending(message: dict) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = str(message["status"]), time.perf_counter()
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:  # a request that failed or whose client left before an answer counts too (as 500)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "OTHER"
            REQUESTS.observe(f"{method} {getattr(scope.get('route'), 'path', '(unmatched)')}", status,
                             (answered or time.perf_counter()) - started)


def create_app(door: KernelDoor, served_models: list[str]) -> FastAPI:
    app = FastAPI(title="AIOS OpenAI-compatible gateway", docs_url=None, redoc_url=None)
    app.add_middleware(CountRequests)
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """An unknown path or method, in OpenAI's error shape too."""
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error")
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = await door.healthy()
        return JSONResponse({"status": "ok" if ok else "kernel unavailable"}, status_code=200 if ok else 503)

    async def whoami(metadata: tuple[tuple[str, str], ...]) -> None:
        try:
            await door.stub.WhoAmI(kernel_pb2.WhoAmIRequest(), metadata=metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            raise translated(exc) from None

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "aios"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        await whoami(api_key(request))
        return {"object": "list", "data": [model_card(name) for name in served_models]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request) -> dict[str, Any]:
        await whoami(api_key(request))
        if name not in served_models:
            raise ApiError(404, f"The model `{name}` does not exist", param="model", code="model_not_found")
        return model_card(name)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        await whoami(api_key(request))
        raise ApiError(501, "AIOS serves no embedding model yet: /v1/embeddings is not implemented. Use an embedding "
                            "model elsewhere; AIOS memory search ranks by BM25 meanwhile.", "not_implemented_error")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        metadata = api_key(request)
        plan = plan_chat(await json_body(request), served_models)
        timeout = _timeout(request)
        if not plan.stream:
            plan.request.whole = True
            last = await _last_chunk(door, plan.request, metadata, timeout)
            return chat_completion(plan, last)
        stream = door.stub.Generate(plan.request, metadata=metadata, timeout=timeout)
        first = await _first(stream)  # errors before the first chunk still get an HTTP status
        return event_stream(_chat_events(plan, stream, first))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        metadata = api_key(request)
        model_name, kernel_request, stream_wanted, include_usage = plan_completion(await json_body(request), served_models)
        timeout = _timeout(request)
        if not stream_wanted:
            kernel_request.whole = True
            return text_completion(model_name, await _last_chunk(door, kernel_request, metadata, timeout))
        stream = door.stub.Generate(kernel_request, metadata=metadata, timeout=timeout)
        first = await _first(stream)
        return event_stream(_completion_events(model_name, include_usage, stream, first))

    return app


def _timeout(request: Request) -> float | None:
    """An optional `X-Request-Timeout` (seconds) becomes the syscall's deadline."""
    value = request.headers.get("x-request-timeout")
    try:
        return float(value) if value else None
    except ValueError:
        raise ApiError(400, "X-Request-Timeout must be a number of seconds", param="X-Request-Timeout") from None


async def _last_chunk(door: KernelDoor, request: kernel_pb2.KernelGenerateRequest, metadata: Any,
                      timeout: float | None) -> Any:
    last = None
    try:
        async for chunk in door.stub.Generate(request, metadata=metadata, timeout=timeout):
            last = chunk
    except grpc.aio.AioRpcError as exc:
        raise translated(exc) from None
    return last


async def _first(stream: Any) -> Any:
    try:
        return await stream.read()
    except grpc.aio.AioRpcError as exc:
        raise translated(exc) from None


async def _chunks(stream: Any, first: Any) -> AsyncIterator[Any]:
    """The kernel's chunks, the first one already read; the call is cancelled if the client leaves."""
    try:
        chunk = first
        while chunk is not grpc.aio.EOF:
            yield chunk
            chunk = await stream.read()
    finally:
        stream.cancel()


# Server-sent events as OpenAI sends them: `data: <json>` per chunk, then `data: [DONE]`, written straight into a
# Starlette StreamingResponse: one small bytes object per token. (With sse-starlette's EventSourceResponse the gateway
# reached 0.88 of the gRPC kernel's throughput in one `make bench` run at 16 streams on 2 cores; like this, 1.00.)
DONE = b"data: [DONE]\n\n"


def event_stream(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _error_event(exc: grpc.aio.AioRpcError) -> bytes:
    """A failure after the stream began: OpenAI sends the error object as a data event."""
    return _sse(translated(exc).body())


async def _chat_events(plan: ChatPlan, stream: Any, first: Any) -> AsyncIterator[bytes]:
    ident, created = completion_id("chatcmpl", first.syscall_id), int(time.time())
    yield _sse(chat_chunk(plan, ident, created, {"role": "assistant", "content": ""}))
    pieces: list[str] = []
    try:
        async for chunk in _chunks(stream, first):
            if not plan.json_reply and chunk.text:
                yield _sse(chat_chunk(plan, ident, created, {"content": chunk.text}))
            pieces.append(chunk.text)
            if chunk.finish_reason:
                calls = None
                if plan.json_reply:  # the tool protocol's JSON is unpacked once it is complete
                    content, calls = parse_reply("".join(pieces), plan)
                    if calls:
                        yield _sse(chat_chunk(plan, ident, created, {"tool_calls": [
                            {"index": i, **call} for i, call in enumerate(calls)]}))
                    elif content:
                        yield _sse(chat_chunk(plan, ident, created, {"content": content}))
                yield _sse(chat_chunk(plan, ident, created, {}, finish_reason(chunk.finish_reason, calls)))
                if plan.include_usage:
                    yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": plan.model,
                                "system_fingerprint": None, "choices": [], "usage": usage(chunk)})
    except grpc.aio.AioRpcError as exc:
        yield _error_event(exc)
    yield DONE


async def _completion_events(model: str, include_usage: bool, stream: Any, first: Any) -> AsyncIterator[bytes]:
    ident, created = completion_id("cmpl", first.syscall_id), int(time.time())

    def chunk_of(text: str, finish: str | None) -> dict[str, Any]:
        body = {"id": ident, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return body

    try:
        async for chunk in _chunks(stream, first):
            finish = finish_reason(chunk.finish_reason, None) if chunk.finish_reason else None
            if chunk.text or finish:
                yield _sse(chunk_of(chunk.text, finish))
            if finish and include_usage:
                yield _sse({**chunk_of("", None), "choices": [], "usage": usage(chunk)})
    except grpc.aio.AioRpcError as exc:
        yield _error_event(exc)
    yield DONE
