"""The `aios` command: up, down, status, agent, model."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from deploy.cluster import (
    SERVICE_ORDER,
    Cluster,
    ClusterConfig,
    StartError,
    default_home,
    http_healthy,
    process_alive,
    read_endpoints,
    terminate_group,
)
from deploy.supervisor import Supervisor
from deploy.top import SORTS
from services.scheduler.policy import POLICIES

READY_LINE = "serving; press Ctrl-C to stop"
SUPERVISE_EVERY_S = 0.25


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
    if bool(args.tls_cert) != bool(args.tls_key):
        _say("--tls-cert and --tls-key go together")
        return 2
    if min(args.llm_cores, args.memory_shards, args.storage_shards) < 1:
        _say("--llm-cores, --memory-shards and --storage-shards are 1 at least")
        return 2
    if args.detach:
        return _up_in_background(args)
    model = args.model or default_model_path(progress=True)
    extra = {"tools": [*(option for spec in args.mcp for option in ("--mcp", spec)),
                       *(option for name in args.mcp_network for option in ("--mcp-network", name))],
             "memory": [*(["--ram-budget-bytes", str(args.memory_budget_bytes)] if args.memory_budget_bytes else []),
                        *(["--quota-bytes", str(args.memory_quota_bytes)] if args.memory_quota_bytes else [])],
             "storage": ["--quota-bytes", str(args.storage_quota_bytes)] if args.storage_quota_bytes else [],
             "llm_core": ["--draft-tokens", str(args.draft_tokens)] if args.draft_tokens else [],
             "kernel": [*(["--tokens-per-minute", str(args.tokens_per_minute)] if args.tokens_per_minute else []),
                        *(["--concurrent-syscalls", str(args.concurrent_syscalls)] if args.concurrent_syscalls else [])]}
    config = ClusterConfig(home=home, redis_url=args.redis_url, model=model, slots=args.slots, policy=args.policy,
                           slice_tokens=args.slice_tokens, extra_args=extra, listen=args.listen,
                           tls_cert=args.tls_cert, tls_key=args.tls_key, open_registration=args.open_registration,
                           gateway_listen=args.gateway_listen, llm_cores=args.llm_cores,
                           attached_llm_cores=tuple(args.llm_core), llm_threads=args.llm_threads,
                           memory_shards=args.memory_shards, storage_shards=args.storage_shards,
                           otlp_endpoint=args.otlp_endpoint)
    cluster = Cluster(config, progress=_say)
    if args.llm_standby:
        config.standby = tuple(cluster.names_of("llm_core"))
    _say(f"starting in {home} (logs in {home / 'logs'})")
    try:
        endpoints = cluster.start(supervisor_pid=os.getpid())
    except StartError as exc:
        _say(f"start failed: {exc}")
        return 1
    tls = " with TLS" if args.tls_cert else ""
    _say(f"kernel ready at {endpoints['kernel']}{tls}  (endpoints written to {cluster.endpoints_path})")
    _say(f"OpenAI-compatible API at {cluster.openai_base_url} (model {cluster.served_model_name!r}; the API key is an "
         "agent token)")
    _say(f"operator token in {cluster.operator_token_path} (mode 0600); `aios agent create NAME` makes an agent token")
    if args.open_registration:
        _say("open registration is on: anyone who reaches the kernel may register an agent")
    _say(READY_LINE)
    signal.signal(signal.SIGTERM, _interrupt)
    names = list(cluster.processes)  # in start order
    supervisor = Supervisor(cluster, names, say=_say,
                            on_change=lambda: cluster.write_endpoints(os.getpid(), supervisor.as_json()))
    cluster.write_endpoints(os.getpid(), supervisor.as_json())
    try:
        while True:
            supervisor.tick()
            time.sleep(SUPERVISE_EVERY_S)  # waitpid on several children with a timeout: polling is the simple way
    except KeyboardInterrupt:
        _say("stopping")
    finally:
        cluster.stop()
    return 0


def _up_in_background(args: argparse.Namespace) -> int:
    """`aios up --detach`: the same supervising `aios up`, in a session of its own with its output in
    logs/supervisor.log; relays that log until the system serves (or the start fails)."""
    log_path = args.home / "logs" / "supervisor.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    argv = [sys.executable, "-m", "deploy.cli", "--home", str(args.home), *(a for a in args.argv if a != "--detach")]
    child = subprocess.Popen(argv, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    with log_path.open("rb") as log:
        log.seek(offset)
        pending = b""
        while True:
            chunk = log.read()
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                text = line.decode(errors="replace")
                if text.endswith(READY_LINE):
                    _say(f"running in the background (supervisor pid {child.pid}, log {log_path}); "
                         "`aios status` to inspect, `aios down` to stop")
                    return 0
                print(text, flush=True)
            if not chunk and child.poll() is not None:
                return child.returncode or 1
            time.sleep(0.05)  # following a file another process writes


def cmd_down(args: argparse.Namespace) -> int:
    try:
        state = read_endpoints(args.home)
    except FileNotFoundError as exc:
        _say(str(exc))
        return 0
    supervisor = state.get("supervisor")
    if supervisor and process_alive(supervisor):
        # A foreground `aios up` watches these services: ask it to stop them, and wait for it to exit.
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while process_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)  # not our child: no waitpid, poll until it is gone
        _say(f"stopped the `aios up` supervising them (pid {supervisor})")
    pids: dict[str, int] = {n: p for n, p in state["pids"].items() if process_alive(p)}
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


def _connect(args: argparse.Namespace):
    """The SDK's connection to the local kernel, with the operator token (or $AIOS_TOKEN)."""
    import aios

    read_endpoints(args.home)  # a clear message when nothing runs
    return aios.connect(home=args.home)


