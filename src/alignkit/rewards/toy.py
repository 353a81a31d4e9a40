"""Toy gold rewards for controlled tests: cheap, deterministic, learnable by a tiny model in seconds.

Use as ``python:alignkit.rewards.toy:char_share`` (options become keyword arguments, e.g.
``{kind: python, arg: "alignkit.rewards.toy:char_share", options: {char: "e"}}``).
"""

from __future__ import annotations

from typing import Any, List


def char_share(prompts: List[Any], completions: List[str], char: str = "a", chars: str = "", **_: Any) -> List[float]:
    """Share of ``char`` (or of any character in ``chars``, when given) among each completion's non-space
    characters (0.0 for an empty one); a rule-checked reward in [0, 1].

    ``"aab b"`` with ``char="a"`` -> 2 of 4 non-space characters -> 0.5; ``"a1 2"`` with
    ``chars="0123456789"`` -> 2 of 3 -> 0.667.
    """
    if not chars and len(char) != 1:
        raise ValueError(f"char_share: char must be a single character, got {char!r}")
    wanted = set(chars) if chars else {char}
    out = []
    for text in completions:
        visible = [c for c in text if not c.isspace()]
        out.append(sum(c in wanted for c in visible) / len(visible) if visible else 0.0)
    return out
