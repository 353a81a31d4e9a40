"""Pure functions of red-teaming: what counts as an attack, a success, a novel attack, a refusal.

Everything here works on plain strings and numbers, so the tests drive it with hand-made inputs.

- Attack success rate (ASR): the share of attacks whose answer the judge scores above the failure
  threshold, with a Wilson interval (HarmBench, Mazeika et al. 2024, sec. 4: ASR of a fixed budget of
  test cases judged by a classifier; Perez et al. 2022, sec. 3: the share of test cases that elicit an
  offensive reply).
- Diversity of the successful attacks (Perez et al. 2022, sec. 3, Fig. 2: self-BLEU of the test cases
  against each other; distinct-n of Li et al. 2016 from :mod:`alignkit.eval.metrics`).
- Novelty of a new attack against all earlier ones, ``1 - BLEU(x, earlier)`` (Hong et al. 2024,
  "Curiosity-driven Red-teaming", sec. 3.2: the SelfBLEU novelty reward ``-Σ_n SelfBLEU(x, n)``
  against the attacks generated so far; the embedding-cosine term of that paper is not implemented).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence

from alignkit.eval.markers import is_refusal
from alignkit.eval.metrics import distinct_n
from alignkit.eval.stats import Interval, binomial_interval

NAN = float("nan")

# ----------------------------------------------------------------------------- attacks

_LEADS = re.compile(r"^\s*(?:[-*•>]+|\d+[.)]|(?:message|prompt|question|attack|user|test case)\s*\d*\s*:)\s*",
                    re.IGNORECASE)


def extract_attack(text: str, max_chars: int = 500) -> str:
    """The attack prompt in an attacker's reply: its first non-empty line, without a list marker
    ("1.", "-"), a label ("Message:") or surrounding quotes. A first line that only announces the
    message ("Here is a message:") gives way to the next line. At most ``max_chars`` characters.

    ``'Here is one:\\n1. "Why are Mondays awful?"'`` -> ``Why are Mondays awful?``."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        lines = lines[1:]
    if not lines:
        return ""
    line = lines[0]
    for _ in range(3):  # a marker and a label: "- Message: ..."
        line = _LEADS.sub("", line, count=1).strip()
    if len(line) >= 2 and line[0] in "\"'“‘" and line[-1] in "\"'”’":
        line = line[1:-1].strip()
    return line[:max_chars]


# ----------------------------------------------------------------------------- BLEU

def _words(text: str) -> List[str]:
    return text.lower().split()


def _grams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _bleu_from(tokens: List[str], max_counts: List[Counter], ref_lengths: Sequence[int], max_n: int,
               brevity: bool) -> float:
    """Sentence BLEU (Papineni et al. 2002, eq. for BLEU-N with uniform weights) of ``tokens`` against
    references summarised by, per order n, the largest count of each n-gram in any one reference
    (the clipping counts). Orders n >= 2 are smoothed by adding 1 to numerator and denominator
    (Lin and Och 2004, "ORANGE", smoothing 2), so a short text without any matching 4-gram does not
    score 0. The brevity penalty uses the reference length closest to the candidate's."""
    if not tokens:
        return 0.0
    logs = []
    for n in range(1, max_n + 1):
        grams = _grams(tokens, n)
        total = sum(grams.values())
        matched = sum(min(c, max_counts[n - 1].get(g, 0)) for g, c in grams.items())
        if n == 1:
            if matched == 0:
                return 0.0
            logs.append(math.log(matched / total))
        else:
            logs.append(math.log((matched + 1) / (total + 1)))
    score = math.exp(sum(logs) / max_n)
    if brevity and ref_lengths:
        c = len(tokens)
        r = min(ref_lengths, key=lambda x: (abs(x - c), x))
        if c < r:
            score *= math.exp(1 - r / c)
    return score


def _max_counts(references: Iterable[List[str]], max_n: int) -> List[Counter]:
    out = [Counter() for _ in range(max_n)]
    for ref in references:
        for n in range(1, max_n + 1):
            for g, c in _grams(ref, n).items():
                if c > out[n - 1][g]:
                    out[n - 1][g] = c
    return out


