"""`make run`'s demo: five agents work concurrently, every syscall through the kernel.

Four use the AIOS SDK; the fifth is written with the `openai` package and reaches
the same kernel through the OpenAI-compatible gateway. Each SDK agent remembers a fact (memory), keeps a note (storage), asks the
calculator (tools) and then asks the model (LLM, streamed) with what it gathered.
The demo registers them with the operator token `aios up` wrote; each agent then
calls with its own token, and one agent's notes stay closed to another until
their owner grants them.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field

import aios


@dataclass
class Task:
    name: str
    fact: str
    expression: str
    question: str
    report: list[str] = field(default_factory=list)
    syscalls: int = 0
    tokens: int = 0
    agent: aios.Agent | None = None


TASKS = [
    Task("travel-planner", "The trip is 3 days in Lisbon.", "3 * 120 + 45", "Suggest one thing to do in Lisbon."),
    Task("math-tutor", "The student is learning multiplication.", "12 * 12", "Explain what 12 times 12 means."),
    Task("story-writer", "The story is about a lighthouse keeper.", "1850 + 25", "Write the first line of the story."),
    Task("grocery-helper", "The budget is 40 euros.", "40 - 3 * 7.5", "Name three cheap healthy foods."),
]


def run_agent(kernel: aios.Connection, task: Task) -> None:
    agent = task.agent = kernel.register(task.name)
    memory = agent.memory_add(task.fact, {"kind": "fact"})
    agent.storage_write(f"notes/{task.name}.txt", f"{task.fact} Started at {time.ctime()}.")
    result = agent.call_tool("calculator", expression=task.expression)["result"]
    recalled = agent.memory_get(memory.id).text
    note = agent.storage_read(f"notes/{task.name}.txt").decode()
    task.syscalls = 5
    prompt = [("system", f"{recalled} A calculation gave {task.expression} = {result}."), ("user", task.question)]
    pieces: list[str] = []
    for chunk in agent.generate(messages=prompt, max_tokens=64, temperature=0.6, top_k=40, top_p=0.95, seed=7):
        pieces.append(chunk.text)
        task.tokens = chunk.completion_tokens
    task.syscalls += 1
    answer = " ".join("".join(pieces).split())
    task.report = [
        f"memory  : {recalled!r} ({memory.id})",
        f"storage : {note[:60]!r}",
        f"tool    : {task.expression} = {result}",
        f"llm     : {answer[:220]!r} ({task.tokens} tokens)",
    ]


def show_isolation(reader: Task, owner: Task) -> list[str]:
    """One agent tries to read another's note: refused until the owner grants it."""
    assert reader.agent is not None and owner.agent is not None
    key = f"notes/{owner.name}.txt"
    print(f"\n[isolation] {reader.name} reads {owner.name}'s {key}:")
    try:
        reader.agent.storage_read(key, owner=owner.agent.id)
        return [f"{reader.name} read {owner.name}'s note without a grant"]
    except aios.SyscallError as refused:
        print(f"  without a grant: {refused.code.name} ({refused.message})")
    owner.agent.storage_grant(reader.agent.id, key)
    print(f"  after {owner.name} grants it: {reader.agent.storage_read(key, owner=owner.agent.id).decode()[:60]!r}")
    return []


def run_openai_agent(kernel: aios.Connection, task: Task) -> None:
    """An agent written with the `openai` package, unchanged but for base_url, api_key and model: through the
    gateway, each request is this agent's syscall in the same kernel as the others."""
    import openai

    agent = task.agent = kernel.register(task.name)
    client = openai.OpenAI(base_url=aios.default_openai_base_url(), api_key=agent.token, max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": task.fact}, {"role": "user", "content": task.question}],
        max_tokens=48, temperature=0.6, seed=7, stream=True, stream_options={"include_usage": True})
    pieces = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            task.tokens = chunk.usage.completion_tokens
    weather = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the weather in Lisbon?"}], temperature=0,
        max_tokens=60, parallel_tool_calls=False, tool_choice="required",
        tools=[{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
    call = weather.choices[0].message.tool_calls[0].function
    task.syscalls = 2
    answer = " ".join("".join(pieces).split())
    task.report = [
        f"openai  : {answer[:220]!r} ({task.tokens} tokens, model {model}, streamed over the gateway)",
        f"tool    : the model called {call.name}({call.arguments}) (grammar-constrained)",
    ]


OPENAI_TASK = Task("openai-sdk-agent", "You are a concise travel guide.", "", "Name one museum in Lisbon.")


def main() -> int:
    kernel = aios.connect()
    print(f"demo: {len(TASKS)} SDK agents and one OpenAI-client agent on the kernel at {kernel.address}", flush=True)
    start = time.monotonic()
    errors: list[str] = []

    def guarded(task: Task) -> None:
        try:
            (run_openai_agent if task is OPENAI_TASK else run_agent)(kernel, task)
        except Exception as exc:  # noqa: BLE001 - the demo reports every agent's failure
            errors.append(f"{task.name}: {exc}")

    threads = [threading.Thread(target=guarded, args=(t,)) for t in [*TASKS, OPENAI_TASK]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.monotonic() - start
    for task in [*TASKS, OPENAI_TASK]:
        print(f"\n[{task.name}]")
        for line in task.report:
            print(f"  {line}")
    if not errors:
        errors += show_isolation(TASKS[0], TASKS[1])
    status = kernel.status()
    tokens = sum(t.tokens for t in [*TASKS, OPENAI_TASK])
    print(
        f"\nsummary: {len(TASKS) + 1} agents, {sum(t.syscalls for t in [*TASKS, OPENAI_TASK])} syscalls "
        f"(kernel total {status.syscalls_total}, failed {status.syscalls_failed}), "
        f"{tokens} tokens generated, wall time {wall:.2f} s ({tokens / wall:.1f} tok/s aggregate)"
    )
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    kernel.close()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