def _kernel_status(args: argparse.Namespace, max_agents: int = 0):
    """(endpoints.json of the local `aios up`, or None with --kernel; a function returning the kernel's status);
    FileNotFoundError when nothing runs here."""
    import aios

    if args.kernel:  # another host's kernel: the token from $AIOS_TOKEN, TLS from $AIOS_ROOT_CERTIFICATES
        connection = aios.connect(args.kernel)
        return None, connection, lambda: connection.status(max_agents)
    state = read_endpoints(args.home)
    connection = _connect(args)
    return state, connection, lambda: connection.status(max_agents)


def _with_kernel_status(args: argparse.Namespace, use: Callable[[dict | None, str, Callable], None]) -> int:
    """`use(endpoints or None, kernel address, fetch status)` with a connection to the kernel (--kernel, else the
    local one); 1 with a message when nothing runs here or the kernel does not answer."""
    import aios

    address = args.kernel
    try:
        state, connection, fetch = _kernel_status(args, args.agents)
        address = address or state["kernel"]
        with connection:
            use(state, address, fetch)
    except FileNotFoundError as exc:
        _say(str(exc))
        return 1
    except aios.SyscallError as exc:
        _say(f"kernel at {address} does not answer: {exc}")
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return _with_kernel_status(args, lambda state, address, fetch: _print_status(args, state, address, fetch()))


def _print_status(args: argparse.Namespace, state: dict | None, address: str, status: Any) -> None:
    from aios.v1 import common_pb2, kernel_pb2
    from google.protobuf.json_format import MessageToDict

    if args.json:
        print(json.dumps({"endpoints": state, "kernel": MessageToDict(status, preserving_proto_field_name=True)},
                         indent=2))
        return
    if state is None:
        state = {"kernel": address, "redis": "(the kernel's)", "services": {}}
    print(f"kernel    {state['kernel']:<22} SERVING   agents={status.agents}  syscalls={status.syscalls_total} "
          f"(failed {status.syscalls_failed})  tokens={status.tokens_generated}")
    for service in status.services:
        print(f"{service.name:<9} {service.address:<22} {'SERVING' if service.healthy else 'DOWN':<9}")
    print(f"redis     {state['redis']:<22} {'SERVING' if status.redis_ok else 'DOWN':<9} "
          f"{state.get('redis_persistence', '')}")
    gateway = state["services"].get("gateway")
    if gateway:
        print(f"gateway   {gateway:<22} {'SERVING' if http_healthy(gateway, 3) else 'DOWN':<9} "
              f"{state['openai_base_url']}")
    supervision = state.get("supervision", {})
    if supervision:
        print("processes (supervised by `aios up`, pid %d):" % state["supervisor"])
        for name, s in supervision.items():
            last = f", last ended: {s['last_exit']}" if s["last_exit"] else ""
            up_s = f", up {time.time() - s['started_at']:.0f} s" if s["state"] == "running" else ""
            print(f"  {name:<9} {s['state']:<11} pid {s['pid']:<8} restarts {s['restarts']}{up_s}{last}")
    refusals = ", ".join(f"{reason} {n}" for reason, n in sorted(status.refusals.items())) or "none"
    print(f"refused:  {refusals}")
    print("queues:")
    for q in status.queues:
        name = f"tool {q.name}" if q.name else common_pb2.Resource.Name(q.resource).removeprefix("RESOURCE_").lower()
        print(f"  {name:<8} policy={q.policy:<8} queued={q.queued:<4} (preempted {q.preempted}) "
              f"running={q.running}/{q.capacity:<4} completed={q.completed}  preemptions={q.preemptions}")
    for core in status.cores:
        core_state = kernel_pb2.LLMCoreState.Name(core.state).removeprefix("LLM_CORE_STATE_")
        moved = f", {core.migration_seconds / core.migrated_in * 1000:.0f} ms each" if core.migrated_in else ""
        print(f"{core.name:<11} {core.address:<22} {core_state:<9} running {core.running}/{core.slots}, parked "
              f"{core.parked}, dispatched {core.dispatched}, migrated in {core.migrated_in}{moved} / out "
              f"{core.migrated_out}")
    if status.HasField("llm"):
        llm = status.llm
        print(f"llm ({len(status.cores)} core{'s' if len(status.cores) != 1 else ''}): {llm.model_description}")
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
    if state.get("metrics"):
        print("metrics (Prometheus, GET /metrics): " + "  ".join(f"{name} {address}"
                                                              for name, address in state["metrics"].items()))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from deploy.logs import log_files, show

    logs = args.home / "logs"
    files = log_files(logs, args.service or "")
    if not files:
        known = ", ".join(sorted(p.stem for p in logs.glob("*.log"))) or "none"
        _say(f"no logs of {args.service or 'any service'} in {logs} (there: {known})")
        return 1
    try:
        show(files, lambda line: print(line, flush=True), tail=args.tail, follow=args.follow, as_json=args.json,
             syscall=args.syscall or "", agent=args.agent or "", level=args.level or "")
    except (KeyboardInterrupt, BrokenPipeError):
        pass
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from deploy.top import TopView, run_top

    return _with_kernel_status(args, lambda state, address, fetch: run_top(
        fetch, TopView(kernel=address, sort=args.sort, filter=args.filter or ""), args.interval, args.once))


