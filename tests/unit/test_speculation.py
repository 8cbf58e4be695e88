"""Prompt-lookup drafts (services/llm_core/speculation.py), no model."""

import pytest

from services.llm_core.speculation import PromptLookup, StepCosts, draft_length


def test_the_draft_is_what_followed_the_latest_occurrence_of_the_longest_matching_ngram():
    lookup = PromptLookup(sizes=(3, 2, 1))
    lookup.extend([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 1, 2, 3])
    assert lookup.draft(3) == [4, 5, 9]  # (1, 2, 3) occurred once, followed by 4 5 9
    lookup.extend([7])
    assert lookup.draft(2) == [8, 1]  # (2, 3, 7) at 6..8, followed by 8 1


def test_shorter_ngrams_are_the_fallback_and_no_match_drafts_nothing():
    lookup = PromptLookup(sizes=(3, 2))
    lookup.extend([5, 6, 7, 1, 6, 7])
    assert lookup.draft(4) == [1, 6, 7]  # no earlier (1, 6, 7); (6, 7) was followed by 1 6 7
    lookup.extend([42])
    assert lookup.draft(4) == []  # 42 never occurred before
    assert lookup.draft(0) == []


def test_a_repeating_output_is_drafted_to_continue_repeating():
    lookup = PromptLookup(sizes=(2,))
    lookup.extend([8, 9, 8, 9, 8])
    assert lookup.draft(3) == [9, 8]  # (9, 8) at 1..2 was followed by 9 8


def costs(**seconds_by_tokens: float) -> StepCosts:
    """Learnt costs of one sequence's steps: t2=0.047 is a step of 2 tokens."""
    learnt = StepCosts()
    for tokens, seconds in seconds_by_tokens.items():
        learnt.observe(1, int(tokens.lstrip("t")), seconds)
    return learnt


def test_no_guesses_until_the_plain_step_has_been_measured():
    assert draft_length([1.0], 4, StepCosts()) == 0


def test_where_a_bigger_step_costs_what_a_plain_one_does_the_longest_draft_pays():
    # A GPU: five tokens in a step cost what one does.
    assert draft_length([0.6], 4, costs(t1=0.02, t5=0.02, t2=0.02, t3=0.02, t4=0.02)) == 4


def test_on_a_cpu_only_guesses_that_are_nearly_always_kept_pay_for_a_lone_sequence():
    # Measured on a 2-core EPYC, one sequence: 1 token 22 ms, 2 tokens 47 ms, 3: 52, 4: 59, 5: 70.
    cpu = costs(t1=0.022, t2=0.047, t3=0.052, t4=0.059, t5=0.070)
    assert draft_length([0.5], 4, cpu) == 0  # 1.94 tokens for 3.2x the time: a loss
    assert draft_length([0.95], 4, cpu) == 4  # 4.5 tokens for 3.2x the time: a gain


def test_a_step_size_never_measured_is_tried():
    assert draft_length([0.9], 2, costs(t1=0.022, t2=0.047)) == 2  # t3 unknown: taken at t1's cost, so tried


def test_the_learnt_cost_follows_the_steps_measured_by_shape():
    learnt = StepCosts()
    learnt.observe(16, 1, 0.150)
    learnt.observe(16, 1, 0.250)
    assert learnt.of(16, 1) == pytest.approx(0.150 + 0.2 * 0.100)
    assert learnt.of(8, 2) is None  # as many tokens, another shape


def test_with_many_sequences_a_draft_pays_only_if_the_bigger_step_is_cheap_enough():
    # 16 sequences, measured on the 2-core EPYC: 1 token each 151 ms, 2 tokens each 273 ms.
    learnt = StepCosts()
    learnt.observe(16, 1, 0.151)
    learnt.observe(16, 2, 0.273)
    assert draft_length([0.95] * 16, 1, learnt) == 1  # 1.95 tokens for 1.81x the time
    assert draft_length([0.7] * 16, 1, learnt) == 0  # 1.7 tokens for 1.81x the time
