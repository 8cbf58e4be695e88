"""Runs the storage manager: `python -m services.storage --data-dir DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from aios.v1 import storage_pb2, storage_pb2_grpc
from services.batched import batched_services
from services.metrics import Collected, gauge
from services.server import Service, common_arguments, kernel_only, run
from services.storage.core import DEFAULT_MAX_RECORD_BYTES, DEFAULT_QUOTA_BYTES, DEFAULT_QUOTA_RECORDS, RecordStore
from services.storage.servicer import StorageServicer


def build(args: argparse.Namespace) -> Service:
    store = RecordStore(
        args.data_dir / "storage.sqlite3",
        max_record_bytes=args.max_record_bytes,
        quota_bytes=args.quota_bytes,
        quota_records=args.quota_records,
    )
    grpc_services, register = batched_services(
        StorageServicer(store), storage_pb2_grpc.add_StorageServicer_to_server, storage_pb2.DESCRIPTOR.services_by_name["Storage"])
    return Service(
        name="storage",
        grpc_services=grpc_services,
        register=register,
        on_stop=store.close,
        authorize=kernel_only(args),
        collectors=[Collected("storage", lambda: storage_metrics(store))],
    )


def storage_metrics(store: RecordStore) -> list:
    totals = store.totals()
    return [gauge("aios_storage_stored_bytes", "Bytes of every stored version's data, over all agents", [],
                  {(): totals["stored_bytes"]}),
            gauge("aios_storage_records", "Records whose newest version is not deleted", [], {(): totals["records"]}),
            gauge("aios_storage_agents", "Agents that ever stored something", [], {(): totals["agents"]}),
            gauge("aios_storage_file_bytes", "Size of the database files on disk (with its write-ahead log)", [],
                  {(): totals["file_bytes"]})]


def main() -> None:
    parser = common_arguments("AIOS storage manager")
    parser.add_argument("--data-dir", type=Path, required=True, help="directory for the SQLite database")
    parser.add_argument("--max-record-bytes", type=int, default=DEFAULT_MAX_RECORD_BYTES)
    parser.add_argument("--quota-bytes", type=int, default=DEFAULT_QUOTA_BYTES, help="per agent, every version counted")
    parser.add_argument("--quota-records", type=int, default=DEFAULT_QUOTA_RECORDS, help="live records per agent")
    run(build, parser)


if __name__ == "__main__":
    main()
