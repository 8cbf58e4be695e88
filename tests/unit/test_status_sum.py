"""The kernel's status of several replicas of one manager (services/scheduler/servicer.py added_up), no sockets."""

from aios.v1 import llm_core_pb2

from services.scheduler.servicer import ALIKE_ON_EVERY_CORE, added_up


def core(tokens: int, redis_ok: bool, step_seconds: float) -> llm_core_pb2.InfoResponse:
    return llm_core_pb2.InfoResponse(
        model_path="m.gguf", max_sequence_tokens=2048, tokens_generated=tokens, redis_ok=redis_ok,
        step_costs=[llm_core_pb2.StepCost(sequences=16, tokens_each=1, seconds=step_seconds)],
        plain_steps=[llm_core_pb2.StepTally(sequences=16, steps=tokens, seconds=step_seconds * tokens)])


def test_counters_add_up_flags_hold_only_if_they_hold_everywhere_and_each_cores_own_costs_are_left_out():
    total = added_up([core(10, True, 0.07), None, core(5, False, 0.09)], ALIKE_ON_EVERY_CORE)
    assert total.tokens_generated == 15 and not total.redis_ok
    assert total.model_path == "m.gguf" and total.max_sequence_tokens == 2048  # alike on every core: not summed
    assert list(total.step_costs) == [] and list(total.plain_steps) == []  # one core's own, not the sum's


def test_one_core_is_its_own_sum_step_costs_included():
    total = added_up([core(10, True, 0.07)], ALIKE_ON_EVERY_CORE)
    assert total.tokens_generated == 10 and [c.seconds for c in total.step_costs] == [0.07]
    assert [(p.sequences, p.steps) for p in total.plain_steps] == [(16, 10)]
    assert added_up([None], ALIKE_ON_EVERY_CORE) is None
