"""Reward sources for online RL (PPO/GRPO/RLOO) and best-of-N.

Shorthand ``KIND:ARG@WEIGHT`` (weight optional, parsed only from a trailing ``@<float>``)::

    model:PATH                                   trained reward model
    ensemble:P1,P2[;mean|min|mean_minus_std[=K]] several reward models combined
    match:FIELD                                  1 if the final answer equals row[FIELD]
    regex:PATTERN                                1 if the pattern matches (DOTALL)
    length:target=N|max=N|min=N[,unit=chars]     length shaping
    python:MODULE:FN | python:FILE.py:FN         any callable
    judge:MODEL[;reference_field=F,...]          LLM judge vs a reference answer (alignkit.feedback)
    redteam:TARGET (options judge, novelty)      an attacker's reward: judged failure + novelty (alignkit.redteam)

``build_reward(["match:answer", "regex:<answer>.*</answer>@0.2"])`` returns a
:class:`CompositeReward`; call it as ``reward(prompts, completions, rows)``.
"""

from alignkit.rewards.base import (REWARD_KINDS, FunctionSource, RewardKind, RewardSource, RewardSpec,
                                   check_scores, register_reward_kind)
# importing the kind modules registers them
from alignkit.rewards import pyfunc, rules, scorers  # noqa: E402,F401  (registration side effect)
from alignkit.feedback import judge_reward  # noqa: E402,F401  (registers judge:, see alignkit.feedback)
from alignkit.redteam import reward as _redteam_reward  # noqa: E402,F401  (registers redteam:)
from alignkit.rewards.answer import answers_match, extract_answer, parse_number
from alignkit.rewards.composite import CompositeReward, build_reward, build_source
from alignkit.rewards.scorers import EnsembleReward, ModelReward, combine_scores
from alignkit.rewards.pyfunc import PythonReward, load_callable

__all__ = [
    "REWARD_KINDS", "RewardKind", "RewardSource", "RewardSpec", "FunctionSource", "CompositeReward",
    "ModelReward", "EnsembleReward", "PythonReward", "build_reward", "build_source", "check_scores",
    "combine_scores", "register_reward_kind", "extract_answer", "parse_number", "answers_match",
    "load_callable",
]