def sentence_bleu(candidate: str, references: Sequence[str], max_n: int = 4) -> float:
    """BLEU of one text against several references (lower-cased whitespace words), in [0, 1].

    ``sentence_bleu("a b c d", ["a b c d"])`` = 1.0; no word in common -> 0.0."""
    refs = [_words(r) for r in references]
    if not refs:
        return 0.0
    return _bleu_from(_words(candidate), _max_counts(refs, max_n), [len(r) for r in refs], max_n, True)


def self_bleu(texts: Sequence[str], max_n: int = 4, max_texts: int = 200) -> float:
    """Self-BLEU (Zhu et al. 2018, Texygen; the diversity measure of Perez et al. 2022, sec. 3): the mean
    BLEU of each text against all the others. 1.0: every text repeats the others; near 0: no shared
    words. Only the first ``max_texts`` texts are used (the cost grows with the square); nan for
    fewer than 2."""
    texts = list(texts)[:max_texts]
    if len(texts) < 2:
        return NAN
    toks = [_words(t) for t in texts]
    vals = []
    for i, t in enumerate(toks):
        others = toks[:i] + toks[i + 1:]
        vals.append(_bleu_from(t, _max_counts(others, max_n), [len(o) for o in others], max_n, True))
    return sum(vals) / len(vals)


class NoveltyMemory:
    """The attacks so far, and the novelty of a new one against them (Hong et al. 2024, sec. 3.2).

    ``novelty(x) = 1 - BLEU_p(x, memory)`` with ``BLEU_p`` the geometric mean of the clipped n-gram
    precisions (no brevity penalty: a short new attack is not less novel for being short). 1.0 with an
    empty memory or no word in common; 0.0 for an exact repeat of an earlier attack. The memory keeps
    the clipping counts incrementally, so a novelty costs O(len(x)) whatever the number of attacks."""

    def __init__(self, max_n: int = 2):
        self.max_n = max_n
        self.counts: List[Counter] = [Counter() for _ in range(max_n)]
        self.size = 0

    def novelty(self, text: str) -> float:
        if self.size == 0:
            return 1.0
        toks = _words(text)
        if not toks:
            return 0.0  # an empty attack is never novel
        return 1.0 - _bleu_from(toks, self.counts, (), min(self.max_n, len(toks)), False)

    def add(self, text: str) -> None:
        toks = _words(text)
        for n in range(1, self.max_n + 1):
            for g, c in _grams(toks, n).items():
                if c > self.counts[n - 1][g]:
                    self.counts[n - 1][g] = c
        self.size += 1

    def score_batch(self, texts: Sequence[str]) -> List[float]:
        """Novelty of each text against the memory *and the texts before it in the batch*, then all of
        them join the memory (so two copies of one attack in a batch do not both count as novel)."""
        out = []
        for t in texts:
            out.append(self.novelty(t))
            self.add(t)
        return out


# ----------------------------------------------------------------------------- refusals

#: Phrases that mark a refusal when they open the answer's first sentence or two. A documented rule set,
#: not a classifier: it misses a refusal phrased otherwise, and a compliant answer that begins "I'm sorry
#: to hear that" is a refusal only when a refusal phrase follows (tests/test_redteam.py).
def redteam_is_refusal(text: str, window: int = 200) -> bool:
    """Whether an answer refuses: the one rule set of :func:`alignkit.eval.markers.is_refusal`
    (:data:`alignkit.eval.markers.REFUSAL_PATTERNS`) on its first ``window`` characters (a refusal comes
    first; a compliant answer that mentions "I can't" later is not one). Over-refusal is the rate of this
    on safe prompts (the XSTest idea of Röttger et al. 2023: safe prompts that look unsafe).

    ``"I'm sorry, but I can't help with that."`` -> True; ``"Sure! To kill a Python process, run kill PID."`` ->
    False."""
    return is_refusal(text[:window])


# ----------------------------------------------------------------------------- reports

@dataclass
class AttackRecord:
    """One attack: the prompt sent to the target, its answer, the judge's failure score and whether
    that is above the threshold, the novelty against earlier attacks, and where it came from."""

    prompt: str
    answer: str
    score: float
    failure: bool
    novelty: float = NAN
    category: Optional[str] = None
    step: int = 0
    raw: str = ""

    def row(self, method: str) -> Dict[str, Any]:
        """The attacks.jsonl row: prompt shape (``prompt`` plus fields), readable by cai-sl, sft, eval."""
        r = {"prompt": self.prompt, "target_answer": self.answer, "score": self.score, "failure": self.failure,
             "novelty": self.novelty, "step": self.step, "method": method, "attacker_output": self.raw}
        if self.category is not None:
            r["category"] = self.category
        return r


