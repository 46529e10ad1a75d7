"""Small rule-based rewards that ship with the service, usable as ``type: python`` rewards.

They serve as examples of the (prompt, response) -> float signature and as transparent
rewards for checking the selection rule end to end.
"""

from __future__ import annotations


def response_length(prompt: str, response: str) -> float:
    """Longer is better: the number of characters of the response."""
    return float(len(response))


def brevity(prompt: str, response: str) -> float:
    """Shorter is better: minus the number of words."""
    return -float(len(response.split()))


def keyword_overlap(prompt: str, response: str) -> float:
    """Share of the prompt's distinct words (of 4+ letters) that the response repeats."""
    words = {w.strip(".,;:!?\"'").lower() for w in prompt.split()}
    words = {w for w in words if len(w) >= 4}
    if not words:
        return 0.0
    said = {w.strip(".,;:!?\"'").lower() for w in response.split()}
    return len(words & said) / len(words)
