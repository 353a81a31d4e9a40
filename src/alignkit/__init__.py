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
