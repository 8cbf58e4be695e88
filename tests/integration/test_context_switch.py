"""Context switching across real LLM core processes sharing a real Redis.

The contract: a generation preempted on one core and resumed (in another slot,
or on a second core process) yields exactly the tokens of a run that was never
interrupted. Both sides decode the sequence alone (same batch shape).
"""

from __future__ import annotations

from typing import Iterator

import grpc
import pytest
import redis

from aios.v1 import common_pb2, llm_core_pb2, llm_core_pb2_grpc
from deploy.cluster import Cluster, ClusterConfig
from services.llm_core.snapshot import snapshot_key
from tests.integration.waiting import wait_until

AGENT = "agt-contract"
PROMPT = "Question: Describe how a bicycle gear system works, step by step.\nAnswer:"


def sampling(sampled: bool) -> common_pb2.SamplingParams:
    if sampled:
        return common_pb2.SamplingParams(max_tokens=48, temperature=0.9, top_k=40, seed=99, ignore_eos=True)
    return common_pb2.SamplingParams(max_tokens=48, ignore_eos=True)


@pytest.fixture(scope="module")
def core_a(cluster: Cluster) -> Iterator[llm_core_pb2_grpc.LLMCoreStub]:
    with cluster.manager_channel("llm_core") as channel:  # acting as the kernel, with the cluster credential
        yield llm_core_pb2_grpc.LLMCoreStub(channel)


@pytest.fixture(scope="module")
def core_b(cluster: Cluster) -> Iterator[llm_core_pb2_grpc.LLMCoreStub]:
    """A second LLM core process on the same Redis, with the same slot layout."""
    cluster.add_replica("llm_core_b", "llm_core")
    try:
        with cluster.manager_channel("llm_core_b") as channel:
            yield llm_core_pb2_grpc.LLMCoreStub(channel)
    finally:
        cluster.stop_service("llm_core_b")


def generate(stub, syscall_id: str, prompt: str = "", sampled: bool = False, resume: bool = False, agent: str = AGENT):
    if resume:
        request = llm_core_pb2.GenerateRequest(agent_id=agent, syscall_id=syscall_id, resume=True)
    else:
        request = llm_core_pb2.GenerateRequest(agent_id=agent, syscall_id=syscall_id, prompt=prompt, sampling=sampling(sampled))
    return stub.Generate(request, timeout=120)


def read(stream, stop_after: int | None = None) -> tuple[list[int], list[int], llm_core_pb2.GenerateChunk]:
    """Token ids and slots until the stream ends (or `stop_after` tokens); plus the last chunk."""
    tokens, slots = [], []
    for chunk in stream:
        if chunk.HasField("token_id"):
            tokens.append(chunk.token_id)
            slots.append(chunk.slot)
            if stop_after is not None and len(tokens) == stop_after:
                return tokens, slots, chunk
        if chunk.finish_reason:
            return tokens, slots, chunk
    raise AssertionError("stream ended without a finish reason")


def preempt_midway(stub, syscall_id: str, prompt: str, sampled: bool, swap_out: bool) -> tuple[list[int], int]:
    stream = generate(stub, syscall_id, prompt, sampled)
    first, slots, _ = read(stream, stop_after=16)
    assert stub.Preempt(llm_core_pb2.PreemptRequest(syscall_id=syscall_id, swap_out=swap_out), timeout=10).preempted
    more, more_slots, last = read(stream)
    assert last.finish_reason == llm_core_pb2.FINISH_REASON_PREEMPTED
    return first + more, slots[0]


