"""Final-answer extraction and numeric-aware comparison (the ``match`` reward kind).

Extraction priority (first that applies):

1. the content of the last ``<answer>...</answer>``;
2. the content of the last ``\\boxed{...}`` (nested braces allowed);
3. the text after the last ``answer is`` / ``answer:`` / ``####`` marker, up to the end of that
   line or the first sentence-ending ``". "``;
4. the last number in the text;
5. otherwise the whole (stripped) text.

Comparison: numeric when both sides parse as numbers (commas, ``$``, ``%`` and a trailing ``.``
are stripped; ``3/4`` and ``\\frac{3}{4}`` are fractions; relative tolerance 1e-6). When the
reference is a number and the prediction is a number followed by words (``42 apples``), the
leading number is compared. Otherwise normalized string equality (casefold, collapsed
whitespace, trailing punctuation stripped).
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_MARKER = re.compile(r"answer\s+is\b|answer\s*:|####", re.IGNORECASE)
# a number as written in text: 1,234.5 / -3 / .5 / 3/4 / $12 / 50%
_NUMBER_IN_TEXT = re.compile(
    r"[-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?%?|[-+]?\.\d+%?")
_LEADING_NUMBER = re.compile(r"^\s*([-+]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?%?)(?:\s+\S|$)")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]+)\}\s*\{([^{}]+)\}")
_TEXT_CMD = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}")
_TRAILING_PUNCT = ".,;:!?"


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` with balanced braces, or None."""
    i = text.rfind("\\boxed")
    while i != -1:
        j = i + len("\\boxed")
        while j < len(text) and text[j].isspace():
            j += 1
        if j < len(text) and text[j] == "{":
            depth, k = 0, j
            while k < len(text):
                if text[k] == "{":
                    depth += 1
                elif text[k] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[j + 1:k]
                k += 1
        i = text.rfind("\\boxed", 0, i)
    return None


def _after_marker(text: str) -> Optional[str]:
    marks = list(_MARKER.finditer(text))
    if not marks:
        return None
    rest = text[marks[-1].end():].lstrip(" \t\r\n:")
    line = rest.split("\n", 1)[0]
    # cut at the first sentence end ("42. I hope ..."); "3.5" has no space after its dot
    line = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0]
    return line.strip()


def extract_answer(text: str) -> str:
    """The final answer in ``text`` (see the module docstring for the priority)."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = tags[-1]
        boxed = _last_boxed(inner)  # "<answer>\boxed{4}</answer>"
        return (boxed if boxed is not None else inner).strip()
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    marked = _after_marker(text)
    if marked:
        return marked
    numbers = _NUMBER_IN_TEXT.findall(text)
    if numbers:
        return numbers[-1].strip()
    return text.strip()


def reference_answer(value: Any) -> str:
    """The reference as a string; a reference with an explicit marker (``<answer>``, ``\\boxed``,
    ``####``, as in GSM8K/MATH solutions) is reduced to its final answer first."""
    s = str(value).strip()
    if "<answer>" in s.lower() or "\\boxed" in s or "####" in s:
        return extract_answer(s)
    return s


def _clean(s: str) -> str:
    s = s.strip().strip("*`").strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$" and not _PLAIN_NUMBER.fullmatch(s[1:-1].replace(",", "")):
        s = s.strip("$").strip()  # $x+1$ (LaTeX math), but keep "$5" handled by parse_number
    s = _TEXT_CMD.sub(r"\1", s)
    return s.strip()


def parse_number(s: str) -> Optional[float]:
    """``s`` as a float, or None. Accepts ``1,000``, ``$5``, ``50%``, ``12.``, ``3/4``,
    ``\\frac{3}{4}``, ``-2.5e3``; rejects anything else (including ``nan``/``inf``)."""
    t = _clean(s)
    t = _FRAC.sub(r"\1/\2", t)
    for junk in ("\\!", "{,}", "\\$", "\\%", "\\,"):
        t = t.replace(junk, "")
    t = t.replace(",", "").replace("$", "").replace("%", "").strip()
    t = t.rstrip(".").strip()
    t = re.sub(r"\s*/\s*", "/", t)
    if t.count("/") == 1:
        num, den = t.split("/")
        if _PLAIN_NUMBER.fullmatch(num) and _PLAIN_NUMBER.fullmatch(den) and float(den) != 0.0:
            return float(num) / float(den)
        return None
    if _PLAIN_NUMBER.fullmatch(t):
        return float(t)
    return None


def normalize_text(s: str) -> str:
    """Casefold, collapse whitespace, strip trailing punctuation."""
    s = " ".join(_clean(s).casefold().split())
    return s.rstrip(_TRAILING_PUNCT).strip()


def answers_match(prediction: str, reference: str, rel_tol: float = 1e-6) -> bool:
    """Compare an extracted answer with a reference answer (numeric-aware)."""
    ref_num = parse_number(reference)
    if ref_num is not None:
        pred_num = parse_number(prediction)
        if pred_num is None:
            lead = _LEADING_NUMBER.match(_clean(prediction))
            pred_num = parse_number(lead.group(1)) if lead else None
        if pred_num is not None:
            return math.isclose(pred_num, ref_num, rel_tol=rel_tol, abs_tol=1e-12)
    return normalize_text(prediction) == normalize_text(reference)


def is_correct(completion: str, reference: Any) -> bool:
    """Extract the final answer from ``completion`` and compare it with ``reference``."""
    return answers_match(extract_answer(completion), reference_answer(reference))
