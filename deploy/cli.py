"""The `aios` command: up, down, status, model."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

import grpc

from deploy.cluster import (
    SERVICE_ORDER,
    Cluster,
    ClusterConfig,
    StartError,
    default_home,
    process_alive,
    read_endpoints,
    terminate_group,
)
from services.scheduler.policy import POLICIES


def _say(line: str) -> None:
    print(f"aios: {line}", flush=True)


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops `aios up` the same way Ctrl-C does."""
    raise KeyboardInterrupt


def cmd_up(args: argparse.Namespace) -> int:
    from services.llm_core.model import default_model_path

    home: Path = args.home
    if (home / "endpoints.json").exists():
        _say(f"an AIOS is already running from {home} (see `aios status`); stop it with `aios down`")
        return 1
    model = args.model or default_model_path(progress=True)
    extra = {"tools": [option for spec in args.mcp for option in ("--mcp", spec)],
             "memory": ["--ram-budget-bytes", str(args.memory_budget_bytes)] if args.memory_budget_bytes else []}
    config = ClusterConfig(home=home, redis_url=args.redis_url, model=model, slots=args.slots, policy=args.policy,
                           slice_tokens=args.slice_tokens, extra_args=extra)
    cluster = Cluster(config, progress=_say)
    _say(f"starting in {home} (logs in {home / 'logs'})")
    try:
        endpoints = cluster.start()
    except StartError as exc:
        _say(f"start failed: {exc}")
        return 1
    _say(f"kernel ready at {endpoints['kernel']}  (endpoints written to {cluster.endpoints_path})")
    if args.detach:
        _say("running in the background; `aios status` to inspect, `aios down` to stop")
        return 0
    _say("press Ctrl-C to stop")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            for name, process in list(cluster.processes.items()):
                if process.popen.poll() is not None:
                    _say(f"{name} exited with code {process.popen.returncode}; see {process.log_path}")
                    cluster.processes.pop(name)
            time.sleep(1.0)  # supervising: report a service that dies
    except KeyboardInterrupt:
        _say("stopping")
    finally:
        cluster.stop()
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    try:
        state = read_endpoints(args.home)
    except FileNotFoundError as exc:
        _say(str(exc))
        return 0
    pids: dict[str, int] = state["pids"]
    order = [n for n in reversed(SERVICE_ORDER) if n in pids] + [n for n in pids if n not in SERVICE_ORDER]
    for name in order:
        pid = pids[name]
        terminate_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # not our child: no waitpid, poll until it is gone
        if process_alive(pid):
            terminate_group(pid, signal.SIGKILL)
        _say(f"stopped {name} (pid {pid})")
    (args.home / "endpoints.json").unlink(missing_ok=True)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from aios.v1 import common_pb2, kernel_pb2, kernel_pb2_grpc

    try:
        state = read_endpoints(args.home)
    except FileNotFoundError as exc:
        _say(str(exc))
        return 1
    with grpc.insecure_channel(state["kernel"]) as channel:
        try:
            status = kernel_pb2_grpc.KernelStub(channel).GetStatus(kernel_pb2.GetStatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            _say(f"kernel at {state['kernel']} does not answer: {exc.code().name} {exc.details()}")
            return 1
    print(f"kernel    {state['kernel']:<22} SERVING   agents={status.agents}  syscalls={status.syscalls_total} "
          f"(failed {status.syscalls_failed})  tokens={status.tokens_generated}")
    for service in status.services:
        print(f"{service.name:<9} {service.address:<22} {'SERVING' if service.healthy else 'DOWN':<9}")
    print(f"redis     {state['redis_url']:<22} {'SERVING' if status.redis_ok else 'DOWN'}")
    print("queues:")
    for q in status.queues:
        name = f"tool {q.name}" if q.name else common_pb2.Resource.Name(q.resource).removeprefix("RESOURCE_").lower()
        print(f"  {name:<8} policy={q.policy:<8} queued={q.queued:<4} (preempted {q.preempted}) "
              f"running={q.running}/{q.capacity:<4} completed={q.completed}  preemptions={q.preemptions}")
    if status.HasField("llm"):
        llm = status.llm
        print(f"llm: {llm.model_description}")
        print(f"  slots {llm.slots_busy}/{llm.slots} decoding, {llm.slots_parked} parked, "
              f"{llm.prefix_cache_entries} cached prefixes (of {llm.resident_slots} resident), {llm.waiting} waiting")
        print(f"  {llm.tokens_generated} tokens generated in {llm.steps} steps; prefill {llm.prefill_tokens} tokens, "
              f"{llm.prefill_tokens_saved} saved by shared prefixes")
        print(f"  preemptions {llm.preemptions} ({llm.resumes_resident} resumed resident); snapshots in redis "
              f"{llm.snapshots_in_redis}, saved {llm.snapshots_saved} ({llm.snapshot_bytes_saved / 1e6:.1f} MB), "
              f"restored {llm.snapshots_restored}")
    if status.HasField("memory"):
        m = status.memory
        print(f"memory: {m.entries} entries of {m.agents} agents; {m.resident_bytes} of {m.ram_budget_bytes} budget "
              f"bytes resident, blocks {m.blocks_resident} resident / {m.blocks_spilled} spilled; LRU-{m.lru_k}: "
              f"{m.hits} hits, {m.faults} faults (hit ratio {m.hit_ratio:.2f}), {m.evictions} evictions")
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from services.llm_core.model import default_model_path

    default_model_path(progress=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aios", description="AIOS: an operating system for LLM agents")
    parser.add_argument("--home", type=Path, default=default_home(), help="state directory (default $AIOS_HOME or ~/.aios)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start Redis and every service")
    up.add_argument("--detach", action="store_true", help="return once everything is serving")
    up.add_argument("--redis-url", help="use this Redis instead of starting one")
    up.add_argument("--model", type=Path, help="GGUF model (default: bundled Gemma 3 270M)")
    up.add_argument("--slots", type=int, default=ClusterConfig.slots, help="LLM sequences decoded together")
    up.add_argument("--policy", default="fifo", choices=sorted(POLICIES), help="scheduling policy")
    up.add_argument("--slice-tokens", type=int, default=ClusterConfig.slice_tokens,
                    help="time slice in generated tokens (rr, fair)")
    up.add_argument("--mcp", action="append", default=[], metavar="NAME=COMMAND",
                    help="mount an MCP server's tools (stdio) as NAME__<tool>; repeatable")
    up.add_argument("--memory-budget-bytes", type=int, default=0, help="memory manager RAM budget (default 64 MB)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `aios up --detach` started").set_defaults(func=cmd_down)
    sub.add_parser("status", help="services, health, queues").set_defaults(func=cmd_status)
    sub.add_parser("model", help="assemble the default model and print its path").set_defaults(func=cmd_model)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
