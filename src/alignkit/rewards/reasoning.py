"""Verifiable rewards and data of the reasoning demo (``alignkit demo --task reasoning``).

The task: "What is a + b?" with a and b from 2 to 30, asked after a one-shot worked example
(``3 + 4 = 7 <answer>7</answer>``); the answer must be written as ``<answer>N</answer>`` and a rule checks
it (R1-Zero style: an accuracy reward plus a format reward, DeepSeek-AI 2025, "DeepSeek-R1: Incentivizing
Reasoning Capability in LLMs via Reinforcement Learning", sec. 2.2.2). Use as
``python:alignkit.rewards.reasoning:tagged_correct`` (reads the row's ``answer`` field) and
``python:alignkit.rewards.reasoning:answer_format``.

Why the worked example: the embedded SmolLM2-135M-Instruct ignores a written instruction to use the tag
(format rate 0.00 greedy, about 0.02 sampled at temperature 1, on 32 probe prompts with four different
wordings), so a reward on the tag alone gives GRPO nothing to work with. With the example turn it copies
the format and gets about 40% of the sums right greedily, which leaves the accuracy to improve.
"""

from __future__ import annotations

import random
import re
from typing import Any, Dict, Iterable, List, Sequence

from alignkit.rewards.answer import answers_match

_TAG = re.compile(r"<answer>\s*([^<]*?)\s*</answer>", re.IGNORECASE | re.DOTALL)
INSTRUCTION = "Put the answer in <answer></answer> tags."


def tagged_answer(text: str):
    """The content of the last ``<answer>...</answer>`` tag, or None when there is none."""
    found = _TAG.findall(text)
    return found[-1] if found else None


def tagged_correct(prompts: Sequence[Any], completions: Sequence[str], answer: Sequence[Any] = (), **_: Any
                   ) -> List[float]:
    """Accuracy reward (DeepSeek-AI 2025, R1, sec. 2.2.2): 1.0 when the completion's last ``<answer>`` tag
    holds the reference answer (numeric-aware), else 0. An answer outside the tags does not count: the
    format is part of the task."""
    out = []
    for text, ref in zip(completions, answer):
        got = tagged_answer(text)
        out.append(1.0 if got is not None and answers_match(got, str(ref)) else 0.0)
    return out


def answer_format(prompts: Sequence[Any], completions: Sequence[str], **_: Any) -> List[float]:
    """Format reward (DeepSeek-AI 2025, R1, sec. 2.2.2; partial credit next to the accuracy): 1.0 when the
    completion has exactly one ``<answer>`` tag holding a number, else 0."""
    out = []
    for text in completions:
        found = _TAG.findall(text)
        out.append(1.0 if len(found) == 1 and re.fullmatch(r"-?\d+", found[0].strip()) else 0.0)
    return out


def worked_example(a: int = 3, b: int = 4) -> List[Dict[str, str]]:
    """The one-shot turn pair every prompt starts with: a user question and an assistant reply that shows the
    working and the tag (``3 + 4 = 7 <answer>7</answer>``)."""
    return [{"role": "user", "content": f"What is {a} + {b}? {INSTRUCTION}"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b} <answer>{a + b}</answer>"}]


def reasoning_rows(n: int, seed: int, low: int = 2, high: int = 30, exclude: Iterable[str] = ()
                   ) -> List[Dict[str, Any]]:
    """``n`` distinct prompt rows ``{prompt: [messages], answer}``: "What is a + b?" with a and b drawn from
    ``low..high``, after the worked example (:func:`worked_example`) and with the answer-format instruction.
    Questions in ``exclude`` (e.g. the training questions, for a held-out set) are never drawn. Deterministic
    in ``seed``."""
    rng = random.Random(seed)
    seen = set(exclude) | {"What is 3 + 4?"}  # never the worked example itself
    if n > (high - low + 1) ** 2 - len(seen):
        raise ValueError(f"only {(high - low + 1) ** 2 - len(seen)} distinct questions with numbers "
                         f"{low}..{high}; asked for {n}")
    rows = []
    while len(rows) < n:
        a, b = rng.randint(low, high), rng.randint(low, high)
        q = f"What is {a} + {b}?"
        if q in seen:
            continue
        seen.add(q)
        # a message list, so the chat template applies (a plain string prompt is fed raw: data.chat_template=auto)
        rows.append({"prompt": worked_example() + [{"role": "user", "content": f"{q} {INSTRUCTION}"}],
                     "answer": str(a + b), "question": q})
    return rows
