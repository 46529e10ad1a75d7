"""``common.values``: lambda as read from configuration, requests and command lines, and
numbers JSON cannot hold as written in responses."""

from __future__ import annotations

import math
from typing import Any

import pytest

from common.values import json_number, lambda_value, parse_lambda

INFINITY_SPELLINGS = ["inf", "INF", "infinity", "Infinity", " off ", "OFF", "Off", False,
                      math.inf]


@pytest.mark.parametrize("value", INFINITY_SPELLINGS)
def test_parse_lambda_reads_the_spellings_of_infinity(value: Any) -> None:
    assert parse_lambda(value) == math.inf


@pytest.mark.parametrize("value", INFINITY_SPELLINGS)
def test_lambda_value_accepts_the_spellings_of_infinity(value: Any) -> None:
    assert lambda_value(value) == math.inf


@pytest.mark.parametrize(("value", "expected"), [
    ("0", 0.0), ("0.5", 0.5), (" 2 ", 2.0), ("1e3", 1000.0), (0, 0.0), (3, 3.0), (0.25, 0.25),
])
def test_lambda_value_accepts_numbers_and_numeric_strings(value: Any, expected: float) -> None:
    number = lambda_value(value)
    assert number == expected and type(number) is float


def test_parse_lambda_leaves_other_values_to_the_schema() -> None:
    assert parse_lambda(None) is None
    assert parse_lambda(2) == 2
    assert parse_lambda([1]) == [1]


@pytest.mark.parametrize("value", ["none", "None", "", "abc", "1,5", True])
def test_parse_lambda_refuses_words_that_are_not_lambdas(value: Any) -> None:
    with pytest.raises(ValueError, match="lambda must be"):
        parse_lambda(value)


@pytest.mark.parametrize("value", [
    "none", None, "nan", "NaN", math.nan, -1, -0.5, "-0.5", "-inf", -math.inf, True, [1],
    "abc",
])
def test_lambda_value_refuses_none_nan_negatives_and_booleans_true(value: Any) -> None:
    with pytest.raises(ValueError, match="lambda must be"):
        lambda_value(value)


@pytest.mark.parametrize(("value", "written"), [
    (math.inf, "inf"), (-math.inf, "-inf"), (0.0, 0.0), (1.5, 1.5), (-2.0, -2.0),
])
def test_json_number_spells_out_the_infinities(value: float, written: object) -> None:
    assert json_number(value) == written
    assert type(json_number(value)) is type(written)
