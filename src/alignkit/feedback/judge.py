"""A pairwise LLM judge scored from next-token probabilities, asked in both orders.

The judge reads a filled prompt template that shows a request and two responses in positions A and
B, and we read its verdict from the next-token distribution instead of parsing free text: with
``l_A`` and ``l_B`` the logits of the two option tokens,

    P(A) = exp(l_A) / (exp(l_A) + exp(l_B))                      (softmax over the two options)

This is how RLAIF (Lee et al. 2023, "RLAIF: Scaling Reinforcement Learning from Human Feedback with
AI Feedback", sec. 2.1) and Constitutional AI (Bai et al. 2022, sec. 4.1) turn a feedback model into
soft preference labels. LLM judges favour a position (Zheng et al. 2023, "Judging LLM-as-a-judge
with MT-Bench and Chatbot Arena", sec. 3.3; Wang et al. 2023, "Large Language Models are not Fair
Evaluators"), so every pair is asked twice, with the responses swapped, and averaged:

    p(a > b) = (P_ab(A) + 1 - P_ba(A)) / 2

where ``P_ab(A)`` is P(A) with ``a`` shown first and ``P_ba(A)`` with ``b`` shown first. A judge
whose log-odds are ``s(a) - s(b) + bias`` gives ``p = (sigma(d + bias) + sigma(d - bias)) / 2`` with
``d = s(a) - s(b)``: exactly 0.5 for equal responses whatever the bias, and ``p(a > b) = 1 - p(b > a)``.
When the two orders prefer different *responses* (each prefers the same *position*: the verdict
follows the position, not the content) the pair is *inconsistent*: dropped, marked as a tie or kept,
per ``judge.inconsistent``, and counted either way.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Protocol, Sequence

from pydantic import Field, field_validator, model_validator

from alignkit.config import ModelConfig, Section

DEFAULT_PRINCIPLE = "Choose the response that is more helpful, honest and harmless."

DEFAULT_TEMPLATE = """Compare two responses to the same request. {principle}

[Request]
{prompt}

[Response A]
{response_a}

[Response B]
{response_b}

Which response is better? Answer with a single letter, A or B."""

REQUIRED_FIELDS = ("prompt", "response_a", "response_b")
OPTIONAL_FIELDS = ("principle", "reference")


# ----------------------------------------------------------------------------- templates

def template_fields(template: str) -> List[str]:
    """Placeholder names used by a ``str.format`` template (``{{`` and ``}}`` are literal braces)."""
    try:
        return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        raise ValueError(f"judge template is not a valid format string ({e}); write literal braces as "
                         "{{ and }}") from None


def check_template(template: str, where: str = "judge.template") -> str:
    fields = template_fields(template)
    unknown = sorted({f for f in fields if f not in REQUIRED_FIELDS + OPTIONAL_FIELDS})
    if unknown:
        raise ValueError(f"{where}: unknown placeholder(s) {unknown}; allowed: "
                         + ", ".join("{" + f + "}" for f in REQUIRED_FIELDS + OPTIONAL_FIELDS))
    missing = [f for f in REQUIRED_FIELDS if f not in fields]
    if missing:
        raise ValueError(f"{where}: the template needs " + ", ".join("{" + f + "}" for f in missing))
    return template


def load_template(value: Optional[str]) -> str:
    """The template text: ``None`` -> the default, text with placeholders -> itself, else a file path."""
    if value is None:
        return DEFAULT_TEMPLATE
    if "{" in value:
        return check_template(value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise ValueError(f"judge.template: {value!r} is neither a file nor a template containing "
                         "{prompt}, {response_a} and {response_b}")
    return check_template(path.read_text(encoding="utf-8"), where=f"judge.template file {path}")


def prompt_text(prompt: Any) -> str:
    """A prompt as the judge sees it: strings as they are, chat messages as ``Role: content`` lines."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


# ----------------------------------------------------------------------------- options