def wait_idle(stub) -> llm_core_pb2.InfoResponse:
    """Info once no slot decodes: every failure and cancellation must give its slot back."""

    def idle() -> llm_core_pb2.InfoResponse | None:
        info = stub.Info(llm_core_pb2.InfoRequest(), timeout=5)
        return info if info.slots_busy == 0 and info.waiting == 0 else None

    return wait_until(idle, what="no busy slot")


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "seeded-sampling"])
def test_resume_on_a_second_core_process_is_token_identical(core_a, core_b, cluster, sampled):
    prompt = PROMPT + (" (sampled)" if sampled else "")
    expected, _, _ = read(generate(core_b, f"ref-{sampled}", prompt, sampled))

    before, _ = preempt_midway(core_a, f"xproc-{sampled}", prompt, sampled, swap_out=True)
    ttl = redis.Redis.from_url(cluster.redis_url).pttl(snapshot_key(f"xproc-{sampled}"))
    assert 0 < ttl <= 600_000  # one key per generation, with a TTL

    after, _, last = read(generate(core_b, f"xproc-{sampled}", resume=True))
    assert last.finish_reason == llm_core_pb2.FINISH_REASON_LENGTH
    assert before + after == expected
    assert wait_idle(core_b).snapshots_restored >= 1
    assert wait_idle(core_a).slots_parked == 0


def test_a_swapped_out_generation_resumes_identically_on_its_own_core(core_a, core_b):
    """(Restoring into a different seq_id than it left from: tests/unit/test_llm_engine.py.)"""
    prompt = "Question: List the planets of the solar system in order.\nAnswer:"
    expected, _, _ = read(generate(core_b, "ref-slot", prompt))
    saved = wait_idle(core_a).snapshots_saved
    before, _ = preempt_midway(core_a, "same-core", prompt, False, swap_out=True)
    assert wait_idle(core_a).snapshots_saved == saved + 1
    after, _, _ = read(generate(core_a, "same-core", resume=True))
    assert before + after == expected


def packed(chunks: list[llm_core_pb2.GenerateChunk], before: int = 0) -> tuple[list[int], list[tuple[int, str]]]:
    """How many tokens each token chunk carried, and every token's (id, text) in order, checking each chunk's count
    (`before`: tokens the generation had when this stream began)."""
    sizes, tokens = [], []
    for chunk in chunks:
        carried = [(chunk.token_id, chunk.text)] if chunk.HasField("token_id") else \
            list(zip(chunk.token_ids, chunk.token_texts))
        if carried:
            assert len(chunk.token_ids) in (0, len(chunk.token_texts)) and chunk.text == "".join(t for _, t in carried)
            sizes.append(len(carried))
            tokens += carried
            assert chunk.completion_tokens == before + len(tokens)
    return sizes, tokens


def test_tokens_packed_several_per_chunk_are_the_tokens_of_a_stream_one_by_one_across_a_move(core_a, core_b):
    """GenerateRequest.tokens_per_chunk: each stream's first token alone (time to first token), then up to that many
    per chunk; what the core holds back comes before the preempted chunk and before the summary."""
    prompt = "Question: Name three rivers of Europe and where they flow.\nAnswer:"
    reference = list(generate(core_b, "ref-packed", prompt))
    request = llm_core_pb2.GenerateRequest(agent_id=AGENT, syscall_id="packed", prompt=prompt,
                                           sampling=sampling(False), tokens_per_chunk=5)
    stream = core_a.Generate(request, timeout=120)
    before = [next(stream) for _ in range(3)]
    assert core_a.Preempt(llm_core_pb2.PreemptRequest(syscall_id="packed", swap_out=True), timeout=10).preempted
    before += list(stream)
    assert before[-1].finish_reason == llm_core_pb2.FINISH_REASON_PREEMPTED
    resume = llm_core_pb2.GenerateRequest(agent_id=AGENT, syscall_id="packed", resume=True, tokens_per_chunk=5)
    after = list(core_b.Generate(resume, timeout=120))
    assert after[-1].finish_reason == llm_core_pb2.FINISH_REASON_LENGTH and after[-1].completion_tokens == 48

    sizes_before, tokens_before = packed(before)
    sizes_after, tokens_after = packed(after, len(tokens_before))
    for sizes in (sizes_before, sizes_after):
        assert sizes[0] == 1 and all(size == 5 for size in sizes[1:-1]) and 1 <= sizes[-1] <= 5
    assert len(sizes_after) > 2  # the resumed stream packed too
    assert [id for id, _ in tokens_before + tokens_after] == [c.token_id for c in reference if c.HasField("token_id")]
    assert "".join(text for _, text in tokens_before + tokens_after) == "".join(c.text for c in reference)


