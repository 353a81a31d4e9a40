"""The ``judge:MODEL`` reward kind: an LLM judge compares each completion with a reference answer.

RLAIF with a pairwise judge (Lee et al. 2023, sec. 2.1 and 3.3, "direct RLAIF" uses the judge's
score as the reward): the completion is response ``a``, the competitor ``b`` is

- ``row[reference_field]`` when ``options.reference_field`` is set (e.g. a gold answer), else
- the reference policy's greedy answer to the same prompt (``options.reference_policy``, default the
  judge model itself), generated once per distinct prompt and cached.

Both orders are asked (position bias cancels, see :mod:`alignkit.feedback.judge`) and the reward is
``p = P(completion better)`` in ``[0, 1]`` or its log-odds ``log p - log(1 - p)``
(``options.output: prob | logodds``). Shorthand ``judge:MODEL;key=value,...``, e.g.
``judge:Qwen/Qwen2.5-1.5B-Instruct;reference_field=answer,output=logodds``; an empty MODEL (or
``default``) is the embedded model. Other options go to :class:`~alignkit.feedback.judge.JudgeOptions`
(template, principle, options, answer_prefix, chat_template, batch_size, max_length).
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Optional

from alignkit.config import DataConfig, ModelConfig
from alignkit.data.tokenize import Encoder
from alignkit.feedback.common import load_policy, sample_texts
from alignkit.feedback.judge import JudgeOptions, JudgeQuery, judge_both_orders, load_judge
from alignkit.rewards.base import RewardSpec, merge_options, register_reward_kind

REWARD_OPTIONS = ("reference_field", "reference_policy", "output", "max_new_tokens", "prompt_chat_template")
JUDGE_OPTIONS = ("template", "principle", "options", "answer_prefix", "chat_template", "batch_size", "max_length")


def parse_judge_arg(arg: str) -> Dict[str, Any]:
    """``"MODEL;a=1,b=x"`` -> ``{"model": "MODEL", "a": "1", "b": "x"}`` (the model may be empty)."""
    model, _, rest = arg.partition(";")
    out: Dict[str, Any] = {}
    if model.strip():
        out["model"] = model.strip()
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not key:
            raise ValueError(f"judge reward argument {arg!r}: expected key=value after ';', got {item!r}")
        out[key] = value
    return out


class JudgeReward:
    """``reward(prompts, completions, rows)`` -> judge probability (or log-odds) per completion."""

    #: runs under rewards.timeout_s like a reward function (alignkit.rewards.deadline)
    user_code = True

    def __init__(self, judge, output: str = "prob", reference_field: Optional[str] = None,
                 policy=None, policy_tok=None, max_new_tokens: int = 128, prompt_chat_template: str = "auto",
                 name: str = "judge"):
        if output not in ("prob", "logodds"):
            raise ValueError(f"judge reward: output must be 'prob' or 'logodds', got {output!r}")
        self.name, self.judge, self.output, self.reference_field = name, judge, output, reference_field
        self.policy, self.policy_tok = policy, policy_tok
        self.max_new_tokens, self.prompt_chat_template = max_new_tokens, prompt_chat_template
        self.cache: Dict[str, str] = {}  # prompt (JSON) -> the reference policy's greedy answer
        self.last_stats: Dict[str, float] = {}
        self.too_long = 0

    def references(self, prompts: List[Any], rows: List[Dict[str, Any]]) -> List[str]:
        if self.reference_field:
            out = []
            for i, row in enumerate(rows):
                if row.get(self.reference_field) is None:
                    raise ValueError(f"judge reward: completion {i}'s row has no field {self.reference_field!r} "
                                     f"(options.reference_field); fields: {sorted(row)}")
                out.append(str(row[self.reference_field]))
            return out
        keys = [json.dumps(p, sort_keys=True) for p in prompts]
        todo = {k: p for k, p in zip(keys, prompts) if k not in self.cache}
        if todo:
            self.cache.update(zip(todo, self._greedy(list(todo.values()))))
        return [self.cache[k] for k in keys]

    def _greedy(self, prompts: List[Any]) -> List[str]:
        # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
        from alignkit.rollout.generate import GenerationConfig

        enc = Encoder(self.policy_tok, DataConfig(chat_template=self.prompt_chat_template))
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, temperature=0.0)
        return sample_texts(self.policy, self.policy_tok, [enc.encode_prompt_ids(p) for p in prompts], gen)

    def __call__(self, prompts, completions, rows=None) -> List[float]:
        n = len(completions)
        rows = [{} for _ in range(n)] if rows is None else list(rows)
        refs = self.references(list(prompts), rows)
        principles = [r.get("principle") if isinstance(r.get("principle"), str) else None for r in rows]
        queries = [JudgeQuery(p, c, ref, pr, ref) for p, c, ref, pr in zip(prompts, completions, refs, principles)]
        verdicts = judge_both_orders(self.judge, queries)
        out = []
        for v in verdicts:
            if not v.valid:  # too long for the judge: a neutral reward, counted
                self.too_long += 1
                out.append(0.5 if self.output == "prob" else 0.0)
                continue
            p = min(max(v.prob_a, 1e-6), 1 - 1e-6)
            out.append(p if self.output == "prob" else math.log(p) - math.log1p(-p))
        valid = [v for v in verdicts if v.valid]
        self.last_stats = {"judge/consistency": sum(v.consistent for v in valid) / max(len(valid), 1),
                           "judge/position_bias": sum(v.position_bias for v in valid) / max(len(valid), 1),
                           "judge/too_long": float(self.too_long)}
        return out

    def describe(self) -> str:
        return f"judge reward {self.name!r}"

    def __repr__(self) -> str:
        return f"JudgeReward(output={self.output!r}, reference_field={self.reference_field!r})"


@register_reward_kind("judge", syntax="judge:MODEL[;reference_field=F,output=prob|logodds,...]")
def build_judge(spec: RewardSpec) -> JudgeReward:
    """LLM judge: P(completion beats row[reference_field] or the reference policy's greedy answer)."""
    where = f"reward spec {spec.shorthand()!r}"
    opts = merge_options(spec, parse_judge_arg(spec.arg))
    model = opts.pop("model", None)
    unknown = sorted(set(opts) - set(REWARD_OPTIONS) - set(JUDGE_OPTIONS))
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: "
                         + ", ".join(REWARD_OPTIONS + JUDGE_OPTIONS))
    judge_kw = {k: opts[k] for k in JUDGE_OPTIONS if k in opts}
    if isinstance(judge_kw.get("options"), str):
        judge_kw["options"] = [s.strip() for s in judge_kw["options"].split("|")]
    ref_field = opts.get("reference_field") or None
    try:
        jopts = JudgeOptions(model=ModelConfig(name_or_path=model), reference_field=ref_field or "reference",
                             **judge_kw)
        max_new = int(opts.get("max_new_tokens", 128))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    judge = load_judge(jopts)
    policy = tok = None
    if not ref_field:
        ref_policy = opts.get("reference_policy")
        if ref_policy is None or ref_policy == model:  # the judge model answers itself: share it
            policy, tok = judge.model, judge.tok
        else:
            policy, tok = load_policy(ref_policy)
    return JudgeReward(judge, str(opts.get("output", "prob")), ref_field, policy, tok, max_new,
                       str(opts.get("prompt_chat_template", "auto")))
