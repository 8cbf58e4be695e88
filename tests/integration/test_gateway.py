"""The OpenAI-compatible gateway with the real `openai` client: every request is a syscall of the calling agent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

import aios
from aios.v1 import common_pb2
from deploy.cluster import Cluster
from tests.integration.waiting import wait_until

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city", "unit"], "additionalProperties": False},
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Adds two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def agent(kernel: aios.Connection) -> aios.Agent:
    return kernel.register("openai-client")


@pytest.fixture(scope="module")
def client(cluster: Cluster, agent: aios.Agent) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.openai_base_url, api_key=agent.token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(cluster: Cluster) -> str:
    return cluster.served_model_name


def test_models_are_listed_for_a_valid_key_and_a_bad_key_gets_openais_401(cluster, client, model):
    assert [m.id for m in client.models.list()] == [model]
    bad = openai.OpenAI(base_url=cluster.openai_base_url, api_key="aios_agt_forged", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as error:
        bad.models.list()
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    reply = httpx.get(f"{cluster.openai_base_url}/models")  # no key at all
    assert reply.status_code == 401 and set(reply.json()["error"]) == {"message", "type", "param", "code"}
    unknown = httpx.post(f"{cluster.openai_base_url}/audio/speech", json={})
    assert unknown.status_code == 404 and "/v1/audio/speech" in unknown.json()["error"]["message"]


def test_a_chat_completion_is_a_syscall_of_the_calling_agent(client, model, agent):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Count: 1, 2, 3,"}],
                                           max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length") and reply.object == "chat.completion"
    assert reply.usage.completion_tokens <= 6 and reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    record = agent.syscall(reply.id.removeprefix("chatcmpl-"))
    assert record.kind == "llm_generate" and record.agent_id == agent.id
    assert record.state == common_pb2.SYSCALL_STATE_DONE and record.tokens_out == reply.usage.completion_tokens


def test_a_streamed_chat_arrives_as_chunks_with_usage_last(client, model):
    chunks = list(client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "Answer briefly."},
                               {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}],
        max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text and finishes in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert len({c.id for c in chunks}) == 1


def test_legacy_completions_streamed_and_not(client, model):
    reply = client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0)
    assert reply.choices[0].text and reply.usage.completion_tokens == 4 and reply.choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model=model, prompt="1, 2, 3, 4,", max_tokens=4, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces if p.choices) and pieces[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("extra, param", [
    ({"n": 2}, "n"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"temperature": 5}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logprobs": True}, "logprobs"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": [WEATHER]}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "integer", "minimum": 3}}}}, None),
])
def test_bad_requests_get_400_naming_the_field(client, model, extra, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**{"model": model, "messages": ASK, "max_tokens": 4, **extra})
    assert error.value.status_code == 400 and error.value.body["type"] == "invalid_request_error"
    if param is None:
        assert "minimum" in error.value.body["message"]
    else:
        assert error.value.body["param"] == param


def test_unknown_model_is_404_and_embeddings_say_501(client, model):
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=ASK)
    assert missing.value.body["code"] == "model_not_found" and model in missing.value.body["message"]
    with pytest.raises(openai.APIStatusError) as unsupported:
        client.embeddings.create(model=model, input="hello")
    assert unsupported.value.status_code == 501 and "embedding" in unsupported.value.body["message"]


def test_an_agent_over_its_token_rate_gets_429_with_retry_after(cluster, kernel, model):
    thrifty = kernel.register("thrifty-http", tokens_per_minute=30)
    client = openai.OpenAI(base_url=cluster.openai_base_url, api_key=thrifty.token, max_retries=0)
    used = client.completions.create(model=model, prompt="Once upon a time", max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert used.usage.total_tokens > 30  # past its 30 a minute
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=model, messages=ASK, max_tokens=4)
    assert int(limited.value.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_or_named_tool_choice_always_gives_a_valid_call(client, model, choice):
    for temperature, parallel, max_tokens in ((0.0, False, 100), (1.0, False, 100), (0.0, True, 400)):
        reply = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER, ADD], tool_choice=choice,
                                               temperature=temperature, seed=3, max_tokens=max_tokens,
                                               parallel_tool_calls=parallel)
        message = reply.choices[0]
        assert message.finish_reason == "tool_calls" and message.message.tool_calls
        assert 1 <= len(message.message.tool_calls) <= (4 if parallel else 1)
        for call in message.message.tool_calls:
            assert call.id.startswith("call_") and call.type == "function"
            spec = {"get_weather": WEATHER, "add": ADD}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
            if isinstance(choice, dict):
                assert call.function.name == "get_weather"


def test_auto_gives_text_or_valid_calls_and_none_gives_text(client, model):
    auto = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="auto",
                                          temperature=0, max_tokens=100, parallel_tool_calls=False)
    message = auto.choices[0].message
    if message.tool_calls:
        assert len(message.tool_calls) == 1 and auto.choices[0].finish_reason == "tool_calls"
        jsonschema.validate(json.loads(message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
    else:
        assert isinstance(message.content, str) and auto.choices[0].finish_reason in ("stop", "length")
    none = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="none",
                                          temperature=0, max_tokens=8)
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_a_tool_result_goes_back_to_the_model_and_calls_stream_as_deltas(client, model):
    first = client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=100, parallel_tool_calls=False)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18, "sky": "clear"}'}]
    answer = client.chat.completions.create(model=model, messages=history, max_tokens=20, temperature=0)
    assert answer.choices[0].message.content
    chunks = list(client.chat.completions.create(model=model, messages=ASK, tools=[WEATHER], tool_choice="required",
                                                 temperature=0, max_tokens=100, stream=True, parallel_tool_calls=False))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas and deltas[0][0].function.name == "get_weather" and deltas[0][0].id.startswith("call_")
    jsonschema.validate(json.loads(deltas[0][0].function.arguments), WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_schema_and_json_object_replies_parse_and_validate(client, model):
    # Bounded strings bound the reply, so max_tokens cannot cut it short: every reply must parse and validate.
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                        "maxItems": 3}},
              "required": ["name", "age", "tags"], "additionalProperties": False}
    for temperature, seed in [(0.0, 11), *((1.2, seed) for seed in range(11, 19))]:
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Describe a person as JSON."}], temperature=temperature,
            seed=seed, max_tokens=200,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}})
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
    # json_object bounds nothing: asked for "A JSON object please." greedy decoding on one EPYC went on adding keys
    # past any max_tokens, so the prompt asks for two fields (an object cut short ends with finish_reason length).
    obj = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Give me a JSON object with a name and an age."}],
        temperature=0, max_tokens=60, response_format={"type": "json_object"})
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert isinstance(json.loads(obj.choices[0].message.content), dict)


def test_aios_extensions_remember_the_turns_in_the_agents_memory(client, model, agent):
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "My name is Ada."}],
                                   max_tokens=4, temperature=0, extra_body={"remember": True})
    assert "My name is Ada." in [t.text for t in agent.memory_turns(10)]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=model, messages=ASK, extra_body={"history_turns": -1})
    assert error.value.body["param"] == "history_turns"


def test_a_priority_hint_lowers_never_raises_the_agents_priority(cluster, kernel, model):
    middling = kernel.register("middling", priority=5)
    client = openai.OpenAI(base_url=cluster.openai_base_url, api_key=middling.token, max_retries=0)
    for hint, scheduled in ((2, 2), (9, 5), (None, 5)):
        reply = client.chat.completions.create(model=model, messages=ASK, max_tokens=2, temperature=0,
                                               extra_body={} if hint is None else {"priority": hint})
        assert middling.syscall(reply.id.removeprefix("chatcmpl-")).priority == scheduled


def test_an_async_client_streams_too(cluster, agent, model):
    import asyncio

    async def stream() -> str:
        async with openai.AsyncOpenAI(base_url=cluster.openai_base_url, api_key=agent.token, max_retries=0) as client:
            events = await client.chat.completions.create(model=model, messages=ASK, max_tokens=6, temperature=0,
                                                          stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in events if c.choices])

    assert asyncio.run(stream())


def test_with_the_kernel_down_the_gateway_answers_503(tmp_path: Path, agent, model):
    ready = tmp_path / "gateway.ready"
    process = subprocess.Popen([sys.executable, "-m", "services.gateway", "--kernel", "127.0.0.1:9",
                                "--served-model-name", model, "--ready-file", str(ready)])
    try:
        wait_until(ready.exists, within_s=60, what="the gateway's ready file")
        base = f"http://{json.loads(ready.read_text())['address']}"
        assert httpx.get(f"{base}/health").status_code == 503
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=agent.token, max_retries=0)
        with pytest.raises(openai.InternalServerError) as down:
            client.chat.completions.create(model=model, messages=ASK, max_tokens=4)
        assert down.value.status_code == 503 and "kernel" in down.value.body["message"]
    finally:
        process.terminate()
        process.wait(timeout=30)
