"""A pytest plugin for testing agents against a real AIOS (installed with the SDK; pytest loads it by itself).

Fixtures:

- `aios_system` (once per session): a whole AIOS, as `aios up` runs it (Redis, the kernel, an LLM core with the
  model, memory, storage, tools, the OpenAI-compatible gateway) in a temporary home; at the end every process is
  stopped and the home deleted. Options (command line, or the same names with `_` in pytest's ini):
  `--aios-policy` (fifo, rr, priority, fair), `--aios-slots`, `--aios-model` (a GGUF path; default the bundled one),
  `--aios-backend instant` (a test double that returns tokens without running a model: for tests of an agent's
  plumbing, not of what the model says).
- `aios_agent`: a freshly registered agent for each test (`aios.Agent`, named after the test).
- `aios_openai`: an `openai.OpenAI` client at the gateway whose API key is a fresh agent's token (`.agent` on it).

On `aios_system`: `syscalls(agent, kind)` (the kernel's records of an agent's latest syscalls) and
`assert_ran(agent, kind)`, which checks that the agent's latest syscall of that kind was queued, dispatched and
finished, and returns its record.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

import aios
from aios.v1 import common_pb2, kernel_pb2

if TYPE_CHECKING:
    from deploy.cluster import Cluster

OPTIONS = {  # option: help
    "policy": "scheduling policy of the kernel: fifo, rr, priority or fair (default fifo)",
    "slots": "generations the LLM core decodes at once (default 4)",
    "model": "GGUF model path (default: the bundled Gemma 3 270M)",
    "backend": "'instant': a test double that returns tokens without running a model (default: the model)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("aios", "AIOS: the aios_system fixture")
    for name, help_text in OPTIONS.items():
        group.addoption(f"--aios-{name}", dest=f"aios_{name}", help=help_text)
        parser.addini(f"aios_{name}", help_text)


def _option(config: pytest.Config, name: str) -> str:
    return config.getoption(f"aios_{name}") or config.getini(f"aios_{name}") or ""


class AiosSystem:
    """A running AIOS for tests, with the operator's connection."""

    def __init__(self, cluster: "Cluster") -> None:
        self.cluster = cluster
        self.kernel_address = cluster.kernel_address
        self.openai_base_url = cluster.openai_base_url
        self.operator = cluster.connect()

    def register(self, name: str, **options: Any) -> aios.Agent:
        """A new agent (options: priority, weight, quota ... as `aios.Connection.register` takes them)."""
        return self.operator.register(name, **options)

    def syscalls(self, agent: aios.Agent, kind: str = "", limit: int = 100) -> list[common_pb2.SyscallInfo]:
        """The kernel's records of `agent`'s latest syscalls (of `kind`, e.g. "tool_call"), newest first."""
        reply = self.operator.call("ListSyscalls", kernel_pb2.ListSyscallsRequest(agent_id=agent.id, kind=kind,
                                                                                  limit=limit))
        return list(reply.syscalls)

    def assert_ran(self, agent: aios.Agent, kind: str) -> common_pb2.SyscallInfo:
        """The record of `agent`'s latest syscall of `kind`, after checking that the kernel queued it, dispatched
        it to its resource and that it finished done."""
        records = self.syscalls(agent, kind, limit=1)
        assert records, f"agent {agent.name!r} made no {kind} syscall that the kernel keeps"
        record = records[0]
        state = common_pb2.SyscallState.Name(record.state)
        assert record.state == common_pb2.SYSCALL_STATE_DONE, \
            f"{kind} {record.id} of {agent.name!r} is {state}: {record.error_code} {record.error}"
        assert record.created_at <= record.started_at <= record.finished_at, \
            f"{kind} {record.id} was not dispatched from its queue before it finished"
        return record

    def close(self) -> None:
        self.operator.close()


@pytest.fixture(scope="session")
def aios_system(request: pytest.FixtureRequest) -> Iterator[AiosSystem]:
    from deploy.cluster import Cluster, ClusterConfig

    config = request.config
    home = Path(tempfile.mkdtemp(prefix="aios-pytest-"))
    options: dict[str, Any] = {"home": home, "slots": int(_option(config, "slots") or 4)}
    if _option(config, "policy"):
        options["policy"] = _option(config, "policy")
    if _option(config, "model"):
        options["model"] = Path(_option(config, "model"))
    if _option(config, "backend") == "instant":
        options["extra_args"] = {"llm_core": ["--backend", "instant"]}
    try:
        with Cluster(ClusterConfig(**options)) as cluster:
            system = AiosSystem(cluster)
            try:
                yield system
            finally:
                system.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def aios_agent(aios_system: AiosSystem, request: pytest.FixtureRequest) -> aios.Agent:
    return aios_system.register(request.node.name[:64])


@pytest.fixture
def aios_openai(aios_system: AiosSystem, request: pytest.FixtureRequest) -> Any:
    import openai

    agent = aios_system.register(request.node.name[:64])
    client = openai.OpenAI(base_url=aios_system.openai_base_url, api_key=agent.token, max_retries=0, timeout=120)
    client.agent = agent  # type: ignore[attr-defined]
    yield client
    client.close()
