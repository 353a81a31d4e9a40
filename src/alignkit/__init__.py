"""alignkit: align language models with preferences.

The Python API mirrors the CLI, and takes Python objects as TRL's trainers do. Every training function

    train_sft, train_rm, train_dpo, train_ppo, train_grpo, train_rloo, train_rl

has the signature::

    train_X(config=None, *, model=None, tokenizer=None, processing_class=None, train_dataset=None,
            eval_dataset=None, ref_model=None, callbacks=None, **overrides) -> TrainResult

- ``config``: a config object (``alignkit.DPOConfig(...)``) or a dict (our YAML keys or TRL's names);
  ``**overrides``: keyword settings, ``learning_rate=1e-5``, ``optim__lr=1e-5`` or ``**{"optim.lr": 1e-5}``.
- ``model``: ``transformers.PreTrainedModel`` or ``peft.PeftModel`` (default: ``model_name_or_path``);
  ``tokenizer`` / ``processing_class``: its tokenizer.
- ``train_dataset`` / ``eval_dataset``: ``datasets.Dataset``, ``DatasetDict``, ``IterableDataset`` or a
  list of dicts (default: ``dataset_name`` / ``data.path``).
- ``ref_model``: the frozen reference of the dpo family and KL-regularized RL.
- ``callbacks``: objects with ``on_train_begin()``, ``on_step_end(step, metrics)``,
  ``on_evaluate(step, metrics)``, ``on_save(step, path)``, ``on_train_end(step, metrics)``, or
  transformers/TRL ``TrainerCallback`` objects.
- returns a ``TrainResult``: the summary dict (final metrics, ``model_dir``) with ``.model`` (trained),
  ``.tokenizer``, ``.metrics`` and ``.paths``.

Example::

    import alignkit
    from datasets import Dataset

    ds = Dataset.from_list([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}] * 16)
    res = alignkit.train_dpo(model=model, processing_class=tok, train_dataset=ds, beta=0.1,
                             output="runs/dpo", max_steps=10)
    res.model.generate(...); res.metrics["train/loss"]; res.paths["model"]

``help(alignkit.train_dpo)`` (and each other function) lists the arguments with their types. Other
entry points: score, best_of_n, rejection_sampling, run_cai_sl, run_cai_rl, run_judge,
run_iterative_dpo, run_spin, evaluate (``alignkit eval``, behaviour probes included), probe,
run_redteam, run_redteam_pairs, run_pipeline (``builtin:redteam_repair`` and the demos); configs: SFTConfig, RMConfig, ScoreConfig, DPOConfig, PPOConfig,
GRPOConfig, RLOOConfig.
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
    "evaluate": "alignkit.eval.evaluate",
    "run_redteam": "alignkit.redteam.attack",
    "RedteamConfig": "alignkit.redteam.attack",
    "run_redteam_pairs": "alignkit.redteam.repair",
    "run_pipeline": "alignkit.pipeline",
    "SFTConfig": "alignkit.config",
    "RMConfig": "alignkit.config",
    "ScoreConfig": "alignkit.config",
    "DPOConfig": "alignkit.train.preference",
    "train_rl": "alignkit.train.online",
    "PPOConfig": "alignkit.train.rl_config",
    "GRPOConfig": "alignkit.train.rl_config",
    "RLOOConfig": "alignkit.train.rl_config",
    "TrainResult": "alignkit.api",
}


def __getattr__(name):  # lazy: `import alignkit` stays cheap, torch loads on first use
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


__all__ = sorted(_API)


def __dir__():
    return sorted(set(globals()) | set(_API))
