"""One agent's full round trip through every syscall kind, via the kernel."""

import grpc

from aios.v1 import common_pb2, llm_core_pb2


def test_generate_streams_token_by_token_and_is_recorded(agent):
    chunks = list(agent.generate("1, 2, 3, 4, 5,", max_tokens=12))
    tokens, final = chunks[:-1], chunks[-1]
    assert len(tokens) == 12 and all(c.HasField("token_id") for c in tokens)
    assert final.finish_reason == llm_core_pb2.FINISH_REASON_LENGTH
    assert final.prompt_tokens > 0 and final.completion_tokens == 12
    text = "".join(c.text for c in chunks)
    assert text.startswith(" 6, 7, 8")  # greedy continuation of a counting sequence
    record = agent.syscall(final.syscall_id)
    assert record.kind == "llm_generate" and record.state == common_pb2.SYSCALL_STATE_DONE
    assert record.tokens_out == 12 and record.tokens_in == final.prompt_tokens
    assert record.finished_at >= record.started_at >= record.created_at > 0


def test_a_whole_generation_arrives_as_one_chunk_with_the_streamed_text_and_tokens(agent):
    streamed = list(agent.generate("Counting: 1, 2, 3,", max_tokens=12, ignore_eos=True))
    [whole] = list(agent.generate("Counting: 1, 2, 3,", max_tokens=12, ignore_eos=True, whole=True))
    assert whole.text == "".join(c.text for c in streamed)
    assert list(whole.token_ids) == [c.token_id for c in streamed if c.HasField("token_id")]
    assert whole.finish_reason == streamed[-1].finish_reason and whole.completion_tokens == 12
    assert agent.syscall(whole.syscall_id).tokens_out == 12


def test_chat_answers_a_question_and_stops_at_the_turn_boundary(agent):
    completion = agent.complete(messages=[("user", "What is the capital of France?")], max_tokens=40)
    assert "Paris" in completion.text
    assert "Question:" not in completion.text and completion.finish_reason == "stop"  # a turn's end: a normal stop


def test_stop_strings_and_seeded_sampling(agent):
    stopped = agent.complete("1, 2, 3, 4, 5,", max_tokens=30, stop=[" 9"])
    assert stopped.text == " 6, 7, 8," and stopped.finish_reason == "stop_string"
    assert 1 <= stopped.hidden_tokens <= 2 < stopped.completion_tokens  # " 9" was generated, counted, not shown
    assert agent.complete("1, 2, 3,", max_tokens=4).hidden_tokens == 0
    sampled = [agent.complete("Once upon a time", max_tokens=16, temperature=0.9, top_k=40, top_p=0.9, seed=11).text for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0]


def test_memory_round_trip(agent):
    entry = agent.memory_add("prefers green tea", {"kind": "preference"})
    assert entry.id and entry.agent_id == agent.id
    assert agent.memory_get(entry.id).metadata["kind"] == "preference"
    assert [e.text for e in agent.memory_list()] == ["prefers green tea"]
    agent.memory_delete(entry.id)
    assert list(agent.memory_list()) == []


def test_storage_round_trip(agent):
    info = agent.storage_write("notes/plan.md", "# Plan\n1. read", {"format": "md"})
    assert info.size == len("# Plan\n1. read")
    assert agent.storage_read("notes/plan.md") == b"# Plan\n1. read"
    assert [r.key for r in agent.storage_list("notes/")] == ["notes/plan.md"]
    agent.storage_delete("notes/plan.md")
    assert agent.storage_list() == []


def test_tools_round_trip(agent):
    tools = {t.name: t for t in agent.tools()}
    assert {"calculator", "clock"} <= set(tools) and '"expression"' in tools["calculator"].parameters_schema
    assert agent.call_tool("calculator", expression="(17 + 4) * 2")["result"] == 42
    assert agent.call_tool("clock", timezone="UTC")["timezone"] == "UTC"


def test_status_reports_every_service_healthy(kernel):
    status = kernel.status()
    assert {s.name for s in status.services} == {"llm_core", "memory", "storage", "tools"}
    assert all(s.healthy for s in status.services) and status.redis_ok
    assert {q.policy for q in status.queues} == {"fifo"} and status.llm.slots == 4


def test_status_reports_what_the_cores_decode_steps_cost(agent, kernel):
    """The step costs the LLM core learnt (padding and drafts choose by them; `make bench` prints them beside
    llama.cpp alone's): a one-sequence plain step at least, once a generation decoded a few tokens; and the steps it
    ran by kind (`make bench` prices them to show where a run's time went against its bound)."""
    agent.complete("Count: 1, 2, 3,", max_tokens=4)
    llm = kernel.status().llm
    costs = {(c.sequences, c.tokens_each): c.seconds for c in llm.step_costs}
    assert costs.get((1, 1), 0) > 0
    assert all(sequences >= 1 and each >= 1 and 0 < seconds < 60 for (sequences, each), seconds in costs.items())
    # and the steps it ran: its prompt's, then plain ones of one sequence (at least the three after the first token)
    prompt, plain = {t.sequences: t for t in llm.prompt_steps}, {t.sequences: t for t in llm.plain_steps}
    assert prompt[0].steps >= 1 and 0 < prompt[0].seconds < llm.decode_seconds
    assert plain[1].steps >= 3 and 0 < plain[1].seconds < llm.decode_seconds


def test_services_answer_standard_health_and_reflection(cluster):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for name, address in cluster.endpoints().items():
        if name == "gateway":  # HTTP: its health is GET /health (tests/integration/test_gateway.py)
            continue
        with grpc.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
            services = {s.name for s in reply.list_services_response.service}
            assert "grpc.health.v1.Health" in services and any(s.startswith("aios.v1.") for s in services), name
            v1 = channel.stream_stream(  # grpc.reflection.v1: the same messages under the v1 package name
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            reply = next(v1(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
            assert "grpc.reflection.v1.ServerReflection" in {s.name for s in reply.list_services_response.service}
