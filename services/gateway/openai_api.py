"""OpenAI's chat-completions and completions API, translated to and from kernel syscalls.

Plain functions, no sockets: a request body (already JSON-decoded) becomes a
`KernelGenerateRequest`; the kernel's chunks become OpenAI's response objects.
Bad input raises `ApiError`, which the app turns into OpenAI's error JSON.

Tools and structured output. The bundled model has no native tool format, so
tools are rendered into the system prompt and the reply is constrained by a JSON
Schema that the LLM core compiles into a grammar (llama.cpp's "generic" tool
format): either `{"tool_calls": [{"name": ..., "arguments": {...}}]}` or
`{"response": "..."}`. With tool_choice `required` or a named function only the
first form is allowed; with `auto` both; with `none` the tools are not offered.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from aios.v1 import common_pb2, kernel_pb2, llm_core_pb2

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_STOP = 4
# Calls one reply may make with parallel_tool_calls: small models repeat a call until max_tokens otherwise.
MAX_PARALLEL_CALLS = 4
# Fields OpenAI defines that AIOS cannot honour yet: refused by name rather than silently ignored.
UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")
UNSUPPORTED_TRUE = ("logprobs",)
UNSUPPORTED_SET = ("top_logprobs", "logit_bias", "audio", "modalities", "prediction", "functions", "function_call")
FINISH_REASONS = {
    llm_core_pb2.FINISH_REASON_STOP: "stop",
    llm_core_pb2.FINISH_REASON_STOP_STRING: "stop",
    llm_core_pb2.FINISH_REASON_LENGTH: "length",
    llm_core_pb2.FINISH_REASON_CONTEXT: "length",
}


class ApiError(Exception):
    """An error in OpenAI's shape: HTTP status, message, type, the offending parameter and a code."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


# gRPC status of a kernel call -> HTTP status and OpenAI error type.
STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
}


def kernel_error(code: grpc.StatusCode, details: str, retry_after: float | None) -> ApiError:
    """A kernel status as OpenAI reports its own: a limit with a wait is 429 with Retry-After."""
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        if retry_after is not None:
            return ApiError(429, details, "rate_limit_error", code="rate_limit_exceeded",
                            headers={"Retry-After": str(max(1, round(retry_after)))})
        return ApiError(400, details, code="context_length_exceeded" if "prompt" in details.lower() else None)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ApiError(401, f"Incorrect API key: {details}. The API key is an AIOS agent token "
                             "(`aios agent create NAME` prints one).", "invalid_request_error", code="invalid_api_key")
    status, kind = STATUS.get(code, (500, "server_error"))
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"the AIOS kernel is unavailable ({details}); retry shortly"
    return ApiError(status, details, kind)


# ---- request parsing ------------------------------------------------------------------------


