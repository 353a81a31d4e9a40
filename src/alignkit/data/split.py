"""Held-out splits that hold out whole prompts, and the overlap that remains between the two sides.

A model evaluated on rows whose prompt it trained on (another reply to the same prompt, or the same two
replies in another pair) is graded on what it has seen: a reward model's "held-out" accuracy over such
pairs measures memory, not generalization. ``data.eval_fraction`` therefore holds out whole prompt
groups (``data.eval_split_by=prompt``, the default): every row is keyed by its normalized prompt text
(:func:`prompt_key`) and a group goes to one side only. ``data.eval_split_by=row`` keeps the old split
by source row.

What may still be shared after a prompt split, or between training data and an explicit eval file, is
counted for ``data_report.json`` (:func:`overlaps`): held-out examples whose prompt is also a training
prompt (0 after a prompt split) and held-out examples that share a reply text with a training row (the
same reply under two prompts).
"""

from __future__ import annotations

import json
import random
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Iterable, List, Sequence, Set

from alignkit.data.load import DataError


def normalize_text(text: str) -> str:
    """The text two prompts must share to count as one: Unicode NFKC (full-width letters, ligatures and
    non-breaking spaces become their plain forms), case-folded, whitespace runs collapsed to one space,
    stripped at both ends. Punctuation and word order still count."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _content(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # content parts: the text ones, in order
        return " ".join(_content(p.get("text") if isinstance(p, dict) else p) for p in value)
    if isinstance(value, dict):
        if "content" in value or "role" in value:  # one message
            calls = value.get("tool_calls")
            return _content(value.get("content")) + (" " + json.dumps(calls, sort_keys=True) if calls else "")
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def message_text(value: Any) -> str:
    """A prompt or reply as text: a string itself; a message list as ``role: content`` lines (the role
    counts: the same words as a system or a user turn are different prompts)."""
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value):
        return "\n".join(f"{m.get('role')}: {_content(m.get('content'))}" for m in value)
    return _content(value)


def prompt_key(example) -> str:
    """The group of a parsed example (``data.formats`` dataclasses): its normalized prompt text.

    - ``prompt`` (preference pairs and rankings, KTO rows, RL prompts, SFT prompt/completion): the prompt;
    - an SFT conversation (``messages``): its turns before the first assistant reply, so the rows of one
      opening request stay together whatever follows;
    - plain text (SFT ``text`` or an empty prompt): the whole text (it has no prompt; equal texts stay
      together)."""
    messages = getattr(example, "messages", None)
    if messages is not None:
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), len(messages))
        return "messages|" + normalize_text(message_text(messages[:first]))
    prompt = getattr(example, "prompt", None)
    if prompt in (None, "", []):
        return "text|" + normalize_text(message_text(getattr(example, "completion", None)))
    return "prompt|" + normalize_text(message_text(prompt))


def response_keys(example) -> FrozenSet[str]:
    """Normalized texts of the replies an example carries (chosen and rejected, a completion, the
    assistant turns of a conversation); none for an RL prompt."""
    out = []
    for name in ("chosen", "rejected", "completion"):
        value = getattr(example, name, None)
        if value not in (None, ""):
            out.append(message_text(value))
    for m in getattr(example, "messages", None) or []:
        if m.get("role") == "assistant":
            out.append(_content(m.get("content")))
    return frozenset(t for t in (normalize_text(x) for x in out) if t)


@dataclass
class RowKeys:
    """Per source row: its prompt group and its reply texts (a ranking row's expanded pairs share both)."""

    prompt: Dict[int, str] = field(default_factory=dict)
    responses: Dict[int, Set[str]] = field(default_factory=dict)

    def add(self, example) -> None:
        self.prompt.setdefault(example.row, prompt_key(example))
        self.responses.setdefault(example.row, set()).update(response_keys(example))

    @classmethod
    def of(cls, examples: Iterable) -> "RowKeys":
        keys = cls()
        for ex in examples:
            keys.add(ex)
        return keys


def held_out_rows(rows: Sequence[int], keys: RowKeys, fraction: float, seed: int, by: str = "prompt",
                  source: str = "data") -> Set[int]:
    """The source rows held out by ``data.eval_fraction``: about ``fraction`` of ``rows`` (at least one
    row, never all of them), drawn with ``random.Random(seed)``.

    ``by="row"``: rows drawn one by one. ``by="prompt"``: prompt groups (:func:`prompt_key`) in a seeded
    random order, taken whole until the held-out rows reach ``round(fraction * len(rows))`` (at least one
    group); a group is never split, so the held-out share can exceed ``fraction`` by up to one group."""
    rows = sorted(set(rows))
    target = max(1, int(round(len(rows) * fraction)))
    if by == "row":
        order = list(rows)
        random.Random(seed).shuffle(order)
        return set(order[:target])
    if by != "prompt":
        raise ValueError(f"data.eval_split_by must be prompt or row, not {by!r}")
    groups: Dict[str, List[int]] = {}
    for r in rows:  # groups in order of first appearance, so the draw depends on the data and seed only
        groups.setdefault(keys.prompt[r], []).append(r)
    if len(groups) < 2:
        raise DataError(f"{source}: data.eval_fraction={fraction:g} cannot hold out whole prompts: all {len(rows)} "
                        "rows share one prompt; give data.eval_path, or set data.eval_split_by=row")
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    held: Set[int] = set()
    for group in order[:-1]:  # the last group always trains
        if len(held) >= target:
            break
        held.update(group)
    return held


def overlaps(train_rows: Iterable[int], train_keys: RowKeys, eval_rows: Iterable[int], eval_keys: RowKeys,
             ) -> Dict[str, int]:
    """Held-out examples (one per entry of ``eval_rows``, a row repeated per expanded pair) that share
    with the training rows: ``prompt_overlap_with_train``, their prompt group;
    ``response_overlap_with_train``, at least one reply text (under any prompt)."""
    train_rows = list(train_rows)
    prompts = {train_keys.prompt[r] for r in train_rows}
    replies: Set[str] = set()
    for r in train_rows:
        replies |= train_keys.responses.get(r, set())
    n_prompt = n_reply = 0
    for r in eval_rows:
        n_prompt += eval_keys.prompt[r] in prompts
        n_reply += bool(eval_keys.responses.get(r, set()) & replies)
    return {"prompt_overlap_with_train": n_prompt, "response_overlap_with_train": n_reply}
