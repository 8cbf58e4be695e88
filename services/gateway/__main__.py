"""Runs the gateway: `python -m services.gateway --kernel HOST:PORT --served-model-name NAME`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from pathlib import Path

import uvicorn

from services.credentials import certificate_host
from services.gateway.app import REQUESTS, KernelDoor, create_app
from services.metrics import serve_metrics
from services.server import add_logging_arguments, setup_logging

log = logging.getLogger("aios.gateway")


async def serve(args: argparse.Namespace) -> None:
    root = args.kernel_root_certificates.read_bytes() if args.kernel_root_certificates else None
    door = KernelDoor(args.kernel, root, certificate_host(root) if root else None)
    app = create_app(door, args.served_model_name)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(), log_config=None,
                                           access_log=False, lifespan="off"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            await serving  # it failed to bind: its error, not a hang
            raise SystemExit(f"gateway: cannot serve on {args.host}:{args.port}")
        await asyncio.sleep(0.05)  # uvicorn sets `started` once its sockets listen
    port = server.servers[0].sockets[0].getsockname()[1]
    address = f"{args.host}:{port}"
    log.info("gateway serving OpenAI's API on http://%s/v1 for the kernel at %s (pid %d)", address, args.kernel, os.getpid())
    metrics = serve_metrics(args.host, args.metrics_port, [], REQUESTS) if args.metrics_port >= 0 else ""
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"address": address, "metrics": metrics, "pid": os.getpid()}))
        tmp.replace(args.ready_file)
    await serving
    await door.channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="AIOS OpenAI-compatible gateway")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--ready-file", type=Path,
                        help="write {'address': host:port, 'metrics': host:port, 'pid': N} here once serving")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="port of the Prometheus metrics (GET /metrics on --host, not on the API's port); "
                             "0 picks a free one, -1 none")
    add_logging_arguments(parser)
    parser.add_argument("--kernel", required=True, help="host:port of the kernel")
    parser.add_argument("--kernel-root-certificates", type=Path, help="PEM certificate of a kernel served with TLS")
    parser.add_argument("--served-model-name", action="append", required=True,
                        help="a model name clients use (GET /v1/models lists them); repeatable")
    args = parser.parse_args()
    setup_logging("gateway", args.log_level, args.log_format)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
