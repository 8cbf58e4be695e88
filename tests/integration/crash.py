"""Killing a manager with SIGKILL while agents write to it through the kernel, and restarting it at once (as the
supervisor of `aios up` does): the writes caught by the kill are retried by the kernel with their request ids."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

import aios
from deploy.cluster import Cluster
from tests.integration.waiting import wait_until


@dataclass
class CrashRun:
    acknowledged: dict[str, Any] = field(default_factory=dict)  # what each acknowledged write stored, by id/key
    refused: list[grpc.StatusCode] = field(default_factory=list)  # status codes of writes that failed
    at_kill: int = 0  # writes acknowledged when the service was killed


def writes_across_kill_9(
    cluster: Cluster, service: str, write: Callable[[int, int], tuple[str, Any]], before: int, after: int = 50
) -> CrashRun:
    """Four writers call write(writer, i) -> (id, value) in a loop. Once `before` writes are acknowledged the
    service gets SIGKILL mid-stream and restarts on its address; the run ends once `after` more writes were
    acknowledged."""
    run = CrashRun()
    stop = threading.Event()

    def writer(number: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                key, value = write(number, i)
                run.acknowledged[key] = value
            except aios.SyscallError as error:
                run.refused.append(error.code)
            i += 1

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(run.acknowledged) >= before, within_s=60, what=f"{before} acknowledged writes")
        cluster.stop_service(service, signal.SIGKILL)
        run.at_kill = len(run.acknowledged)
        cluster.restart_service(service)
        wait_until(lambda: len(run.acknowledged) >= run.at_kill + after, within_s=60,
                   what="writes acknowledged after the restart")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    return run
