"""Credentials and limits as plain objects: bearer parsing, the managers' check, token buckets, per-agent usage."""

from __future__ import annotations

import asyncio

from pathlib import Path

import pytest

from services.credentials import ClusterSecretCheck, bearer_token, new_secret, read_secret, token_hash, write_secret
from services.errors import ResourceExhausted, Unauthenticated
from services.scheduler.identity import Agent, Quota
from services.scheduler.quotas import AgentUsage, TokenBucket


@pytest.mark.parametrize("metadata, token", [
    ((("authorization", "Bearer abc"),), "abc"),
    ((("x-other", "1"), ("authorization", "bearer  abc ")), "abc"),
    ((("authorization", b"Bearer abc"),), "abc"),
    ((("authorization", "Basic abc"),), None),
    ((("authorization", "Bearer "),), None),
    ((("authorization", "abc"),), None),
    ((), None),
    (None, None),
])
def test_bearer_token_reads_only_a_well_formed_authorization_entry(metadata, token):
    assert bearer_token(metadata) == token


def test_the_cluster_check_refuses_a_missing_or_wrong_secret_with_a_message_that_says_what_to_do():
    check = ClusterSecretCheck("s3cret")
    check((("authorization", "Bearer s3cret"),))
    with pytest.raises(Unauthenticated, match="only from the AIOS kernel"):
        check(())
    with pytest.raises(Unauthenticated, match="wrong"):
        check((("authorization", "Bearer s3cre"),))


def test_secrets_are_256_bits_stored_0600_and_refused_when_others_may_read_them(tmp_path):
    a, b = new_secret("aios_agt_"), new_secret("aios_agt_")
    assert a != b and len(a) - len("aios_agt_") == 43  # 32 bytes, base64url
    assert token_hash(a) != a and len(token_hash(a)) == 64
    path = tmp_path / "secret"
    write_secret(path, a)
    assert path.stat().st_mode & 0o777 == 0o600 and read_secret(path) == a
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="0600"):
        read_secret(path)


def test_the_deployment_files_placeholder_secrets_are_refused(tmp_path):
    """deploy/k8s/secret.yaml ships example values: a cluster applied unchanged must not run on a known secret."""
    import yaml

    from services.credentials import PLACEHOLDER

    secret = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "secret.yaml").read_text())
    for name, value in secret["stringData"].items():
        assert PLACEHOLDER in value, name
        path = tmp_path / name
        write_secret(path, value)
        with pytest.raises(ValueError, match="placeholder"):
            read_secret(path)


def test_a_token_bucket_refills_at_its_rate_up_to_its_capacity():
    bucket = TokenBucket(capacity=10, rate=2, now=0.0)
    assert bucket.take(10, 0.0) == 0.0
    assert bucket.take(1, 0.0) == pytest.approx(0.5)  # refused: half a second to one unit
    assert bucket.take(1, 0.5) == 0.0
    bucket.charge(5, 0.5)  # service already given: below zero
    assert bucket.wait_for(1, 0.5) == pytest.approx(3.0)
    assert bucket.wait_for(1, 100.0) == 0.0 and bucket.level == 10  # capped at capacity


def agent(name: str, **quota: int) -> Agent:
    return Agent(f"agt-{name}", name, 0.0, quota=Quota(**quota))


def test_concurrent_syscalls_are_limited_per_agent_with_a_retry_hint():
    usage = AgentUsage()
    busy, other = agent("busy", concurrent_syscalls=2), agent("other", concurrent_syscalls=2)
    usage.enter(busy)
    usage.enter(busy)
    with pytest.raises(ResourceExhausted, match="2 syscalls in flight") as refused:
        usage.enter(busy)
    assert refused.value.retry_after > 0
    usage.enter(other)  # unaffected
    usage.leave(busy)
    usage.enter(busy)


def test_llm_tokens_per_minute_admit_while_the_bucket_holds_any_and_refuse_with_the_wait():
    usage = AgentUsage()
    thrifty, free = agent("thrifty", tokens_per_minute=60), agent("free")
    usage.admit_generation(thrifty, 0.0)
    usage.charge_tokens(thrifty, 90, 0.0)  # a generation overshoots: 30 tokens in debt at 1 token/s
    with pytest.raises(ResourceExhausted, match="60 LLM tokens per minute") as refused:
        usage.admit_generation(thrifty, 10.0)
    assert refused.value.retry_after == pytest.approx(21.0)
    usage.admit_generation(thrifty, 31.0)
    usage.charge_tokens(free, 10**9, 0.0)
    usage.admit_generation(free, 0.0)  # no limit set


def test_an_agents_extra_tool_calls_wait_in_its_own_line():
    usage = AgentUsage()
    one = agent("one", tool_slots=1)

    async def two_calls_and_another_tool() -> list[str]:
        order: list[str] = []
        first_in, release = asyncio.Event(), asyncio.Event()

        async def call(label: str, tool: str) -> None:
            async with usage.tool_turn(one, tool):
                order.append(label)
                if label == "first":
                    first_in.set()
                    await release.wait()

        first = asyncio.create_task(call("first", "python"))
        await first_in.wait()
        second = asyncio.create_task(call("second", "python"))
        other = asyncio.create_task(call("calculator", "calculator"))
        await other  # another tool has its own line; `second`, started first, is in its line by now
        assert usage.waiting_in_line("python", "agt-one") == 1 and usage.waiting_in_line("python") == 1
        release.set()
        await asyncio.gather(first, second)
        assert usage.waiting_in_line("python") == 0
        return order

    assert asyncio.run(two_calls_and_another_tool()) == ["first", "calculator", "second"]
    unlimited = agent("unlimited")

    async def unlimited_calls() -> None:
        async with usage.tool_turn(unlimited, "python"), usage.tool_turn(unlimited, "python"):
            assert usage.waiting_in_line("python") == 0

    asyncio.run(unlimited_calls())
