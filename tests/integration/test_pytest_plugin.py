"""The SDK's pytest plugin (sdk/aios/pytest_plugin.py) as an agent author uses it: a test suite of their own, run by
pytest in its own process, with the plugin loaded from its entry point (not imported by the suite)."""

from __future__ import annotations

import tempfile
from pathlib import Path

pytest_plugins = ["pytester"]

USERS_SUITE = '''
def test_my_agent_remembers_and_computes(aios_system, aios_agent):
    aios_agent.memory_add("the answer is 42")
    assert aios_agent.call_tool("calculator", expression="6*7")["result"] == 42
    record = aios_system.assert_ran(aios_agent, "tool_call")
    assert record.agent_id == aios_agent.id and record.kind == "tool_call"


def test_my_openai_agent(aios_openai):
    model = aios_openai.models.list().data[0].id
    reply = aios_openai.chat.completions.create(model=model, max_tokens=8,
                                                 messages=[{"role": "user", "content": "Say hi."}])
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens >= 1


def test_a_failing_expectation_is_reported(aios_system, aios_agent):
    aios_agent.memory_add("no tool call here")
    aios_system.assert_ran(aios_agent, "tool_call")
'''


def homes() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("aios-pytest-*"))


def processes_using(fragment: str) -> list[int]:
    """Pids of the processes whose command line holds `fragment` (a home's name prefix: every service's does)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if fragment in cmdline.read_bytes().decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return found


def test_a_users_suite_gets_a_whole_aios_once_and_it_leaves_nothing_behind(pytester):
    before, running = homes(), set(processes_using("aios-pytest-"))  # this session's own AIOS may run meanwhile
    pytester.makepyfile(test_users_agent=USERS_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--aios-backend", "instant", timeout=600)
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*made no tool_call syscall that the kernel keeps*"])
    assert homes() == before  # the temporary home is gone ...
    assert set(processes_using("aios-pytest-")) <= running  # ... and so is every process that ran from it
