"""alignkit: align language models with preferences.

The Python API mirrors the CLI: each ``train_*`` function takes a config object or a dict plus keyword
overrides (``optim__lr=1e-4`` or ``**{"optim.lr": 1e-4}``) and returns the run's summary.
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {
    "train_sft": "alignkit.train.sft",
    "train_rm": "alignkit.train.reward",
    "train_dpo": "alignkit.train.preference",
    "score": "alignkit.score",
    "train_ppo": "alignkit.train.ppo",
    "train_grpo": "alignkit.train.grpo",
    "train_rloo": "alignkit.train.grpo",
    "best_of_n": "alignkit.rollout.sampling",
    "rejection_sampling": "alignkit.rollout.sampling",
    "run_cai_sl": "alignkit.feedback.constitution",
    "run_cai_rl": "alignkit.feedback.constitution",
    "run_judge": "alignkit.feedback.label",
    "run_iterative_dpo": "alignkit.feedback.iterative",
    "run_spin": "alignkit.feedback.spin",
    "probe": "alignkit.eval.probes",
    "ProbeConfig": "alignkit.eval.probes",
    "SFTConfig": "alignkit.config",
    "RMConfig": "alignkit.config",
    "ScoreConfig": "alignkit.config",
    "DPOConfig": "alignkit.train.preference",
}


def __getattr__(name):  # lazy: `import alignkit` stays cheap, torch loads on first use
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


__all__ = sorted(_API)
