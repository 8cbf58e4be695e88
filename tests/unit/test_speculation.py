"""Prompt-lookup drafts (services/llm_core/speculation.py), no model."""

from services.llm_core.speculation import PromptLookup


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
