"""JSON log lines (services/server.py) and `aios logs` reading them (deploy/logs.py), on files in a temporary dir."""

from __future__ import annotations

import io
import json
import logging

from deploy.logs import LogFile, log_files, show
from services.scheduler.syscalls import Resource, SyscallRecord, about
from services.server import JsonLines


def logged(service: str, *events: tuple[int, str, dict]) -> str:
    """What a service's logger writes for `events` (level, message, extra) through JsonLines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonLines(service))
    logger = logging.getLogger(f"test.{service}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        for level, message, extra in events:
            logger.log(level, message, extra=extra)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_an_event_is_one_json_line_naming_its_service_syscall_and_agent():
    record = SyscallRecord("sc-1", "agt-1", "memory_add", Resource.MEMORY)
    line = json.loads(logged("memory_2", (logging.WARNING, 'quote " and\nnewline', about(record))))
    assert line["service"] == "memory_2" and line["level"] == "WARNING" and line["message"] == 'quote " and\nnewline'
    assert line["syscall_id"] == "sc-1" and line["agent_id"] == "agt-1" and line["ts"].endswith("+00:00")


def test_aios_logs_merges_services_by_time_filters_and_follows_new_lines(tmp_path):
    kernel = logged("kernel", (logging.INFO, "kernel starts", {}),
                    (logging.WARNING, "about sc-7", {"syscall_id": "sc-7", "agent_id": "agt-7"}))
    memory = logged("memory", (logging.INFO, "memory starts", {}))
    (tmp_path / "kernel.log").write_text(kernel)
    (tmp_path / "memory.log").write_text(memory + "llama.cpp says something plain\n")
    (tmp_path / "memory_2.log").write_text("")
    assert [f.source for f in log_files(tmp_path, "memory")] == ["memory", "memory_2"]

    printed: list[str] = []
    show(log_files(tmp_path), printed.append, tail=-1, follow=False, as_json=False)
    assert [line.split(None, 2)[1] for line in printed] == ["kernel", "kernel", "memory", "memory"]
    assert "about sc-7  [syscall=sc-7 agent=agt-7]" in printed[1] and printed[3].endswith("llama.cpp says something plain")

    only: list[str] = []
    show(log_files(tmp_path), only.append, tail=-1, follow=False, as_json=True, syscall="sc-7")
    assert [json.loads(line)["message"] for line in only] == ["about sc-7"]

    # Following: a line half written is not shown until its end arrives.
    follower = LogFile(tmp_path / "kernel.log")
    assert len(follower.read_new()) == 2
    with (tmp_path / "kernel.log").open("a") as f:
        f.write('{"ts": "2099-01-01T00:00:00.000+00:00", "service": "kernel", "level": "INFO", "mess')
    assert follower.read_new() == []
    with (tmp_path / "kernel.log").open("a") as f:
        f.write('age": "later"}\n')
    assert [line.event["message"] for line in follower.read_new()] == ["later"]


def test_a_message_cannot_pass_for_another_line_or_move_the_cursor(tmp_path):
    hostile = "name\u2028{\"service\": \"kernel\", \"message\": \"forged\"}\u0085\x1b[2J"
    (tmp_path / "kernel.log").write_text(logged("kernel", (logging.WARNING, f"refused {hostile}", {})))
    printed: list[str] = []
    show(log_files(tmp_path), printed.append, tail=-1, follow=False, as_json=False)
    assert len(printed) == 1 and "\x1b" not in printed[0] and "\u2028" not in printed[0]
    assert "\\u2028" in printed[0] and "\\x1b" in printed[0]