def cmd_drain(args: argparse.Namespace) -> int:
    from aios.v1 import kernel_pb2

    def act(kernel) -> None:
        core = kernel.drain_core(args.core, undo=args.undo)
        state = kernel_pb2.LLMCoreState.Name(core.state).removeprefix("LLM_CORE_STATE_").lower()
        left = f"; still holds {core.running} running and {core.parked} parked" if core.running or core.parked else ""
        print(f"{core.name} ({core.address}) is {state}; {core.migrated_out} generations moved out of it since the "
              f"kernel started{left}")

    return _with_kernel(args, act)


def cmd_reshard(args: argparse.Namespace) -> int:
    from deploy.reshard import reshard

    if (args.home / "endpoints.json").exists():
        _say(f"AIOS is running from {args.home}: resharding is offline; stop it with `aios down` first")
        return 1
    if min(args.memory_shards, args.storage_shards) < 1:
        _say("a manager runs as one shard at least")
        return 2
    moved = reshard(args.home, {"memory": args.memory_shards, "storage": args.storage_shards}, say=_say)
    _say(f"done: {moved['memory']} agents' memory and {moved['storage']} agents' storage moved; start with "
         f"`aios up --memory-shards {args.memory_shards} --storage-shards {args.storage_shards}`")
    return 0


def cmd_llm_core(args: argparse.Namespace) -> int:
    """`aios llm-core ARGS`: an LLM core for a kernel elsewhere (`aios up --llm-core HOST:PORT` attaches it)."""
    os.execv(sys.executable, [sys.executable, "-m", "services.llm_core", *args.core_args])


def _with_kernel(args: argparse.Namespace, action) -> int:
    """Runs `action(kernel)` on a connection with the operator token; a refusal is printed, exit status 1."""
    import aios

    try:
        with _connect(args) as kernel:
            action(kernel)
    except FileNotFoundError as exc:
        _say(str(exc))
        return 1
    except aios.SyscallError as exc:
        _say(str(exc))
        return 1
    return 0


