"""The gateway's translation, without a socket: OpenAI request bodies to kernel requests, replies back."""

from __future__ import annotations

import json

import grpc
import jsonschema
import pytest

from aios.v1 import llm_core_pb2
from services.gateway.openai_api import (
    ApiError,
    chat_completion,
    kernel_error,
    parse_reply,
    plan_chat,
    plan_completion,
)

MODEL = "gemma-3-270m-q4_k_m"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def chat(**body):
    return plan_chat({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}, [MODEL])


def test_a_plain_chat_becomes_a_generation_with_openais_defaults():
    plan = chat(max_completion_tokens=7, stop="END", seed=3, user="u-1")
    sampling = plan.request.sampling
    assert [(m.role, m.content) for m in plan.request.messages] == [("user", "hi")]
    assert (sampling.max_tokens, sampling.temperature, sampling.top_p, list(sampling.stop), sampling.seed) == (
        7, 1.0, 1.0, ["END"], 3)
    assert not sampling.json_schema and not plan.json_reply and not plan.stream


def test_message_shapes_developer_parts_tool_calls_and_tool_results_are_rendered():
    plan = chat(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ])
    turns = [(m.role, m.content) for m in plan.request.messages]
    assert turns == [("system", "Be brief."), ("user", "Weather in Oslo?"),
                     ("assistant", '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}'),
                     ("tool", "rain")]


def test_tools_are_offered_in_the_system_turn_and_the_reply_is_held_to_a_schema():
    auto = chat(tools=[WEATHER])
    assert auto.json_reply and auto.request.messages[0].role == "system"
    assert "get_weather" in auto.request.messages[0].content
    schema = json.loads(auto.request.sampling.json_schema)
    jsonschema.validate({"response": "sunny"}, schema)
    jsonschema.validate({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"tool_calls": [{"name": "get_weather", "arguments": {}}]}, schema)
    required = json.loads(chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
                          .request.sampling.json_schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"response": "sunny"}, required)
    with pytest.raises(jsonschema.ValidationError):  # one call at most without parallel calls
        jsonschema.validate({"tool_calls": [{"name": "get_weather", "arguments": {"city": "A"}}] * 2}, required)
    none = chat(tools=[WEATHER], tool_choice="none")
    assert not none.json_reply and not none.request.sampling.json_schema and none.request.messages[0].role == "user"


def test_a_tool_protocol_reply_becomes_tool_calls_or_content():
    plan = chat(tools=[WEATHER])
    content, calls = parse_reply('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}', plan)
    assert content is None and calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert parse_reply('{"response": "It is sunny."}', plan) == ("It is sunny.", None)
    assert parse_reply('{"tool_calls": [{"name": "get_w', plan) == ('{"tool_calls": [{"name": "get_w', None)
    last = llm_core_pb2.GenerateChunk(text='{"tool_calls": [{"name": "get_weather", "arguments": {"city": "R"}}]}',
                                      finish_reason=llm_core_pb2.FINISH_REASON_STOP, prompt_tokens=5,
                                      completion_tokens=9, syscall_id="sc-1")
    body = chat_completion(plan, last)
    assert body["id"] == "chatcmpl-sc-1" and body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


@pytest.mark.parametrize("body, param", [
    ({"model": None}, "model"),
    ({"messages": []}, "messages"),
    ({"n": 3}, "n"),
    ({"frequency_penalty": 1}, "frequency_penalty"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"seed": "x"}, "seed"),
    ({"stream": "yes"}, "stream"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"remember": "yes"}, "remember"),
])
def test_bad_fields_are_named(body, param):
    with pytest.raises(ApiError) as error:
        chat(**body)
    assert error.value.status == 400 and error.value.param == param


def test_an_unknown_model_is_404_and_completions_take_one_string_prompt():
    with pytest.raises(ApiError) as error:
        plan_chat({"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}, [MODEL])
    assert (error.value.status, error.value.code) == (404, "model_not_found")
    model, request, stream, usage = plan_completion({"model": MODEL, "prompt": ["Once"], "stream": True}, [MODEL])
    assert request.prompt == "Once" and request.sampling.max_tokens == 16 and stream and not usage
    with pytest.raises(ApiError):
        plan_completion({"model": MODEL, "prompt": [1, 2, 3]}, [MODEL])


def test_kernel_statuses_map_to_openais_http_errors():
    assert kernel_error(grpc.StatusCode.UNAUTHENTICATED, "unknown", None).status == 401
    limited = kernel_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "used its tokens", 2.4)
    assert (limited.status, limited.headers["Retry-After"], limited.code) == (429, "2", "rate_limit_exceeded")
    assert kernel_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "Shorten the prompt", None).status == 400
    assert kernel_error(grpc.StatusCode.UNAVAILABLE, "down", None).status == 503
    assert kernel_error(grpc.StatusCode.INTERNAL, "bug", None).status == 500