class JudgeOptions(Section):
    model: ModelConfig = ModelConfig()
    """The judge: any causal LM (HF id or directory). Empty name: the command's policy model where it
    has one (cai-rl), else the embedded default."""
    template: Optional[str] = None
    """Pairwise prompt: inline text with {prompt}, {response_a}, {response_b} and optionally {principle},
    {reference}, or a file holding it. Empty: the built-in template (docs/feedback.md)."""
    principle: str = DEFAULT_PRINCIPLE
    """Text for {principle} when the row (field 'principle') or the constitution gives none."""
    reference_field: str = "reference"
    """Row field that fills {reference} (a gold answer shown to the judge) when the template uses it."""
    options: List[str] = ["A", "B"]
    """The two answers; the first means the response in position A is better. The verdict is the
    softmax over the logits of their first tokens at the position after the prompt."""
    answer_prefix: str = ""
    """Text appended after the judge prompt (after the assistant turn opens), right before the answer
    token, e.g. 'The better response is: '."""
    chat_template: Literal["auto", "never"] = "auto"
    """auto: send the filled template as a user turn through the judge's chat template when its
    tokenizer has one; never: plain text."""
    inconsistent: Literal["drop", "tie", "keep"] = "drop"
    """Pairs whose two orders prefer different responses (the verdict follows the position): drop
    them, keep them as ties (soft_label 0.5), or keep the order-averaged probability. Always counted."""
    min_confidence: float = Field(0.0, ge=0, lt=0.5)
    """Drop consistent pairs whose order-averaged probability is within this distance of 0.5 (counted
    as undecided)."""
    max_label: float = Field(1.0, gt=0.5, le=1)
    """Clamp soft labels to at most this (Bai et al. 2022 clamp chain-of-thought labels to 0.4-0.6)."""
    batch_size: int = Field(8, gt=0)
    """Judge prompts per forward pass."""
    max_length: int = Field(2048, gt=8)
    """Longest judge prompt in tokens; longer pairs are dropped and counted (too_long)."""

    @field_validator("template")
    @classmethod
    def _valid_template(cls, v: Optional[str]) -> Optional[str]:
        load_template(v)
        return v

    @model_validator(mode="after")
    def _two_options(self):
        if len(self.options) != 2 or len(set(self.options)) != 2 or not all(o for o in self.options):
            raise ValueError(f"judge.options must be two different non-empty strings, got {self.options}")
        return self


# ----------------------------------------------------------------------------- queries and verdicts

@dataclass
class JudgeQuery:
    """One question to the judge: is ``first`` (shown in position A) better than ``second``?"""

    prompt: Any
    first: str
    second: str
    principle: Optional[str] = None
    reference: Optional[str] = None


class PairwiseJudge(Protocol):
    """Anything that returns P(position A is better) per query (``nan``: could not judge)."""

    def first_probs(self, queries: Sequence[JudgeQuery]) -> List[float]: ...


@dataclass
class Verdict:
    """The judge's two answers for responses ``a`` and ``b``."""

    p_ab: float  # P(A) with a in position A
    p_ba: float  # P(A) with b in position A

    @property
    def prob_a(self) -> float:
        """Order-averaged probability that ``a`` is better: (P_ab(A) + 1 - P_ba(A)) / 2."""
        return (self.p_ab + 1.0 - self.p_ba) / 2.0

    @property
    def consistent(self) -> bool:
        """Both orders prefer the same response (a 0.5 in either order never contradicts)."""
        return (self.p_ab - 0.5) * (0.5 - self.p_ba) >= 0.0

    @property
    def position_bias(self) -> float:
        """(P_ab(A) + P_ba(A)) / 2 - 0.5: above 0 the judge favours position A, 0 is unbiased."""
        return (self.p_ab + self.p_ba) / 2.0 - 0.5

    @property
    def valid(self) -> bool:
        return math.isfinite(self.p_ab) and math.isfinite(self.p_ba)


@dataclass
class Decision:
    """What to write for a pair: keep it? which side is chosen? with which soft label?"""

    keep: bool
    a_chosen: bool
    soft_label: float
    status: str  # ok | tie | inconsistent_kept | inconsistent_dropped | undecided | too_long


