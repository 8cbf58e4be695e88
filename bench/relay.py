"""The transport's own ceiling on this machine: bare grpc.aio, nothing of AIOS.

A syscall through AIOS crosses two gRPC hops (agent -> kernel -> manager). This
measures the same two hops with nothing behind them: an echo server (the
standard health service's Check) behind a relay that forwards each call to it,
each its own process, the client as the scale part's (one asyncio channel, many
callers): as many callers at once, and the same paced loads. What AIOS reaches
is read against it in the same run.

`python -m bench.relay echo PORT` / `python -m bench.relay relay PORT UPSTREAM` run the two servers.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.pacing import latency_ms, pace
from deploy.cluster import free_port
from services.server import MAX_PENDING_CALLS


class Echo(health_pb2_grpc.HealthServicer):
    async def Check(self, request, context):
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class Relay(health_pb2_grpc.HealthServicer):
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.stub: health_pb2_grpc.HealthStub | None = None

    async def Check(self, request, context):
        if self.stub is None:  # the channel belongs to the server's event loop
            self.stub = health_pb2_grpc.HealthStub(grpc.aio.insecure_channel(self.upstream))
        return await self.stub.Check(request)


async def serve(servicer: health_pb2_grpc.HealthServicer, port: int) -> None:
    server = grpc.aio.server(options=[("grpc.server.max_pending_requests", MAX_PENDING_CALLS),  # as AIOS's servers
                                      ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()


@contextmanager
def relay_servers() -> Iterator[str]:
    """An echo server behind a relay, each its own process; yields the relay's address."""
    echo_port, relay_port = free_port(), free_port()
    processes = []
    try:
        for args in (["echo", str(echo_port)], ["relay", str(relay_port), f"127.0.0.1:{echo_port}"]):
            process = subprocess.Popen([sys.executable, "-m", "bench.relay", *args], stdout=subprocess.PIPE, text=True)
            processes.append(process)
            assert process.stdout is not None and process.stdout.readline().strip() == "serving"
        yield f"127.0.0.1:{relay_port}"
    finally:
        for process in processes:
            process.terminate()
            process.wait()


async def relay_load(address: str, callers: int, calls_each: int, paced_counts: list[int], seconds: float
                     ) -> dict[str, Any]:
    """On one channel, as the scale part's client: `callers` callers at once, each making `calls_each` calls one after
    another (calls/s), then per count of `paced_counts` that many callers paced at one call a second for `seconds`
    (bench/pacing.py; p50/p99 from each call's due time)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest())

        async def caller() -> None:
            for _ in range(calls_each):
                await stub.Check(health_pb2.HealthCheckRequest())

        started = time.monotonic()
        await asyncio.gather(*(caller() for _ in range(callers)))
        result: dict[str, Any] = {"calls_per_s": callers * calls_each / (time.monotonic() - started), "paced": {}}
        for n in paced_counts:
            latencies: list[float] = []

            async def call(i: int, due: float) -> None:
                await stub.Check(health_pb2.HealthCheckRequest())
                latencies.append(time.monotonic() - due)

            wall = await pace(n, seconds, call)
            result["paced"][str(n)] = {"calls_per_s": len(latencies) / wall, **latency_ms(latencies)}
        return result


def relay_bench(callers: int, calls_each: int, paced_counts: list[int], seconds: float,
                run: Callable[[Any], Any] = asyncio.run) -> dict[str, Any]:
    """The bare two-hop gRPC relay on this machine under the scale part's loads (`run` runs the client's coroutine):
    its calls/s with `callers` at once, and its p50/p99 paced (see relay_load)."""
    with relay_servers() as address:
        return run(relay_load(address, callers, calls_each, paced_counts, seconds))


if __name__ == "__main__":
    role, port = sys.argv[1], int(sys.argv[2])
    asyncio.run(serve(Echo() if role == "echo" else Relay(sys.argv[3]), port))
