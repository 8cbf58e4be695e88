"""Reading an agent's generation in a thread while the test does something to the system (kills, drains)."""

from __future__ import annotations

import threading

import aios


def stream_in_thread(agent: aios.Agent, chunks: list, prompt: str, max_tokens: int, **sampling) -> threading.Thread:
    """Starts reading `agent`'s generation of exactly `max_tokens` tokens into `chunks`, as they arrive."""

    def read() -> None:
        for chunk in agent.generate(prompt, max_tokens=max_tokens, ignore_eos=True, timeout=300, **sampling):
            chunks.append(chunk)

    thread = threading.Thread(target=read)
    thread.start()
    return thread


def token_ids(chunks: list) -> list[int]:
    return [c.token_id for c in chunks if c.HasField("token_id")]
