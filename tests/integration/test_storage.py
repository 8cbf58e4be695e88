"""The storage manager behind the kernel: versions, grants between two agents, quotas, kill -9 durability."""

from __future__ import annotations

from typing import Iterator

import grpc
import pytest

import aios
from deploy.cluster import Cluster, ClusterConfig
from tests.integration.crash import writes_across_kill_9


@pytest.fixture(scope="module")
def small_quota(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(
        home=tmp_path_factory.mktemp("aios-storage"),
        slots=2,
        extra_args={"storage": ["--quota-bytes", "200000", "--quota-records", "1000"]},
    )
    with Cluster(config) as running:
        yield running


@pytest.fixture(scope="module")
def kernel(small_quota: Cluster) -> Iterator[aios.Connection]:
    with small_quota.connect() as connection:
        yield connection


def test_versions_rollback_and_search_through_the_kernel(kernel):
    agent = kernel.register("writer")
    for text in ("draft one about rivers", "draft two about mountains", "draft three about rivers and lakes"):
        agent.storage_write("essay.md", text, {"kind": "essay"})
    assert [v.version for v in agent.storage_history("essay.md")] == [1, 2, 3]
    assert agent.storage_read("essay.md", version=2) == b"draft two about mountains"
    assert agent.storage_rollback("essay.md", 2).version == 4
    assert agent.storage_read("essay.md") == b"draft two about mountains"
    assert agent.storage_search("mountains")[0].info.key == "essay.md"
    assert agent.storage_search("lakes") == []  # only the newest version is indexed
    agent.storage_delete("essay.md")
    with pytest.raises(aios.SyscallError) as error:
        agent.storage_read("essay.md")
    assert error.value.code == grpc.StatusCode.NOT_FOUND
    assert agent.storage_history("essay.md")[-1].deleted


def test_another_agent_reads_only_what_was_granted(kernel):
    owner, guest = kernel.register("owner"), kernel.register("guest")
    owner.storage_write("shared/plan.md", "the plan")
    owner.storage_write("private/diary.md", "dear diary")
    with pytest.raises(aios.SyscallError) as error:
        guest.storage_read("shared/plan.md", owner=owner.id)
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED and "grant" in error.value.message
    owner.storage_grant(guest.id, "shared/", prefix=True)
    assert guest.storage_read("shared/plan.md", owner=owner.id) == b"the plan"
    with pytest.raises(aios.SyscallError) as error:
        guest.storage_read("private/diary.md", owner=owner.id)
    assert error.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert guest.storage_list() == []  # a grant shares records, not the namespace
    owner.storage_revoke(guest.id, "shared/", prefix=True)
    with pytest.raises(aios.SyscallError):
        guest.storage_read("shared/plan.md", owner=owner.id)


def test_a_quota_refuses_writes_past_it_and_a_purge_frees_room(kernel):
    agent = kernel.register("hoarder")
    agent.storage_write("big/1", b"x" * 120_000)
    with pytest.raises(aios.SyscallError) as error:
        agent.storage_write("big/2", b"x" * 120_000)
    assert error.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "quota" in error.value.message
    assert agent.storage_usage().bytes == 120_000
    agent.storage_delete("big/1", purge=True)
    agent.storage_write("big/2", b"x" * 120_000)
    assert agent.storage_read("big/2") == b"x" * 120_000


def test_every_acknowledged_write_survives_kill_9_of_the_storage_service(small_quota, kernel):
    agent = kernel.register("durable-writer")

    def write(writer: int, i: int) -> tuple[str, bytes]:
        key, data = f"w{writer}/{i}", f"writer {writer} record {i} ".encode() * 8
        agent.storage_write(key, data)
        return key, data

    run = writes_across_kill_9(small_quota, "storage", write, before=100)
    assert run.refused == []  # the writes the kill caught waited in the kernel and were retried
    stored = {r.key: r for r in agent.storage_list()}
    print(f"\nstorage kill -9: {run.at_kill} writes acknowledged before the kill, {len(run.acknowledged)} in all, "
          f"{len(stored)} stored")
    assert [k for k in run.acknowledged if k not in stored] == []
    assert all(agent.storage_read(k) == data for k, data in list(run.acknowledged.items())[::10])
    # No write happened twice, though some committed before the kill and were retried: each key has one version.
    assert [k for k, info in stored.items() if info.version != 1] == []


def test_a_syscall_repeated_with_its_request_id_writes_once(kernel):
    """What an SDK's retry sends after the kernel restarted under a write: the same request id, again."""
    from aios.v1 import kernel_pb2, memory_pb2, storage_pb2

    agent = kernel.register("repeater")
    write = kernel_pb2.SyscallRequest(request_id="retry-1", storage_write=storage_pb2.StorageWriteRequest(
        key="once.txt", data=b"hello"))
    add = kernel_pb2.SyscallRequest(request_id="retry-2", memory_add=memory_pb2.MemoryAddRequest(text="once"))
    replies = [kernel.call("Syscall", request, agent.token) for request in (write, write, add, add)]
    assert replies[0].storage_write.version == replies[1].storage_write.version == 1
    assert replies[2].memory_add.id == replies[3].memory_add.id
    assert [i.version for i in agent.storage_history("once.txt")] == [1]
    assert [e.text for e in agent.memory_list()] == ["once"]
    assert agent.storage_write("once.txt", "new id, new version").version == 2
