"""The supervisor's decisions: restart with a growing backoff, and a crash loop reported, not restarted forever.

`ScriptedSystem` is a test double for the processes (deploy.cluster.Cluster): what is tested here is when the
supervisor restarts and when it gives up, on a fake clock; real restarts of real processes are in
tests/integration/test_cli.py."""

from __future__ import annotations

import signal

from deploy.supervisor import RestartPolicy, ServiceState, Supervisor, exit_description


class ScriptedSystem:
    def __init__(self) -> None:
        self.pids = {"memory": 100, "llm_core": 200}
        self.dead: dict[str, int] = {}
        self.restarted: list[str] = []
        self.fail_starts = 0

    def exited(self) -> dict[str, int]:
        return dict(self.dead)

    def restart_service(self, name: str) -> str:
        if self.fail_starts:
            self.fail_starts -= 1
            raise RuntimeError("did not start within 120 s")
        self.dead.pop(name, None)
        self.pids[name] += 1
        self.restarted.append(name)
        return "127.0.0.1:5000"

    def pid_of(self, name: str) -> int:
        return self.pids[name]

    def keep_standbys(self) -> bool:
        return False  # no standbys in these scripts


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(policy: RestartPolicy = RestartPolicy(first_delay_s=1, burst=3, interval_s=60)):
    system, clock, said, changes = ScriptedSystem(), Clock(), [], []
    supervisor = Supervisor(system, ["memory", "llm_core"], policy, say=said.append,
                            on_change=lambda: changes.append(1), clock=clock)
    return supervisor, system, clock, said, changes


def test_a_killed_service_is_restarted_after_its_backoff_and_the_restart_is_recorded():
    supervisor, system, clock, said, changes = make()
    system.dead["memory"] = -signal.SIGKILL
    supervisor.tick()
    record = supervisor.services["memory"]
    assert record.state is ServiceState.BACKING_OFF and record.last_exit == "killed by SIGKILL"
    assert system.restarted == [] and "restarting it in 1.0 s" in said[-1]
    clock.now += 1.0
    supervisor.tick()
    assert system.restarted == ["memory"] and record.state is ServiceState.RUNNING
    assert (record.restarts, record.pid) == (1, 101) and changes
    assert supervisor.as_json()["memory"]["restarts"] == 1
    assert supervisor.services["llm_core"].restarts == 0  # the others untouched


def test_the_backoff_doubles_and_a_crash_loop_is_reported_not_restarted():
    supervisor, system, clock, said, _ = make()
    delays = []
    for _ in range(3):
        system.dead["memory"] = 1
        supervisor.tick()
        delays.append(supervisor.services["memory"].restart_at - clock.now)
        clock.now += delays[-1]
        supervisor.tick()
    assert delays == [1, 2, 4]
    system.dead["memory"] = 1
    supervisor.tick()  # the fourth exit within 60 s
    assert supervisor.services["memory"].state is ServiceState.FAILED and "crash loop" in said[-1]
    clock.now += 3600
    supervisor.tick()
    assert system.restarted == ["memory"] * 3


def test_exits_spread_out_are_not_a_loop_and_a_failed_start_counts_as_an_exit():
    supervisor, system, clock, said, _ = make()
    for _ in range(5):  # five crashes, each more than a minute apart: restarted every time
        system.dead["llm_core"] = 1
        supervisor.tick()
        clock.now += 61
        supervisor.tick()
    assert system.restarted == ["llm_core"] * 5
    system.dead["llm_core"], system.fail_starts = 1, 1
    supervisor.tick()
    clock.now += 1
    supervisor.tick()
    record = supervisor.services["llm_core"]
    assert record.state is ServiceState.BACKING_OFF and record.last_exit.startswith("restart failed")
    clock.now += 2
    supervisor.tick()
    assert record.state is ServiceState.RUNNING and record.restarts == 6


def test_exit_descriptions_read_as_people_say_them():
    assert exit_description(-9) == "killed by SIGKILL" and exit_description(3) == "exit code 3"