def cmd_agent(args: argparse.Namespace) -> int:
    def act(kernel) -> None:
        if args.agent_command == "create":
            agent = kernel.register(args.name, args.priority, args.weight, tokens_per_minute=args.tokens_per_minute,
                                    concurrent_syscalls=args.concurrent_syscalls, tool_slots=args.tool_slots)
            _say(f"created agent {agent.id} ({agent.name}); its token, shown only now:")
            print(agent.token)
        elif args.agent_command == "token":
            agent = kernel.issue_token(args.id)
            _say(f"new token for {agent.id}; the old one no longer works. The token, shown only now:")
            print(agent.token)
        elif args.agent_command == "revoke":
            info = kernel.revoke(args.id)
            _say(f"revoked {info.id} ({info.name}); its data stays, `aios agent token {info.id}` re-enables it")
        else:
            print(f"{'id':<17} {'name':<24} {'token':<15} {'prio':>4} {'weight':>6} {'tok/min':>8} "
                  f"{'calls':>5} {'tools':>5}  state")
            for a in kernel.agents(include_revoked=args.all):
                q = a.quota
                print(f"{a.id:<17} {a.name[:24]:<24} {(a.token_hint + '...') if a.token_hint else '-':<15} "
                      f"{a.priority:>4} {a.weight:>6g} {q.tokens_per_minute or '-':>8} {q.concurrent_syscalls or '-':>5} "
                      f"{q.tool_slots or '-':>5}  {'revoked' if a.revoked else 'active'}")

    return _with_kernel(args, act)


