"""The config sections every sampling job shares: which model samples, from which prompts, how, and where
the results go.

``bon``, ``rejection-sampling`` (:class:`~alignkit.train.rl_config.SamplingConfig`), ``sample-pairs``
(:class:`~alignkit.labeling.SamplePairsConfig`), ``cai-sl`` and ``cai-rl``
(:mod:`alignkit.feedback.constitution`), and the generation of ``iterative-dpo`` and ``spin``
(:mod:`alignkit.feedback.iterative`, :mod:`alignkit.feedback.spin`) and the online-RL commands' rollouts
(:class:`~alignkit.train.rl_config.OnlineRLConfig`, whose ``generation`` is the rollout's sampling) all
derive from these classes, so
the keys (``model``, ``data``, ``generation``, ``output``, and ``n`` and ``seed`` for jobs that draw N
samples per prompt) are spelled and documented once. A job may narrow a field (its own default, range or
docstring, e.g. ``sample-pairs`` needs ``n >= 2``) by declaring it again; the key stays the same.
"""

from __future__ import annotations

from pydantic import Field

from alignkit.config import DataConfig, ModelConfig, Section
from alignkit.rollout.generate import GenerationConfig

__all__ = ["SamplingJob", "NSamplesJob"]


class SamplingJob(Section):
    """A job that samples from a model: the model, its prompts, the sampling settings, the output."""

    command: str = "sample"
    """The command this config is for (set automatically)."""
    output: str = "runs/sampling"
    """Output directory of the job."""
    model: ModelConfig = ModelConfig()
    """The model to sample from (empty: the embedded default model)."""
    data: DataConfig = DataConfig()
    """Prompt rows ({prompt, ...} or {messages})."""
    generation: GenerationConfig = GenerationConfig(max_new_tokens=128)
    """Sampling settings."""


class NSamplesJob(SamplingJob):
    """A sampling job that draws N samples per prompt from a seeded generator."""

    n: int = Field(4, gt=0)
    """Samples per prompt (N). Must be > 0: a prompt with no sample gives nothing."""
    seed: int = 42
    """Sampling seed."""