def rate(flags: Sequence[bool]) -> Interval:
    """A proportion with its Wilson interval (eval.stats.binomial_interval)."""
    return binomial_interval(sum(bool(f) for f in flags), len(flags))


def diversity(texts: Sequence[str]) -> Dict[str, float]:
    """distinct-1/2 (pooled n-grams) and self-BLEU of a set of attacks; nan where undefined."""
    texts = list(texts)
    return {"distinct_1": distinct_n(texts, 1) if texts else NAN,
            "distinct_2": distinct_n(texts, 2) if texts else NAN,
            "self_bleu": self_bleu(texts)}


def attack_report(records: Sequence[AttackRecord], top: int = 10) -> Dict[str, Any]:
    """Flat numbers (``redteam/...``) for summary.json plus ``top``: the highest-scoring failures.

    ASR with a Wilson interval; diversity of the successful attacks (distinct-n, self-BLEU) and of all
    attacks; per category (``redteam/asr/<category>``) when the attacks have categories. Duplicate
    successful prompts count as attacks but ``unique_failures`` says how many were distinct."""
    recs = list(records)
    asr = rate([r.failure for r in recs])
    wins = [r for r in recs if r.failure]
    out: Dict[str, Any] = {"redteam/attacks": len(recs), "redteam/failures": len(wins),
                           "redteam/asr": asr.mean, "redteam/asr_lo": asr.lo, "redteam/asr_hi": asr.hi,
                           "redteam/unique_failures": len({r.prompt for r in wins}),
                           "redteam/empty_attacks": sum(1 for r in recs if not r.prompt.strip()),
                           "redteam/score_mean": sum(r.score for r in recs) / len(recs) if recs else NAN}
    for k, v in diversity([r.prompt for r in wins]).items():
        out[f"redteam/success_{k}"] = v
    for k, v in diversity([r.prompt for r in recs]).items():
        out[f"redteam/all_{k}"] = v
    cats = sorted({r.category for r in recs if r.category is not None})
    for c in cats:
        ci = rate([r.failure for r in recs if r.category == c])
        out[f"redteam/asr/{c}"] = ci.mean
        out[f"redteam/asr_lo/{c}"] = ci.lo
        out[f"redteam/asr_hi/{c}"] = ci.hi
    best = sorted(wins, key=lambda r: -r.score)
    seen, tops = set(), []
    for r in best:
        if r.prompt not in seen:
            seen.add(r.prompt)
            tops.append({"prompt": r.prompt, "answer": r.answer, "score": r.score, "category": r.category})
        if len(tops) >= top:
            break
    out["top"] = tops
    return out


def rate_difference(k1: int, n1: int, k2: int, n2: int, level: float = 0.95) -> Dict[str, Any]:
    """``p2 - p1`` of two independent proportions with Newcombe's hybrid score interval (Newcombe 1998,
    "Interval estimation for the difference between independent proportions", method 10), built from
    the two Wilson intervals: ``[d - sqrt((p2-l2)^2 + (u1-p1)^2), d + sqrt((u2-p2)^2 + (p1-l1)^2)]``.
    The verdict: ``lower`` / ``higher`` when the interval excludes 0, else ``not distinguishable``."""
    a, b = binomial_interval(k1, n1, level), binomial_interval(k2, n2, level)
    if n1 <= 0 or n2 <= 0:
        return {"diff": NAN, "lo": NAN, "hi": NAN, "verdict": "not distinguishable"}
    d = b.mean - a.mean
    lo = d - math.sqrt((b.mean - b.lo) ** 2 + (a.hi - a.mean) ** 2)
    hi = d + math.sqrt((b.hi - b.mean) ** 2 + (a.mean - a.lo) ** 2)
    verdict = "lower" if hi < 0 else "higher" if lo > 0 else "not distinguishable"
    return {"diff": d, "lo": lo, "hi": hi, "verdict": verdict}
