"""The verifiable-instruction rewards: each constraint kind, the shipped prompt set, and that
the bounds really bound every completion of a partial response."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.promptset import load_prompts
from common.prompts import prompt_as_text
from reward.verifiers import (
    KINDS,
    Constraint,
    constraint_bounds,
    constraint_reward,
    parse_constraints,
    pass_bounds,
    pass_reward,
    render,
    satisfied,
    status,
)

EXAMPLES: list[tuple[Constraint, str, str]] = [  # (constraint, a passing, a failing response)
    (Constraint("max_words", 3), "one two three", "one two three four"),
    (Constraint("min_words", 3), "one two three", "one two"),
    (Constraint("forbidden_letter", "e"), "a cat sat", "the cat"),
    (Constraint("forbidden_word", "very"), "every day", "it is Very good"),
    (Constraint("keyword", "river"), "the River runs", "the rivers run"),
    (Constraint("lowercase", None), "all small here.", "One capital"),
    (Constraint("json_keys", ("a", "b")), '```json\n{"a": 1, "b": 2}\n```', '{"a": 1}'),
    (Constraint("list_items", 2), "Here:\n- one\n- two", "- one\n- two\n- three"),
    (Constraint("starts_with", "Yes"), "  yes, it is.", "Yesterday it was."),
]


def test_every_kind_has_an_example_and_round_trips_through_its_sentence() -> None:
    assert {c.kind for c, _, _ in EXAMPLES} == set(KINDS)
    for constraint, good, bad in EXAMPLES:
        prompt = "Do this. " + render(constraint)
        assert parse_constraints(prompt) == [constraint]
        assert satisfied(constraint, good), (constraint, good)
        assert not satisfied(constraint, bad), (constraint, bad)


def test_reward_is_the_fraction_of_constraints_met() -> None:
    prompt = "Describe rain. " + " ".join(
        render(c) for c in (Constraint("max_words", 4), Constraint("lowercase"),
                            Constraint("keyword", "wet")))
    assert constraint_reward(prompt, "rain is wet") == 1.0
    assert pass_reward(prompt, "rain is wet") == 1.0
    assert constraint_reward(prompt, "Rain is wet") == pytest.approx(2 / 3)
    assert pass_reward(prompt, "Rain is wet") == 0.0
    assert constraint_reward(prompt, "Rain is cold and grey") == 0.0
    assert constraint_reward("No constraints here.", "anything") == 1.0


def test_bounds_are_exact_where_a_check_is_monotone() -> None:
    assert status(Constraint("forbidden_letter", "z"), "a zebra").fails_forever
    assert status(Constraint("max_words", 2), "one two three").fails_forever
    assert not status(Constraint("max_words", 2), "one two").fails_forever
    assert status(Constraint("lowercase"), "Hi").fails_forever
    assert status(Constraint("min_words", 2), "one two").passes_forever
    # A word at the very end may still grow into another word; one followed by a space not.
    assert not status(Constraint("forbidden_word", "cat"), "a cat").fails_forever
    assert status(Constraint("forbidden_word", "cat"), "a cat ").fails_forever
    assert status(Constraint("keyword", "cat"), "a cat.").passes_forever
    assert status(Constraint("json_keys", ("a",)), "Sure: {").fails_forever
    assert not status(Constraint("json_keys", ("a",)), ' {"a"').fails_forever
    assert status(Constraint("starts_with", "Yes"), "No").fails_forever
    assert status(Constraint("starts_with", "Yes"), "Yes,").passes_forever
    assert status(Constraint("starts_with", "Yes"), "Yes") == status(Constraint("lowercase"), "")
    prompt = "Go. " + render(Constraint("forbidden_letter", "z")) + " " + render(
        Constraint("min_words", 1))
    assert constraint_bounds(prompt, "zoo ") == (0.5, 0.5)
    assert pass_bounds(prompt, "zoo ") == (0.0, 0.0)
    assert pass_bounds(prompt, "") == (0.0, 1.0)


def test_the_shipped_verifiable_set_states_its_spec_in_its_text() -> None:
    items = load_prompts("verifiable")
    assert len(items) >= 48
    raw = resources.files("bench").joinpath("data", "verifiable.jsonl").read_text("utf-8")
    specs = [json.loads(line)["constraints"] for line in raw.splitlines() if line.strip()]
    kinds_used = set()
    for item, spec in zip(items, specs, strict=True):
        parsed = parse_constraints(prompt_as_text(item.prompt))
        expected = [Constraint(c["kind"], tuple(c["value"]) if isinstance(c["value"], list)
                               else c["value"]) for c in spec]
        assert parsed == expected, item.id
        kinds_used |= {c.kind for c in parsed}
    assert kinds_used == set(KINDS)
    assert len({item.id for item in items}) == len(items)


# Text drawn from an alphabet that hits every rule: letters of both cases, word characters
# around the keywords, newlines and list markers, JSON and fence characters.
PIECES = st.sampled_from(["a", "Z", "z", "e", "cat", "Cat", "cats", " ", "\n", "- ", "-", "{",
                          "}", '"a"', ":", "1", ",", "```", "json", "Yes", "yes", "No", "_",
                          "\t", "ß", "İ", ".", "very", "x"])
TEXTS = st.lists(PIECES, max_size=14).map("".join) | st.text(max_size=20)
CONSTRAINTS = [Constraint("max_words", 3), Constraint("min_words", 2),
               Constraint("forbidden_letter", "z"), Constraint("forbidden_letter", "i"),
               Constraint("forbidden_word", "cat"), Constraint("keyword", "cat"),
               Constraint("lowercase"), Constraint("json_keys", ("a",)),
               Constraint("list_items", 1), Constraint("starts_with", "Yes"),
               Constraint("starts_with", "cat")]


@settings(max_examples=400, deadline=None)
@given(text=TEXTS, split=st.integers(min_value=0, max_value=40), tail=TEXTS)
def test_bounds_hold_for_every_completion(text: str, split: int, tail: str) -> None:
    """Any split point of a response, and any other continuation of the same prefix."""
    prefix = text[: min(split, len(text))]
    for constraint in CONSTRAINTS:
        state = status(constraint, prefix)
        for final in (text, prefix + tail, prefix):
            verdict = satisfied(constraint, final)
            assert not (state.passes_forever and not verdict), (constraint, prefix, final)
            assert not (state.fails_forever and verdict), (constraint, prefix, final)
    prompt = "Task. " + " ".join(render(c) for c in CONSTRAINTS)
    for reward, bounds in ((constraint_reward, constraint_bounds), (pass_reward, pass_bounds)):
        lower, upper = bounds(prompt, prefix)
        for final in (text, prefix + tail):
            assert lower <= reward(prompt, final) <= upper