def cmd_tool(args: argparse.Namespace) -> int:
    def act(kernel) -> None:
        if args.tool_command == "mount":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            names = kernel.mount_tool(args.name, command, network=args.network, read_only=args.read_only)
            _say(f"mounted {args.name}: {', '.join(names)}")
        else:
            _say(f"unmounted {args.name}: {', '.join(kernel.unmount_tool(args.name))}")

    return _with_kernel(args, act)


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
                    help="mount an MCP server's tools (stdio) as NAME__<tool>, sandboxed; repeatable")
    up.add_argument("--llm-cores", type=int, default=1, metavar="N",
                    help="LLM core processes to start, each on its own port; the kernel routes between them")
    up.add_argument("--llm-core", action="append", default=[], metavar="HOST:PORT",
                    help="also route to an LLM core started elsewhere (`aios llm-core ...` there, with this Redis, "
                         "cluster secret and --slots); repeatable")
    up.add_argument("--llm-threads", type=int, default=None, metavar="N", help="llama.cpp threads per LLM core")
    for kind in ("memory", "storage"):
        up.add_argument(f"--{kind}-shards", type=int, default=1, metavar="N",
                        help=f"{kind} manager shards, each its own process and SQLite directory; an agent's {kind} "
                             "lives on the one its id hashes to (changing N for a home with data: `aios reshard`)")
    up.add_argument("--llm-standby", action="store_true",
                    help="keep a hot standby LLM core (model loaded, waiting): a core that dies is replaced in "
                         "a fraction of a second instead of a process start and model load (twice the memory)")
    up.add_argument("--draft-tokens", type=int, default=0, metavar="N",
                    help="speculative decoding: verify up to N tokens guessed from each sequence's own context per "
                         "decode step, as many as pay on this machine (outputs as without, up to batch numerics)")
    up.add_argument("--mcp-network", action="append", default=[], metavar="NAME",
                    help="let the MCP server NAME use the host's network (none by default)")
    up.add_argument("--memory-budget-bytes", type=int, default=0, help="memory manager RAM budget (default 64 MB)")
    up.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT",
                    help="where the kernel listens (default loopback, a free port); use TLS off loopback")
    up.add_argument("--tls-cert", type=Path, help="serve the kernel with TLS: PEM certificate")
    up.add_argument("--tls-key", type=Path, help="the certificate's PEM private key")
    up.add_argument("--gateway-listen", default="127.0.0.1:0", metavar="HOST:PORT",
                    help="where the OpenAI-compatible HTTP gateway listens (default loopback, a free port)")
    up.add_argument("--otlp-endpoint", default="", metavar="HOST:PORT",
                    help="send the services' OpenTelemetry traces to this OTLP/gRPC collector")
    up.add_argument("--open-registration", action="store_true",
                    help="anyone who reaches the kernel may register an agent (trusted single-user machines only)")
    up.add_argument("--tokens-per-minute", type=int, default=0, help="default LLM tokens per minute per agent")
    up.add_argument("--concurrent-syscalls", type=int, default=0, help="default syscalls in flight per agent (64)")
    up.add_argument("--memory-quota-bytes", type=int, default=0, help="memory bytes per agent (default 16 MB)")
    up.add_argument("--storage-quota-bytes", type=int, default=0, help="storage bytes per agent (default 256 MB)")
    up.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop what `aios up` started").set_defaults(func=cmd_down)
    status = sub.add_parser("status", help="services, health, queues")
    status.add_argument("--json", action="store_true", help="everything as one JSON object, for scripts")
    top = sub.add_parser("top", help="a live view of queues, LLM cores, memory and agents (operator)")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    top.add_argument("--sort", choices=sorted(SORTS), default="busy", help="agents' order (the s key cycles it)")
    top.add_argument("--filter", help="only agents whose name or id contains this (the / key sets it)")
    top.add_argument("--once", action="store_true", help="print one frame and exit")
    for command in (status, top):
        command.add_argument("--kernel", default=os.environ.get("AIOS_KERNEL"), metavar="HOST:PORT",
                             help="a kernel elsewhere (default $AIOS_KERNEL, else the local `aios up`); the "
                                  "operator token from $AIOS_TOKEN")
        command.add_argument("--agents", type=int, default=100, help="the most agents listed, busiest first")
    status.set_defaults(func=cmd_status)
    logs = sub.add_parser("logs", help="the services' logs, merged by time (SERVICE: one of them, e.g. kernel)")
    logs.add_argument("service", nargs="?", help="kernel, llm_core, memory, storage, tools, gateway, supervisor "
                                                  "(replicas too: memory also shows memory_2)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--tail", type=int, default=-1, help="only the last N lines (default all)")
    logs.add_argument("--json", action="store_true", help="the JSON lines as written (others wrapped in one)")
    logs.add_argument("--syscall", help="only events about this syscall id")
    logs.add_argument("--agent", help="only events about this agent id")
    logs.add_argument("--level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="only this level and above")
    logs.set_defaults(func=cmd_logs)
    top.set_defaults(func=cmd_top)
    agent = sub.add_parser("agent", help="create, list and revoke agents and their tokens (operator)")
    agent_sub = agent.add_subparsers(dest="agent_command", required=True)
    create = agent_sub.add_parser("create", help="register an agent and print its token (for an agent run elsewhere)")
    create.add_argument("name")
    create.add_argument("--priority", type=int, default=0, help="0-10, higher first (priority policy)")
    create.add_argument("--weight", type=float, default=0.0, help="fair-share weight, (0, 100]")
    create.add_argument("--tokens-per-minute", type=int, default=0, help="LLM tokens per minute (default: kernel's)")
    create.add_argument("--concurrent-syscalls", type=int, default=0, help="syscalls in flight (default: kernel's)")
    create.add_argument("--tool-slots", type=int, default=0, help="calls of one tool at once (default: kernel's)")
    ls = agent_sub.add_parser("ls", help="list agents and their token hints")
    ls.add_argument("--all", action="store_true", help="include revoked agents")
    agent_sub.add_parser("revoke", help="revoke an agent's token (its data stays)").add_argument("id")
    agent_sub.add_parser("token", help="issue a new token for an agent (the old one stops working)").add_argument("id")
    agent.set_defaults(func=cmd_agent)
    tool = sub.add_parser("tool", help="mount and unmount MCP servers while AIOS runs (operator)")
    tool_sub = tool.add_subparsers(dest="tool_command", required=True)
    mount = tool_sub.add_parser("mount", help="start an MCP server (stdio, sandboxed) and add its tools: aios tool mount [--network] [--read-only PATH] NAME -- CMD")
    mount.add_argument("name")
    mount.add_argument("--network", action="store_true", help="let the server use the host's network (none by default)")
    mount.add_argument("--read-only", action="append", default=[], metavar="PATH",
                       help="an absolute host path the sandboxed server may read (Python, the project and /usr it may)")
    mount.add_argument("command", nargs=argparse.REMAINDER, help="the server's command, after --")
    tool_sub.add_parser("unmount", help="stop an MCP server and remove its tools").add_argument("name")
    tool.set_defaults(func=cmd_tool)
    sub.add_parser("model", help="assemble the default model and print its path").set_defaults(func=cmd_model)
    drain = sub.add_parser("drain", help="move every generation off an LLM core and give it no new ones (operator)")
    drain.add_argument("core", help="the core's name (as `aios status` lists it) or address")
    drain.add_argument("--undo", action="store_true", help="let the core take generations again")
    drain.set_defaults(func=cmd_drain)
    reshard = sub.add_parser("reshard", help="move memory and storage data to another number of shards (offline: "
                                             "after `aios down`)")
    reshard.add_argument("--memory-shards", type=int, required=True, metavar="N")
    reshard.add_argument("--storage-shards", type=int, required=True, metavar="N")
    reshard.set_defaults(func=cmd_reshard)
    core = sub.add_parser("llm-core", add_help=False,
                          help="run an LLM core for a kernel elsewhere: the arguments of `python -m services.llm_core`")
    core.add_argument("core_args", nargs=argparse.REMAINDER)
    core.set_defaults(func=cmd_llm_core)
    args = parser.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
