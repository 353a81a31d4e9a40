"""Verifiable rewards and data of the reasoning demo (``alignkit demo --task reasoning``).

The task: small additions and counting questions whose answer must be written as
``<answer>N</answer>``; a rule checks it (R1-Zero style: an accuracy reward plus a format reward,
DeepSeek-AI 2025, sec. 2.2.2). Use as ``python:alignkit.rewards.reasoning:tagged_correct`` (reads the
row's ``answer`` field) and ``python:alignkit.rewards.reasoning:answer_format``.
"""

from __future__ import annotations

import random
import re
from typing import Any, Dict, List, Sequence

from alignkit.rewards.answer import answers_match

_TAG = re.compile(r"<answer>\s*([^<]*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
INSTRUCTION = "Write the final answer as a number inside <answer></answer> tags, for example <answer>5</answer>."


def tagged_answer(text: str):
    """The content of the last ``<answer>...</answer>`` tag, or None when there is none."""
    found = _TAG.findall(text)
    return found[-1] if found else None


def tagged_correct(prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any] = (), **_: Any
                   ) -> List[float]:
    """1.0 when the completion's last ``<answer>`` tag holds the reference answer (numeric-aware), else 0.
    An answer outside the tags does not count: the format is part of the task."""
    out = []
    for text, ref in zip(completions, answer):
        got = tagged_answer(text)
        out.append(1.0 if got is not None and answers_match(got, str(ref)) else 0.0)
    return out


def answer_format(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> List[float]:
    """1.0 when the completion has exactly one ``<answer>`` tag holding a number, else 0."""
    out = []
    for text in completions:
        found = _TAG.findall(text)
        out.append(1.0 if len(found) == 1 and re.fullmatch(r"-?\d+", found[0].strip()) else 0.0)
    return out


def reasoning_rows(n: int, seed: int) -> List[Dict[str, Any]]:
    """``n`` prompt rows ``{prompt: [user message], answer}``: additions of two numbers from 2 to 30 and counts of a word
    in a short list, each with the answer-format instruction. Different seeds give disjoint-looking sets
    (held-out prompts use another seed; exact duplicates are removed against nothing else)."""
    rng = random.Random(seed)
    words = ["apple", "cat", "sun", "book", "tree", "cup"]
    rows = []
    for i in range(n):
        if i % 2 == 0:
            a, b = rng.randint(2, 30), rng.randint(2, 30)
            q, ans = f"What is {a} + {b}?", a + b
        else:
            w, other = rng.sample(words, 2)
            items = [w] * rng.randint(2, 6) + [other] * rng.randint(1, 3)
            rng.shuffle(items)
            q, ans = f'How many times does the word "{w}" appear in this list: {", ".join(items)}?', items.count(w)
        # a message list, so the chat template applies (a plain string prompt is fed raw: data.chat_template=auto)
        rows.append({"prompt": [{"role": "user", "content": f"{q} {INSTRUCTION}"}], "answer": str(ans)})
    return rows