def decide(v: Verdict, inconsistent: str = "drop", min_confidence: float = 0.0,
           max_label: float = 1.0) -> Decision:
    """Orient a verdict into (chosen, rejected, soft_label >= 0.5) or drop it (see JudgeOptions)."""
    if not v.valid:
        return Decision(False, True, 0.5, "too_long")
    p = v.prob_a
    a_chosen = p >= 0.5
    soft = min(max(p, 1.0 - p), max_label)
    if not v.consistent:
        if inconsistent == "drop":
            return Decision(False, a_chosen, soft, "inconsistent_dropped")
        if inconsistent == "tie":  # no preference: keep the given order (a first)
            return Decision(True, True, 0.5, "tie")
        return Decision(True, a_chosen, soft, "inconsistent_kept")
    if abs(p - 0.5) < min_confidence:
        return Decision(False, a_chosen, soft, "undecided")
    return Decision(True, a_chosen, soft, "ok")


def judge_both_orders(judge: PairwiseJudge, queries: Sequence[JudgeQuery]) -> List[Verdict]:
    """Ask every query as given and swapped (one batched call); ``queries[i].first`` is ``a``."""
    swapped = [JudgeQuery(q.prompt, q.second, q.first, q.principle, q.reference) for q in queries]
    probs = judge.first_probs(list(queries) + swapped)
    n = len(queries)
    if len(probs) != 2 * n:
        raise ValueError(f"judge returned {len(probs)} probabilities for {2 * n} queries")
    return [Verdict(float(probs[i]), float(probs[n + i])) for i in range(n)]


def average_verdicts(verdicts: Sequence[Verdict]) -> Verdict:
    """One verdict from several (e.g. one per constitutional principle): mean of each order's P(A)."""
    ok = [v for v in verdicts if v.valid]
    if not ok:
        return Verdict(float("nan"), float("nan"))
    return Verdict(sum(v.p_ab for v in ok) / len(ok), sum(v.p_ba for v in ok) / len(ok))


def summarize(verdicts: Sequence[Verdict], decisions: Sequence[Decision]) -> Dict[str, Any]:
    """Counts and bias statistics for summary.json (every dropped pair is counted by reason)."""
    valid = [v for v in verdicts if v.valid]
    counts: Dict[str, int] = {}
    for d in decisions:
        counts[d.status] = counts.get(d.status, 0) + 1
    kept = [d for d in decisions if d.keep]
    out: Dict[str, Any] = {
        "pairs_judged": len(verdicts), "pairs_kept": len(kept),
        "inconsistent": sum(1 for v in valid if not v.consistent),
        "dropped": {k: c for k, c in counts.items() if k in ("inconsistent_dropped", "undecided", "too_long")},
        "ties_marked": counts.get("tie", 0),
    }
    if valid:
        out["consistency_rate"] = sum(v.consistent for v in valid) / len(valid)
        out["position_bias"] = sum(v.position_bias for v in valid) / len(valid)
        out["first_order_prefers_a"] = sum(v.p_ab > 0.5 for v in valid) / len(valid)
    if kept:
        out["soft_label_mean"] = sum(d.soft_label for d in kept) / len(kept)
    return out


# ----------------------------------------------------------------------------- the LM judge