def test_a_lazily_parked_generation_resumes_without_a_snapshot(core_a, core_b):
    prompt = "Question: Why is the sky blue? Explain for a child.\nAnswer:"
    expected, _, _ = read(generate(core_b, "ref-lazy", prompt))
    saved = wait_idle(core_a).snapshots_saved
    before, slot = preempt_midway(core_a, "lazy", prompt, False, swap_out=False)
    assert wait_idle(core_a).slots_parked == 1
    after, slots, _ = read(generate(core_a, "lazy", resume=True))
    assert before + after == expected and slots[0] == slot
    info = wait_idle(core_a)
    assert info.snapshots_saved == saved and info.resumes_resident >= 1 and info.slots_parked == 0


def test_resuming_what_cannot_be_resumed_is_refused_clearly_and_leaks_no_slot(core_a, core_b, cluster):
    with pytest.raises(grpc.RpcError) as missing:
        read(generate(core_a, "never-existed", resume=True))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND and "expired" in missing.value.details()

    preempt_midway(core_a, "owned", PROMPT, False, swap_out=True)
    with pytest.raises(grpc.RpcError) as foreign:
        read(generate(core_b, "owned", resume=True, agent="agt-intruder"))
    assert foreign.value.code() == grpc.StatusCode.PERMISSION_DENIED

    redis.Redis.from_url(cluster.redis_url).delete(snapshot_key("owned"))  # what the TTL does when it runs out
    with pytest.raises(grpc.RpcError) as expired:
        read(generate(core_b, "owned", resume=True))
    assert expired.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.RpcError) as mixed:
        read(core_a.Generate(llm_core_pb2.GenerateRequest(agent_id=AGENT, syscall_id="x", resume=True, prompt="hi")))
    assert mixed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not core_a.Preempt(llm_core_pb2.PreemptRequest(syscall_id="not-running"), timeout=5).preempted
    for stub in (core_a, core_b):
        info = wait_idle(stub)
        assert info.slots_parked == 0


def test_cancelling_a_stream_frees_its_slot_and_discard_drops_a_parked_one(core_a):
    stream = generate(core_a, "to-cancel", PROMPT)
    read(stream, stop_after=3)
    stream.cancel()  # one decode step after the engine sees it (tests/unit/test_llm_engine.py)
    wait_idle(core_a)

    preempt_midway(core_a, "to-discard", PROMPT + " Twice.", False, swap_out=False)
    assert wait_idle(core_a).slots_parked == 1
    reply = core_a.Discard(llm_core_pb2.DiscardRequest(syscall_id="to-discard", agent_id=AGENT), timeout=10)
    assert reply.discarded and wait_idle(core_a).slots_parked == 0


def test_with_redis_down_a_swapped_generation_still_resumes_on_its_own_core(tmp_path):
    with Cluster(ClusterConfig(home=tmp_path, slots=2)) as cluster:
        with cluster.manager_channel("llm_core") as channel:
            core = llm_core_pb2_grpc.LLMCoreStub(channel)
            expected, _, _ = read(generate(core, "ref", PROMPT))
            cluster.stop_service("redis")
            before, _ = preempt_midway(core, "no-redis", PROMPT, False, swap_out=True)
            info = wait_idle(core)
            assert not info.redis_ok and info.snapshots_saved == 0  # Redis refused it: kept in the core
            after, _, _ = read(generate(core, "no-redis", resume=True))
            assert before + after == expected
            with pytest.raises(grpc.RpcError) as gone:
                read(generate(core, "elsewhere", resume=True))
            assert gone.value.code() == grpc.StatusCode.UNAVAILABLE and "Redis" in gone.value.details()
            assert wait_idle(core).slots_busy == 0
