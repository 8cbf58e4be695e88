"""The benchmark workload: ReAct-shaped agent loops, identical in every mode.

Each agent runs K rounds of: an LLM call on a growing context (a shared system
prompt with the tool list, the agent's task, and its history so far), then a
memory syscall (store the thought) and a tool syscall (a calculator action).
The history grows by a fixed observation each round, so prompts are the same
in every mode whatever the model generates; generations run exactly
`max_tokens` (ignore_eos) so every mode generates the same number of tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM = (
    "System: You are an agent running on AIOS, an operating system for LLM agents. Think step by step. "
    "Each turn write a Thought, then one Action, then wait for the Observation. Available tools:\n"
    "- calculator(expression): evaluates arithmetic such as (12 + 30) * 2 and returns the number.\n"
    "- clock(timezone): returns the current date and time in an IANA timezone such as Europe/Paris.\n"
    "- memory_add(text): stores a note in your working memory; memory_search(query) finds notes.\n"
    "- storage_write(key, data) and storage_read(key): durable records that survive restarts.\n"
    "Answer with Final Answer: when the task is done. Be concise and accurate.\n"
)

WORDS = (
    "river mountain signal engine harbor ledger orbit canyon lantern meadow circuit compass glacier "
    "market tunnel beacon archive prism ember valley quarry summit pixel vector kernel thread socket "
    "packet buffer cache index schema column record window shadow mirror garden bridge castle forest "
    "island desert ocean planet comet nebula crystal copper silver marble granite timber cotton paper "
    "ink clock minute season winter summer autumn spring morning evening north south east west"
).split()


@dataclass(frozen=True)
class Call:
    """One LLM call of one agent round."""

    agent: int
    round: int
    prompt: str
    max_tokens: int
    a: int
    b: int  # the calculator action: a * b


def observation(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def plan(n_agents: int, rounds: int, seed: int, tag: str) -> list[list[Call]]:
    """calls[agent][round]. Contexts grow from ~150 to ~600 tokens; 32-128 tokens generated per call."""
    agents: list[list[Call]] = []
    for agent in range(n_agents):
        rng = random.Random(f"{seed}-{tag}-{agent}")
        history = f"Task ({tag} agent {agent}): investigate {observation(rng, 6)} and report the total.\n"
        calls = []
        for r in range(rounds):
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            calls.append(Call(agent, r, SYSTEM + history + "Thought:", rng.randint(32, 128), a, b))
            history += (
                f"Thought: I should compute {a} * {b} and check {observation(rng, 4)}.\n"
                f"Action: calculator({a} * {b})\nObservation: {a * b}. Notes: {observation(rng, 140)}\n"
            )
        agents.append(calls)
    return agents
