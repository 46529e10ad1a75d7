"""Verifiable instructions: constraints a program checks, read from the prompt's own sentences.

Each constraint kind has one fixed sentence (:func:`render`) that :func:`parse_constraints`
reads back from the prompt text, so any prompt written with them works. The reward is the
fraction of constraints met (1.0 = pass; none stated = 1.0); the bounds are exact where a
check is monotone in the response (docs/rewards.md).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

KINDS = ("max_words", "min_words", "forbidden_letter", "forbidden_word", "keyword",
         "lowercase", "json_keys", "list_items", "starts_with")


@dataclass(frozen=True)
class Constraint:
    """One checkable instruction: its kind and its argument (a count, a letter, words)."""

    kind: str
    value: int | str | tuple[str, ...] | None = None


@dataclass(frozen=True)
class Status:
    """What a partial response already decides about one constraint, for every completion."""

    passes_forever: bool = False
    fails_forever: bool = False


_WORD = r"[^'\n]+"
_PATTERNS: dict[str, re.Pattern[str]] = {
    "max_words": re.compile(r"Answer in at most (\d+) words\."),
    "min_words": re.compile(r"Write at least (\d+) words\."),
    "forbidden_letter": re.compile(r"Do not use the letter '([a-z])'\."),
    "forbidden_word": re.compile(rf"Do not use the word '({_WORD})'\."),
    "keyword": re.compile(rf"Include the word '({_WORD})'\."),
    "lowercase": re.compile(r"Write everything in lowercase letters\."),
    "json_keys": re.compile(r"Answer with only a JSON object that has the keys "
                            rf"('{_WORD}'(?:, '{_WORD}')*)\."),
    "list_items": re.compile(r"Answer with a list of exactly (\d+) lines that start "
                             r"with '- '\."),
    "starts_with": re.compile(rf"Begin your answer with the word '({_WORD})'\."),
}


def render(constraint: Constraint) -> str:
    """The sentence that states ``constraint`` in a prompt (what the parser reads back)."""
    value = constraint.value
    sentences: dict[str, Callable[[], str]] = {
        "max_words": lambda: f"Answer in at most {value} words.",
        "min_words": lambda: f"Write at least {value} words.",
        "forbidden_letter": lambda: f"Do not use the letter '{value}'.",
        "forbidden_word": lambda: f"Do not use the word '{value}'.",
        "keyword": lambda: f"Include the word '{value}'.",
        "lowercase": lambda: "Write everything in lowercase letters.",
        "json_keys": lambda: "Answer with only a JSON object that has the keys "
                             + ", ".join(f"'{k}'" for k in _keys(constraint)) + ".",
        "list_items": lambda: f"Answer with a list of exactly {value} lines that start "
                              "with '- '.",
        "starts_with": lambda: f"Begin your answer with the word '{value}'.",
    }
    return sentences[constraint.kind]()


def _argument(kind: str, match: re.Match[str]) -> int | str | tuple[str, ...] | None:
    if kind == "lowercase":
        return None
    text = match.group(1)
    if kind in ("max_words", "min_words", "list_items"):
        return int(text)
    if kind == "json_keys":
        return tuple(key.strip("'") for key in text.split(", "))
    return text


def parse_constraints(prompt: str) -> list[Constraint]:
    """The constraints stated in ``prompt``, in the order they appear."""
    found: list[tuple[int, Constraint]] = []
    for kind, pattern in _PATTERNS.items():
        for match in pattern.finditer(prompt):
            found.append((match.start(), Constraint(kind, _argument(kind, match))))
    return [c for _, c in sorted(found, key=lambda item: item[0])]


# ---- the checks: each constraint's final verdict, and what a prefix already decides ----
# A completion appends characters, so anything that looks only at characters before the
# last one of the prefix (plus the last one where appending cannot change the verdict) is
# fixed for every completion; the comments say why each rule is monotone.


def _count(constraint: Constraint) -> int:
    if not isinstance(constraint.value, int):
        raise ValueError(f"constraint '{constraint.kind}' needs a count")
    return constraint.value


def _keys(constraint: Constraint) -> tuple[str, ...]:
    if not isinstance(constraint.value, tuple):
        raise ValueError(f"constraint '{constraint.kind}' needs a tuple of keys")
    return constraint.value


def word_count(text: str) -> int:
    return len(text.split())


def _word_regex(word: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def _fixed_match(pattern: re.Pattern[str], text: str) -> bool:
    """A match that ends before the text does: its look-ahead saw a real character, so it
    stays a match whatever is appended."""
    return any(m.end() < len(text) for m in pattern.finditer(text))


def _has_letter(text: str, letter: str) -> bool:
    # Character by character (no case folding of whole strings, which can change lengths).
    return letter.lower() in text or letter.upper() in text


def _has_uppercase(text: str) -> bool:
    return any(ch.lower() != ch for ch in text)


def _json_object_keys(text: str) -> set[str] | None:
    body = text.strip()
    if body.startswith("```"):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        body = body.removesuffix("```").strip()
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return set(value) if isinstance(value, dict) else None


def _items(text: str) -> int:
    # Lines split at "\n" only: a line that starts with "- " keeps doing so as it grows.
    return sum(1 for line in text.split("\n") if line.lstrip(" ").startswith("- "))


def _starts_with(text: str, word: str) -> bool:
    body = text.lstrip()
    head, rest = body[: len(word)], body[len(word) :]
    return head.lower() == word.lower() and not (rest[:1].isalnum() or rest[:1] == "_")


def satisfied(constraint: Constraint, response: str) -> bool:
    """Whether the finished ``response`` meets ``constraint``."""
    kind, value = constraint.kind, constraint.value
    if kind in ("max_words", "min_words", "list_items"):
        limit = _count(constraint)
        count = word_count(response) if kind != "list_items" else _items(response)
        return {"max_words": count <= limit, "min_words": count >= limit,
                "list_items": count == limit}[kind]
    if kind == "forbidden_letter":
        return not _has_letter(response, str(value))
    if kind in ("forbidden_word", "keyword"):
        found = _word_regex(str(value)).search(response) is not None
        return found if kind == "keyword" else not found
    if kind == "lowercase":
        return not _has_uppercase(response)
    if kind == "json_keys":
        keys = _json_object_keys(response)
        return keys is not None and set(_keys(constraint)) <= keys
    if kind == "starts_with":
        return _starts_with(response, str(value))
    raise ValueError(f"unknown constraint kind '{kind}'")


def status(constraint: Constraint, partial: str) -> Status:
    """What ``partial`` decides about ``constraint`` for every completion of it."""
    kind, value = constraint.kind, constraint.value
    if kind in ("max_words", "min_words", "list_items"):
        # Appending text never lowers the number of words (the last word may only grow) or
        # of item lines (the last line keeps its "- ").
        limit = _count(constraint)
        count = word_count(partial) if kind != "list_items" else _items(partial)
        if kind == "min_words":
            return Status(passes_forever=count >= limit)
        return Status(fails_forever=count > limit)
    if kind == "forbidden_letter":
        return Status(fails_forever=_has_letter(partial, str(value)))
    if kind in ("forbidden_word", "keyword"):
        fixed = _fixed_match(_word_regex(str(value)), partial)
        return Status(passes_forever=fixed) if kind == "keyword" else Status(fails_forever=fixed)
    if kind == "lowercase":
        return Status(fails_forever=_has_uppercase(partial))
    if kind == "json_keys":
        # The whole (stripped) response must be JSON: a first character that is neither
        # "{" nor a code fence's "`" can never become one.
        body = partial.lstrip()
        return Status(fails_forever=bool(body) and body[0] not in "{`")
    if kind == "starts_with":
        return _starts_with_status(partial, str(value))
    raise ValueError(f"unknown constraint kind '{kind}'")


def _starts_with_status(partial: str, word: str) -> Status:
    body = partial.lstrip()
    if len(body) < len(word):
        # Lower-casing character by character (no character that lower-cases to several)
        # makes a mismatch in the letters so far final.
        simple = all(len(ch.lower()) == 1 for ch in body + word)
        started = body.lower() == word[: len(body)].lower()
        return Status(fails_forever=bool(body) and simple and not started)
    if len(body) == len(word) and body.lower() == word.lower():
        return Status()  # the character after the word is still to come
    verdict = _starts_with(partial, word)
    return Status(passes_forever=verdict, fails_forever=not verdict)


def constraint_reward(prompt: str, response: str) -> float:
    """The fraction of the prompt's constraints that ``response`` satisfies (1.0 if none)."""
    constraints = parse_constraints(prompt)
    if not constraints:
        return 1.0
    return sum(satisfied(c, response) for c in constraints) / len(constraints)


def constraint_bounds(prompt: str, partial: str) -> tuple[float, float]:
    """Bounds on :func:`constraint_reward` of every completion of ``partial``: the share of
    constraints already met for good, and one minus the share already failed for good."""
    constraints = parse_constraints(prompt)
    if not constraints:
        return 1.0, 1.0
    states = [status(c, partial) for c in constraints]
    total = len(constraints)
    return (sum(s.passes_forever for s in states) / total,
            (total - sum(s.fails_forever for s in states)) / total)


def pass_reward(prompt: str, response: str) -> float:
    """1.0 when ``response`` satisfies every constraint of the prompt, else 0.0."""
    return 1.0 if constraint_reward(prompt, response) == 1.0 else 0.0


def pass_bounds(prompt: str, partial: str) -> tuple[float, float]:
    """Bounds on :func:`pass_reward` of every completion of ``partial``."""
    states = [status(c, partial) for c in parse_constraints(prompt)]
    lower = 1.0 if all(s.passes_forever for s in states) else 0.0
    upper = 0.0 if any(s.fails_forever for s in states) else 1.0
    return lower, upper
