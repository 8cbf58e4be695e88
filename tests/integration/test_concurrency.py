"""Four agents at once: each gets its own, correct answers and sees only its own data."""

from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

import aios
from tests.integration.waiting import wait_until


def agent_session(kernel: aios.Connection, index: int) -> dict:
    agent = kernel.register(f"concurrent-{index}")
    start = 100 * (index + 1)
    prompt = ", ".join(str(start + i) for i in range(5)) + ","
    entry = agent.memory_add(f"agent {index} remembers {start}")
    agent.storage_write("result", str(start))
    text = agent.complete(prompt, max_tokens=12).text
    return {
        "agent": agent,
        "entry": entry,
        "expected_next": str(start + 5),
        "text": text,
        "sum": agent.call_tool("calculator", expression=f"{start} + {index}")["result"],
        "stored": agent.storage_read("result").decode(),
        "memories": [e.text for e in agent.memory_list()],
        "start": start,
        "index": index,
    }


def test_four_agents_concurrently_get_correct_separate_answers(kernel):
    with ThreadPoolExecutor(4) as pool:
        sessions = list(pool.map(lambda i: agent_session(kernel, i), range(4)))
    assert len({s["agent"].id for s in sessions}) == 4
    for s in sessions:
        # Each continues its own counting sequence (not a neighbour's, batched in the same decode).
        assert s["text"].split(",")[0].strip() == s["expected_next"], s["text"]
        assert s["sum"] == s["start"] + s["index"]
        assert s["stored"] == str(s["start"])
        assert s["memories"] == [f"agent {s['index']} remembers {s['start']}"]


def test_an_agent_cannot_read_another_agents_memory(kernel):
    owner, other = kernel.register("owner"), kernel.register("other")
    entry = owner.memory_add("private")
    with pytest.raises(aios.SyscallError) as denied:
        other.memory_get(entry.id)
    assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
    owner.storage_write("diary", "mine")
    with pytest.raises(aios.SyscallError) as missing:
        other.storage_read("diary")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert other.storage_list() == []


def test_a_huge_request_is_refused_without_stalling_another_agents_stream(kernel):
    """30 MB of chat messages: refused before any work, while the neighbour's tokens keep coming."""
    import threading
    import time

    streamer, flooder = kernel.register("streamer"), kernel.register("flooder")
    stream = streamer.generate("Once upon a time", max_tokens=400, ignore_eos=True, timeout=120)
    next(stream)
    gaps: list[float] = []
    stop = threading.Event()

    def read() -> None:
        last = time.monotonic()
        for _ in stream:
            now = time.monotonic()
            gaps.append(now - last)
            last = now
            if stop.is_set():
                break

    reader = threading.Thread(target=read)
    reader.start()
    messages = [("user", "x" * 1024)] * 30_000
    started = time.monotonic()
    with pytest.raises(aios.SyscallError) as refused:
        flooder.complete(messages=messages, max_tokens=4)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "Shorten" in refused.value.message
    refused_after = time.monotonic() - started
    during = len(gaps)
    wait_until(lambda: len(gaps) >= during + 5, within_s=60, what="the neighbour's tokens after the refusal")
    stop.set()
    reader.join(timeout=120)
    stream.close()
    assert refused_after < 10, refused_after
    # Across the refusal and after it, the neighbour's next token always came within 1 s.
    assert max(gaps) < 1.0, (during, max(gaps))
    too_long = [("user", "word " * 20_000)]  # 100 KB: under the kernel's cap, over what the context can hold
    with pytest.raises(aios.SyscallError) as refused:
        flooder.complete(messages=too_long, max_tokens=4)
    assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "characters" in refused.value.message
