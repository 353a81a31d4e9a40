"""The ``redteam:`` reward kind: what the RL attacker of ``alignkit redteam --method rl`` maximizes.

Kept apart from :mod:`alignkit.redteam.attack` so that registering the kind (``alignkit.rewards``
imports this module) loads no model code; the builder imports it when a spec is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from alignkit.config import ModelConfig
from alignkit.redteam.metrics import NoveltyMemory, rate
from alignkit.rewards.base import RewardSpec, merge_options, register_reward_kind, require_arg


class RedteamReward:
    """The attacker's reward (Hong et al. 2024, "Curiosity-driven Red-teaming", eq. 2, without the KL
    term, which the RL preset adds): ``judge failure score of the target's answer + novelty *
    (1 - BLEU(attack, earlier attacks))``; with novelty 0 it is the RL red-teaming reward of Perez et
    al. 2022, sec. 3.4.

    ``prompts`` are the attacker's instructions and ``completions`` its outputs; the attack is extracted
    from each output, answered by the target and judged. Every attack is appended to ``log`` (one
    attacks.jsonl row each, with the rollout number as ``step``), so the campaign survives the run."""

    def __init__(self, target, judge, novelty: float, log: Optional[str] = None):
        self.name = "redteam"
        self.target, self.judge, self.novelty_weight = target, judge, novelty
        self.memory = NoveltyMemory()
        self.log = Path(log) if log else None
        self.calls = 0
        self.last_stats: Dict[str, float] = {}

    def __call__(self, prompts, completions, rows=None) -> List[float]:
        # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
        from alignkit.redteam.attack import query
        rows = rows or [{} for _ in completions]
        cats = [r.get("category") for r in rows]
        recs = query(self.target, self.judge, list(completions), cats, step=self.calls, memory=self.memory)
        self.calls += 1
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with self.log.open("a") as f:
                f.write("".join(json.dumps(r.row("rl")) + "\n" for r in recs))
        self.last_stats = {"redteam/asr": rate([r.failure for r in recs]).mean,
                           "redteam/novelty": sum(r.novelty for r in recs) / max(len(recs), 1)}
        return [r.score + self.novelty_weight * r.novelty for r in recs]


@register_reward_kind("redteam", syntax="redteam:TARGET (options: judge, novelty, threshold, log)")
def build_redteam(spec: RewardSpec) -> RedteamReward:
    """Attacker reward: judge failure score of TARGET's answer + novelty bonus (Hong et al. 2024)."""
    # deferred: a module-level import would load torch into demo (`alignkit demo --help` loads none)
    from alignkit.redteam.attack import Judge, Responder
    from alignkit.rollout.generate import GenerationConfig

    target = require_arg(spec, "the target model (a path or hub name; 'default': the embedded model)")
    opts = merge_options(spec, {})
    judge = opts.get("judge")
    if not judge:
        raise ValueError(f"reward spec {spec.shorthand()!r}: redteam needs options.judge (a reward spec or a list)")
    model_cfg = ModelConfig(**{**opts.get("target_model", {}),
                               "name_or_path": None if target == "default" else target})
    gen = GenerationConfig(**opts.get("generation", {"max_new_tokens": 48, "temperature": 0.0}))
    return RedteamReward(Responder.load(model_cfg, gen),
                         Judge(RewardSpec.coerce_list(judge), float(opts.get("threshold", 0.5))),
                         float(opts.get("novelty", 0.1)), opts.get("log"))