def _number(body: dict[str, Any], name: str, low: float, high: float, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid(name, f"{name} must be a number between {low:g} and {high:g}; got {value!r}")
    return float(value)


def _count(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid(name, f"{name} must be a positive integer; got {value!r}")
    return value


def _text(content: Any, param: str) -> str:
    """Message content: a string, or a list of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{param}[{j}]", f"{param}[{j}] is a {kind!r} part; AIOS reads text parts only")
            texts.append(part["text"])
        return "".join(texts)
    raise invalid(param, f"{param} must be a string or a list of text parts")


def _common_sampling(body: dict[str, Any], default_max_tokens: int) -> common_pb2.SamplingParams:
    for name in UNSUPPORTED_NONZERO:
        if body.get(name):
            raise invalid(name, f"{name} is not supported by AIOS's LLM core yet; leave it unset or 0")
    for name in UNSUPPORTED_TRUE:
        if body.get(name):
            raise invalid(name, f"{name} is not supported by AIOS yet; leave it unset or false")
    for name in UNSUPPORTED_SET:
        if body.get(name) is not None:
            raise invalid(name, f"{name} is not supported by AIOS")
    if body.get("n") not in (None, 1):
        raise invalid("n", "AIOS generates one choice per request (n=1); send several requests for more")
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise invalid("stop", f"stop must be a string or a list of at most {MAX_STOP} non-empty strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise invalid("seed", "seed must be an integer")
    max_tokens = _count(body, "max_completion_tokens") or _count(body, "max_tokens") or default_max_tokens
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0),
        stop=stops,
    )
    if seed is not None:
        sampling.seed = seed % (1 << 64)
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension, for fixed-length benchmarks
    if not isinstance(ignore_eos, bool):
        raise invalid("ignore_eos", "ignore_eos must be true or false")
    sampling.ignore_eos = ignore_eos
    return sampling


def _extensions(body: dict[str, Any], request: kernel_pb2.KernelGenerateRequest) -> None:
    """AIOS's own optional fields (the openai client sends them with `extra_body`): memory and a priority hint."""
    history = body.get("history_turns")
    if history is not None:
        if isinstance(history, bool) or not isinstance(history, int) or not 0 <= history <= 1000:
            raise invalid("history_turns", "history_turns must be an integer from 0 to 1000")
        request.history_turns = history
    priority = body.get("priority")  # as vLLM's; AIOS caps it at the agent's own priority
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 10:
            raise invalid("priority", "priority must be an integer from 0 to 10 (capped at the agent's priority)")
        request.priority = priority
    remember = body.get("remember")
    if remember is not None:
        if not isinstance(remember, bool):
            raise invalid("remember", "remember must be true or false")
        request.remember = remember


def check_model(body: dict[str, Any], served: list[str]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model", "model is required; GET /v1/models lists the served models")
    if model not in served:
        raise ApiError(404, f"The model `{model}` does not exist; this AIOS serves {', '.join(served)}",
                       param="model", code="model_not_found")
    return model


@dataclass
class Tools:
    """The functions a chat request offers and how the model may use them."""

    functions: list[dict[str, Any]] = field(default_factory=list)
    choice: str = "auto"  # "none", "auto", "required", or "function" (then `named`)
    named: str = ""
    parallel: bool = True

    @property
    def offered(self) -> list[dict[str, Any]]:
        """The functions the model sees (only the named one for a named choice; none for "none")."""
        if self.choice == "none":
            return []
        if self.choice == "function":
            return [f for f in self.functions if f["name"] == self.named]
        return self.functions

    def reply_schema(self) -> dict[str, Any] | None:
        """The JSON Schema the reply must follow, or None for free text."""
        offered = self.offered
        if not offered:
            return None
        call = {"anyOf": [{"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]},
                           "required": ["name", "arguments"], "additionalProperties": False} for f in offered]}
        most = MAX_PARALLEL_CALLS if self.parallel else 1
        calls = {"type": "object", "properties": {"tool_calls": {"type": "array", "items": call, "minItems": 1,
                                                                 "maxItems": most}},
                 "required": ["tool_calls"], "additionalProperties": False}
        if self.choice in ("required", "function"):
            return calls
        answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"],
                  "additionalProperties": False}
        return {"anyOf": [calls, answer]}

    def instructions(self) -> str:
        listing = json.dumps([{"name": f["name"], "description": f.get("description", ""), "parameters": f["parameters"]}
                              for f in self.offered])
        how = ('Reply with JSON only: {"tool_calls": [{"name": "<tool name>", "arguments": {...}}]} to call tools'
               + ('' if self.choice in ("required", "function") else ', or {"response": "<your answer>"} to answer'))
        return f"You can use these tools:\n{listing}\n{how}."


def parse_tools(body: dict[str, Any]) -> Tools:
    tools = body.get("tools")
    if tools is None:
        if body.get("tool_choice") not in (None, "none", "auto"):
            raise invalid("tool_choice", "tool_choice names a tool but the request sends no tools")
        return Tools(choice="none")
    if not isinstance(tools, list):
        raise invalid("tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}}")
    functions = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid(f"tools[{i}]", f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}")
        parameters = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise invalid(f"tools[{i}].function.parameters", "parameters must be a JSON Schema object")
        functions.append({"name": fn["name"], "description": fn.get("description") or "", "parameters": parameters})
    if len({f["name"] for f in functions}) != len(functions):
        raise invalid("tools", "tool names must be unique")
    choice = body.get("tool_choice", "auto" if functions else "none")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", "parallel_tool_calls must be true or false")
    if choice in ("none", "auto", "required"):
        return Tools(functions, choice, parallel=parallel)
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(named, str) or named not in {f["name"] for f in functions}:
        raise invalid("tool_choice", 'tool_choice must be "none", "auto", "required" or '
                                     '{"type": "function", "function": {"name": <one of the tools>}}')
    return Tools(functions, "function", named, parallel)


def response_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema `response_format` asks for, or None for text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise invalid("response_format.json_schema.schema", "json_schema needs a `schema` object")
        return schema
    raise invalid("response_format.type", 'response_format.type must be "text", "json_object" or "json_schema"')


@dataclass
class ChatPlan:
    """What one chat-completions request becomes, and what its reply needs."""

    model: str
    request: kernel_pb2.KernelGenerateRequest
    tools: Tools
    stream: bool
    include_usage: bool

    @property
    def json_reply(self) -> bool:
        """The reply follows the tool protocol's JSON (tools are offered)."""
        return bool(self.tools.offered)


def plan_chat(body: dict[str, Any], served: list[str], default_max_tokens: int = 0) -> ChatPlan:
    model = check_model(body, served)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list")
    tools = parse_tools(body)
    schema = response_schema(body)
    if schema is not None and tools.offered:
        raise invalid("response_format", "response_format and tools cannot be combined; the tool protocol has its own")
    turns: list[common_pb2.ChatMessage] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}")
        role = ROLES[message["role"]]
        content = _text(message.get("content"), f"messages[{i}].content")
        if role == "assistant" and message.get("tool_calls"):
            content = _assistant_calls(message["tool_calls"], content, f"messages[{i}].tool_calls")
        turns.append(common_pb2.ChatMessage(role=role, content=content))
    if tools.offered:
        system = common_pb2.ChatMessage(role="system", content=tools.instructions())
        first = next((i for i, m in enumerate(turns) if m.role != "system"), len(turns))
        turns.insert(first, system)
    sampling = _common_sampling(body, default_max_tokens)
    schema = tools.reply_schema() if tools.offered else schema
    if schema is not None:
        sampling.json_schema = json.dumps(schema)
    request = kernel_pb2.KernelGenerateRequest(messages=turns, sampling=sampling)
    _extensions(body, request)
    options = body.get("stream_options") or {}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise invalid("stream", "stream must be true or false")
    if not isinstance(options, dict):
        raise invalid("stream_options", "stream_options must be an object")
    return ChatPlan(model, request, tools, stream, bool(options.get("include_usage")))


def _assistant_calls(calls: Any, content: str, param: str) -> str:
    """An earlier assistant turn that called tools, written as the model writes calls."""
    if not isinstance(calls, list):
        raise invalid(param, f"{param} must be a list")
    rendered = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{param}[{j}]", f"{param}[{j}] must have function.name and function.arguments")
        try:
            arguments = json.loads(fn.get("arguments") or "{}")
        except json.JSONDecodeError:
            raise invalid(f"{param}[{j}].function.arguments", "function.arguments must be a JSON string") from None
        rendered.append({"name": fn["name"], "arguments": arguments})
    text = json.dumps({"tool_calls": rendered})
    return f"{content}\n{text}" if content else text


def plan_completion(body: dict[str, Any], served: list[str]) -> tuple[str, kernel_pb2.KernelGenerateRequest, bool, bool]:
    """(model, request, stream, include_usage) of a legacy completions request."""
    model = check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise invalid("prompt", "prompt must be a non-empty string (one prompt per request)")
    for name in ("echo", "suffix", "best_of"):
        if body.get(name) not in (None, False, 1):
            raise invalid(name, f"{name} is not supported by AIOS")
    sampling = _common_sampling(body, 16)  # OpenAI's completions default
    request = kernel_pb2.KernelGenerateRequest(prompt=prompt, sampling=sampling)
    options = body.get("stream_options") or {}
    return model, request, bool(body.get("stream", False)), bool(isinstance(options, dict) and options.get("include_usage"))


# ---- replies ----------------------------------------------------------------------------------


def completion_id(prefix: str, syscall_id: str) -> str:
    return f"{prefix}-{syscall_id or secrets.token_hex(8)}"


def parse_reply(text: str, plan: ChatPlan) -> tuple[str | None, list[dict[str, Any]] | None]:
    """(content, tool_calls) of the model's reply: the tool protocol's JSON unpacked, or the text as is."""
    if not plan.json_reply:
        return text, None
    try:
        reply = json.loads(text)
    except json.JSONDecodeError:  # cut short (max_tokens): hand back what there is as text
        return text, None
    if isinstance(reply, dict) and isinstance(reply.get("tool_calls"), list):
        return None, [
            {"id": f"call_{secrets.token_hex(12)}", "type": "function",
             "function": {"name": call["name"], "arguments": json.dumps(call["arguments"])}}
            for call in reply["tool_calls"]
        ]
    if isinstance(reply, dict) and isinstance(reply.get("response"), str):
        return reply["response"], None
    return text, None


def finish_reason(core_reason: int, tool_calls: list[dict[str, Any]] | None) -> str:
    return "tool_calls" if tool_calls else FINISH_REASONS.get(core_reason, "stop")


def usage(chunk: llm_core_pb2.GenerateChunk) -> dict[str, int]:
    return {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.completion_tokens,
            "total_tokens": chunk.prompt_tokens + chunk.completion_tokens}


def chat_completion(plan: ChatPlan, last: llm_core_pb2.GenerateChunk) -> dict[str, Any]:
    content, calls = parse_reply(last.text, plan)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id("chatcmpl", last.syscall_id), "object": "chat.completion", "created": int(time.time()),
        "model": plan.model, "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "logprobs": None,
                     "finish_reason": finish_reason(last.finish_reason, calls)}],
        "usage": usage(last),
    }


def chat_chunk(plan: ChatPlan, ident: str, created: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": plan.model,
             "system_fingerprint": None,
             "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
    if plan.include_usage:
        chunk["usage"] = None
    return chunk


def text_completion(model: str, last: llm_core_pb2.GenerateChunk) -> dict[str, Any]:
    return {
        "id": completion_id("cmpl", last.syscall_id), "object": "text_completion", "created": int(time.time()),
        "model": model, "system_fingerprint": None,
        "choices": [{"index": 0, "text": last.text, "logprobs": None,
                     "finish_reason": FINISH_REASONS.get(last.finish_reason, "stop")}],
        "usage": usage(last),
    }
