"""`aios top`'s view (deploy/top.py) without a kernel: rates from two statuses, keys, filter, order."""

from __future__ import annotations

from rich.console import Console

from aios.v1 import kernel_pb2
from deploy.top import TopView


def status(tokens: dict[str, int], queued: dict[str, int] | None = None, done: int = 0) -> kernel_pb2.KernelStatus:
    queued = queued or {}
    return kernel_pb2.KernelStatus(
        agents=len(tokens), tokens_generated=sum(tokens.values()),
        queues=[kernel_pb2.QueueStatus(resource=1, policy="fair", completed=done, capacity=16)],
        activity=[kernel_pb2.AgentActivity(agent_id=f"agt-{name}", name=name, tokens_generated=n,
                                           queued=queued.get(name, 0)) for name, n in tokens.items()])


def shown(view: TopView) -> str:
    console = Console(width=200, record=True, file=open("/dev/null", "w"))
    console.print(view.render())
    return console.export_text()


def test_rates_come_from_two_statuses_and_the_busiest_agent_comes_first():
    view = TopView(kernel="k:1")
    view.update(status({"alice": 100, "bob": 0}, done=10), now=100.0)
    assert [row.tokens_per_s for row in view.agents()] == [None, None]  # one sample: no rate yet
    view.update(status({"alice": 150, "bob": 400}, queued={"alice": 3}, done=30), now=102.0)
    rows = view.agents()
    assert [(r.activity.name, r.tokens_per_s) for r in rows] == [("alice", 25.0), ("bob", 200.0)]
    text = shown(view)
    assert "10.0 syscalls/s" in text and "225.0 tok/s" in text and "alice" in text


def test_keys_sort_filter_pause_and_quit():
    view = TopView(kernel="k:1")
    view.update(status({"alice": 1, "bob": 2, "carol": 3}), now=1.0)
    for key in "s":  # busy -> tokens
        view.key(key)
    assert view.sort == "tokens" and [r.activity.name for r in view.agents()] == ["carol", "bob", "alice"]
    for key in "/bo\r":
        view.key(key)
    assert view.filter == "bo" and [r.activity.name for r in view.agents()] == ["bob"]
    for key in "/x\x1b":  # Escape clears the filter
        view.key(key)
    assert view.filter == "" and len(view.agents()) == 3
    view.key("p")
    view.update(status({"alice": 99}), now=2.0)
    assert len(view.agents()) == 3 and "PAUSED" in shown(view)  # paused: the screen keeps what it showed
    view.key("p")
    view.key("q")
    assert view.quit


def test_an_agents_name_is_shown_as_text_not_as_markup_or_terminal_control():
    view = TopView(kernel="k:1")
    view.update(status({"[/x] [link=http://evil]click[/link] \x1b[2J": 5}), now=1.0)
    text = shown(view)  # a name that is Rich markup would raise here; ESC would clear the operator's screen
    assert "[/x] [link=http://evil]click[/link] ?[2J" in text and "\x1b" not in text