class LMJudge:
    """A causal LM as a pairwise judge: P(A) from the next-token logits of the two option tokens."""

    def __init__(self, model, tokenizer, opts: JudgeOptions):
        # deferred: torch stays out of this module's import (CLI start-up)
        import torch

        self.model, self.tok, self.opts = model, tokenizer, opts
        self.template = load_template(opts.template)
        self.fields = set(template_fields(self.template))
        self.use_chat = opts.chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.device = next(model.parameters()).device
        self.option_ids = self._option_ids()
        self._torch = torch

    # -- rendering
    def fill(self, q: JudgeQuery) -> str:
        values = {"prompt": prompt_text(q.prompt), "response_a": q.first, "response_b": q.second,
                  "principle": q.principle or self.opts.principle}
        if "reference" in self.fields:
            if q.reference is None:
                raise ValueError(f"the judge template uses {{reference}} but a pair has no "
                                 f"'{self.opts.reference_field}' field")
            values["reference"] = q.reference
        return self.template.format(**values)

    def render(self, q: JudgeQuery) -> str:
        text = self.fill(q)
        if self.use_chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        return text + self.opts.answer_prefix

    def encode(self, text: str) -> List[int]:
        # a chat-rendered text already holds its special tokens
        return self.tok(text, add_special_tokens=not self.use_chat)["input_ids"]

    def _option_ids(self) -> List[int]:
        """First token of each option *in context*: BPE tokenizers merge a leading space or newline."""
        base = self.render(JudgeQuery("x", "x", "x", "x", "x"))
        base_ids = self.encode(base)
        ids = []
        for opt in self.opts.options:
            full = self.encode(base + opt)
            if full[:len(base_ids)] == base_ids and len(full) > len(base_ids):
                ids.append(full[len(base_ids)])
            else:  # the option merged with the end of the prompt: fall back to the bare token
                bare = self.tok(opt, add_special_tokens=False)["input_ids"]
                if not bare:
                    raise ValueError(f"judge.options: {opt!r} encodes to no tokens")
                ids.append(bare[0])
        if ids[0] == ids[1]:
            raise ValueError(f"judge.options {self.opts.options} start with the same token; choose options "
                             "that differ in their first token")
        return ids

    # -- scoring
    def first_probs(self, queries: Sequence[JudgeQuery]) -> List[float]:
        """P(position A is better) per query; ``nan`` for prompts longer than judge.max_length."""
        torch = self._torch
        encoded = [self.encode(self.render(q)) for q in queries]
        out = [float("nan")] * len(queries)
        todo = sorted((i for i, ids in enumerate(encoded) if len(ids) <= self.opts.max_length),
                      key=lambda i: len(encoded[i]))  # similar lengths batch together: less padding
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.option_ids[0]
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(todo), self.opts.batch_size):
                    idx = todo[s:s + self.opts.batch_size]
                    T = max(len(encoded[i]) for i in idx)
                    ids = torch.full((len(idx), T), pad, dtype=torch.long)
                    attn = torch.zeros((len(idx), T), dtype=torch.long)
                    for r, i in enumerate(idx):  # left padding: the last position is the answer slot
                        ids[r, T - len(encoded[i]):] = torch.tensor(encoded[i])
                        attn[r, T - len(encoded[i]):] = 1
                    ids, attn = ids.to(self.device), attn.to(self.device)
                    logits = self._last_logits(ids, attn)  # (b, V) at the answer slot
                    two = logits[:, self.option_ids]  # (b, 2): logits of the two option tokens
                    p_first = torch.softmax(two, dim=-1)[:, 0]
                    for r, i in enumerate(idx):
                        out[i] = float(p_first[r])
        finally:
            self.model.train(was_training)
        return out


    def _last_logits(self, ids, attn):
        # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
        from alignkit.ops.logprobs import keep_last

        kw = dict(input_ids=ids, attention_mask=attn, position_ids=_positions(attn), use_cache=False)
        try:  # the LM head on the last position only
            out = self.model(**kw, logits_to_keep=keep_last(ids))
        except TypeError:  # a model without logits_to_keep
            out = self.model(**kw)
        return out.logits[:, -1].float()


def _positions(attn):
    # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
    from alignkit.ops.logprobs import position_ids

    return position_ids(attn)


def load_judge(opts: JudgeOptions, default_model: Optional[str] = None, model=None, tokenizer=None) -> LMJudge:
    """Build an :class:`LMJudge`; ``model``/``tokenizer`` reuse an already loaded model (e.g. the policy)."""
    if model is None:
        # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
        from alignkit.models.loading import best_device, load_causal_lm, load_tokenizer

        mcfg = opts.model
        if mcfg.name_or_path is None and default_model is not None:
            mcfg = mcfg.model_copy(update={"name_or_path": default_model})
        tokenizer = load_tokenizer(mcfg, padding_side="left")
        model = load_causal_lm(mcfg, trainable=False).to(best_device()).eval()
    return LMJudge(model, tokenizer, opts)


def judge_model_name(opts: JudgeOptions, default_model: Optional[str]) -> Optional[str]:
    """The model the judge will load (for sharing an already loaded policy)."""
    return opts.model.name_or_path if opts.model.name_or_path is not None else default_model


__all__ = ["DEFAULT_TEMPLATE", "DEFAULT_PRINCIPLE", "JudgeOptions", "JudgeQuery", "Verdict", "Decision",
           "LMJudge", "PairwiseJudge", "decide", "judge_both_orders", "average_verdicts", "summarize",
           "load_judge", "load_template", "check_template", "template_fields", "prompt_text", "judge_model_name"]
