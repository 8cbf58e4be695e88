"""Prompt-lookup drafts (services/llm_core/speculation.py), no model."""

import pytest

from services.llm_core.speculation import ROW_DISCOUNT, PromptLookup, StepCosts, draft_length


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


def test_a_draft_is_filled_with_what_followed_the_token_before_each_guess_else_that_token_again():
    lookup = PromptLookup(sizes=(3, 2))
    lookup.extend([5, 6, 7, 6, 9, 4])
    assert lookup.draft(3) == []  # no earlier (9, 4) or ... (6, 9, 4)
    assert lookup.fill([], 3) == [4, 4, 4]  # 4 never occurred before: the same token again
    lookup.extend([6])
    assert lookup.fill([], 2) == [9, 4]  # 6 was last followed by 9 (at 3..4), 9 by 4
    assert lookup.fill([7, 6], 4) == [7, 6, 9, 4]  # own guesses first, the weaker ones after them
    assert lookup.fill([7, 6, 9], 2) == [7, 6]


def costs(**seconds_by_tokens: float) -> StepCosts:
    """Learnt costs of one sequence's steps: t2=0.047 is a step of 2 tokens."""
    learnt = StepCosts()
    for tokens, seconds in seconds_by_tokens.items():
        learnt.observe(1, int(tokens.lstrip("t")), seconds)
    return learnt


def length(hit_rates: list[float], limit: int, learnt: StepCosts, guesses: int = 4) -> int:
    """draft_length for sequences with `guesses` guesses of their own each, against the plain step as measured."""
    return draft_length([(rate, guesses) for rate in hit_rates], limit, learnt, learnt.of(len(hit_rates), 1))


def test_no_guesses_until_the_plain_step_has_been_measured():
    assert length([1.0], 4, StepCosts()) == 0


def test_where_a_bigger_step_costs_what_a_plain_one_does_the_longest_draft_pays():
    # A GPU: five tokens in a step cost what one does.
    assert length([0.6], 4, costs(t1=0.02, t5=0.02, t2=0.02, t3=0.02, t4=0.02)) == 4


def test_on_a_cpu_only_guesses_that_are_nearly_always_kept_pay_for_a_lone_sequence():
    # Measured on a 2-core EPYC, one sequence: 1 token 22 ms, 2 tokens 47 ms, 3: 52, 4: 59, 5: 70.
    cpu = costs(t1=0.022, t2=0.047, t3=0.052, t4=0.059, t5=0.070)
    assert length([0.5], 4, cpu) == 0  # 1.94 tokens for 3.2x the time: a loss
    assert length([0.95], 4, cpu) == 4  # 4.5 tokens for 3.2x the time: a gain


def test_a_step_size_never_measured_is_tried():
    # t3 unknown: priced as 3 rows at 0.8 of t1's cost per row (53 ms): 2.71 tokens in it beat 1 in 22 ms, so tried
    assert length([0.9], 2, costs(t1=0.022, t2=0.047)) == 2


def test_a_shape_never_measured_is_priced_as_a_plain_step_of_as_many_rows():
    learnt = StepCosts()
    assert learnt.estimate(4, 2) is None  # nothing measured yet
    for sequences, seconds in ((1, 0.015), (4, 0.040), (8, 0.055), (16, 0.077)):
        learnt.observe(sequences, 1, seconds)
    learnt.observe(4, 4, 0.075)
    assert learnt.estimate(4, 4) == 0.075  # measured
    assert learnt.estimate(4, 2) == 0.055  # as 8 plain rows
    assert learnt.estimate(2, 3) == pytest.approx(0.040 + 0.015 / 2)  # 6 rows: between 4 and 8
    assert learnt.estimate(16, 3) == pytest.approx(0.077 * 3 * ROW_DISCOUNT)  # past the biggest: per row, discounted


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
    assert length([0.95] * 16, 1, learnt) == 1  # 1.95 tokens for 1.81x the time
    assert length([0.7] * 16, 1, learnt) == 0  # 1.7 tokens for 1.81x the time


def test_rows_past_a_sequences_own_guesses_count_as_never_kept():
    learnt = StepCosts()
    learnt.observe(2, 1, 0.040)
    learnt.observe(2, 2, 0.075)
    learnt.observe(2, 3, 0.085)
    both = [(0.95, 2), (0.95, 2)]
    assert draft_length(both, 2, learnt, 0.040) == 2  # 2 x 2.85 tokens for 2.1x the time
    assert draft_length([(0.95, 2), (0.95, 0)], 2, learnt, 0.040) == 0  # 2.85 + 1 tokens for 2.1x: a loss


def test_guesses_are_weighed_against_the_plain_step_as_it_would_run():
    # 13 sequences: a plain step of 13 rows measured 90 ms, padded to 16 rows 63 ms; 2 tokens each 108 ms.
    learnt = StepCosts()
    learnt.observe(13, 1, 0.090)
    learnt.observe(13, 2, 0.108)
    guesses = [(0.5, 1)] * 13
    assert draft_length(guesses, 1, learnt, learnt.of(13, 1)) == 1  # 19.5 tokens in 108 ms beat 13 in 90
    assert draft_length(guesses, 1, learnt, 0.063) == 0  # but not 13 in 63 ms (padded)
