"""The object-level Python API: every ``train_*`` function takes models, tokenizers, datasets and
callbacks as Python objects, as TRL's trainers do, besides the config.

One adapter serves every training command (:func:`object_api`, a decorator on ``train_sft``,
``train_rm``, ``train_dpo``, ``train_ppo``, ``train_grpo``, ``train_rloo``, ``train_rl``):

- **datasets** (``datasets.Dataset``, ``DatasetDict``, ``IterableDataset`` or a list of dicts) are written
  once to ``OUTPUT/inputs/`` as JSON lines (a ``DatasetDict`` as one file per split, read with its split
  names like a Hub-layout folder) and ``data.path`` / ``data.eval_path`` point there. The run then reads,
  reports and resumes exactly as from files: errors name ``inputs/train.jsonl line N``.
- **objects** (the model, tokenizer, reference model, callbacks) are handed to the command's loaders for
  the length of the call (:class:`RunInputs`, a context variable): :func:`policy_model`,
  :func:`policy_tokenizer` and :func:`reference_model` return them where the command would load from
  ``model.name_or_path``; the loop calls :func:`run_callbacks`.
- the return value is a :class:`TrainResult`: the summary dict every caller used (same keys), with
  ``.model``, ``.tokenizer``, ``.metrics`` and ``.paths``.
"""

from __future__ import annotations

import contextvars
import copy
import functools
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, List, Optional

log = logging.getLogger("alignkit")


# ------------------------------------------------------------------ the result

class TrainResult(dict):
    """The run's summary (``result["eval/loss"]``, ``result["model_dir"]``, ... as before), plus:

    - ``model``: the trained model as saved in ``OUTPUT/model``: for LoRA runs the peft model with
      ``lora.save=adapter``, the model with the adapters merged in with ``lora.save=merged`` (the
      default); ``tokenizer``: its tokenizer;
    - ``metrics``: the final numeric metrics (a dict); ``paths``: ``output``, ``model``, ``metrics``
      (metrics.jsonl), ``report`` (report.html), ``config`` (config.yaml)."""

    def __init__(self, summary: Dict[str, Any], model=None, tokenizer=None, output: Optional[str] = None):
        super().__init__(summary)
        self.model, self.tokenizer = model, tokenizer
        self.output_dir = Path(output) if output else None

    @property
    def metrics(self) -> Dict[str, float]:
        return {k: v for k, v in self.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    @property
    def model_dir(self) -> Optional[Path]:
        return Path(self["model_dir"]) if self.get("model_dir") else None

    @property
    def paths(self) -> Dict[str, Path]:
        out = {}
        if self.output_dir is not None:
            o = self.output_dir
            out = {"output": o, "metrics": o / "metrics.jsonl", "report": o / "report.html",
                   "config": o / "config.yaml", "summary": o / "summary.json"}
        if self.model_dir is not None:
            out["model"] = self.model_dir
        return out

    def __repr__(self) -> str:
        return f"TrainResult({dict.__repr__(self)})"


# ------------------------------------------------------------------ what the caller handed over

@dataclass
class RunInputs:
    """Objects given to a ``train_*`` call, read by the loaders while it runs."""

    model: Any = None
    tokenizer: Any = None
    ref_model: Any = None
    callbacks: List[Any] = field(default_factory=list)


_INPUTS: contextvars.ContextVar[Optional[RunInputs]] = contextvars.ContextVar("alignkit_run_inputs", default=None)


def current() -> RunInputs:
    """The objects of the ``train_*`` call in progress (empty outside one, or for a config-only call)."""
    return _INPUTS.get() or RunInputs()


def policy_tokenizer(cfg, padding_side: str = "right"):
    """The given tokenizer (a pad token added when it has none, ``model.chat_template`` applied), else
    ``load_tokenizer(cfg.model)``."""
    # deferred: torch stays out of this module's import
    from alignkit.models.loading import load_tokenizer

    tok = current().tokenizer
    if tok is None:
        return load_tokenizer(cfg.model, padding_side=padding_side)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError("tokenizer: it has neither a pad nor an EOS token; set tokenizer.pad_token")
        tok.pad_token = tok.eos_token
    if cfg.model.chat_template:
        # deferred: pydantic stays out of this module's import
        from alignkit.data.templates import resolve_chat_template

        tok.chat_template = resolve_chat_template(cfg.model.chat_template)
    tok.padding_side = padding_side
    return tok


def policy_model(cfg, load: Callable[[], Any], task_type: str = "CAUSAL_LM"):
    """The model to train: the given one (a peft model is trained as it is; a plain model gets
    ``lora`` adapters when ``lora.enabled``), else ``load()`` with ``lora`` applied."""
    # deferred: torch stays out of this module's import
    from alignkit.models.loading import apply_lora, is_peft, prepare_for_training
    from alignkit.ops import attention

    given = current().model
    if given is None:
        model = load()
    else:
        model = given
        if task_type == "SEQ_CLS" and not type(_base(model)).__name__.endswith("ForSequenceClassification"):
            raise TypeError(f"model: train_rm needs a sequence-classification model (num_labels=1), got "
                            f"{type(_base(model)).__name__}; load it with AutoModelForSequenceClassification")
        attention.use_for(_base(model))  # CPU: the sdpa whose training pass runs in fp32, as loaded models
        if not is_peft(model):
            prepare_for_training(model, cfg.model)
        elif cfg.lora.enabled:
            log.warning("lora: the given model already has peft adapters; they are trained and the lora "
                        "section is not applied again")
            return model
    if cfg.lora.enabled and not is_peft(model):
        model = apply_lora(model, cfg.lora, task_type=task_type)
    return model


def uses_adapter_reference(cfg, policy) -> bool:
    """Whether the reference is the policy with its adapter off: LoRA (configured or a given peft model)
    and no reference model given, by path or as an object."""
    # deferred: torch stays out of this module's import
    from alignkit.models.loading import is_peft

    ref_path = getattr(getattr(cfg, "dpo", None), "ref_model", None) or getattr(cfg, "ref_model", None)
    return is_peft(policy) and not ref_path and current().ref_model is None


def given_adapter_policy() -> bool:
    # deferred: torch stays out of this module's import
    from alignkit.models.loading import is_peft

    return current().model is not None and is_peft(current().model) and current().ref_model is None


def reference_model(ref_cfg, ref_path: Optional[str]):
    """The frozen reference: the given ``ref_model``, else (no ``ref_model`` path set) a frozen copy of a
    given model, else ``load_causal_lm(ref_cfg)``. Commands build the reference before the first step,
    so the copy is the model before training (a copy only when a reference is used: sft makes none)."""
    # deferred: torch stays out of this module's import
    from alignkit.models.loading import load_causal_lm

    inputs = current()
    if inputs.ref_model is not None:
        ref = inputs.ref_model
    elif inputs.model is not None and not ref_path:
        return frozen_copy(inputs.model)
    else:
        return load_causal_lm(ref_cfg)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def frozen_copy(model):
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ------------------------------------------------------------------ callbacks

class Callbacks:
    """The callbacks of a run, called by the loop (train/loop.py).

    A plain callback is any object with some of ``on_train_begin()``, ``on_step_end(step, metrics)``,
    ``on_evaluate(step, metrics)``, ``on_save(step, path)``, ``on_train_end(step, metrics)``. A
    transformers/TRL ``TrainerCallback`` gets its own methods with ``(args, state, control, **kwargs)``:
    ``on_train_begin``, ``on_step_end`` and ``on_log(logs=metrics)`` each logged step, ``on_evaluate(metrics=)``,
    ``on_save``, ``on_train_end``; its ``control.should_training_stop`` stops the run after that step
    (the model is saved as at a normal end)."""

    def __init__(self, callbacks, cfg=None, total_steps: int = 0, model=None, tokenizer=None):
        self.items = list(callbacks or [])
        self.cfg = cfg
        self.model, self.tokenizer = model, tokenizer
        self.state = self.control = self.args = None
        if any(_is_trainer_callback(c) for c in self.items):
            # deferred: transformers is slow to import; it loads when a model does
            from transformers import TrainerControl, TrainerState

            self.state, self.control = TrainerState(max_steps=total_steps), TrainerControl()
            self.args = _training_args(cfg)

    def __bool__(self) -> bool:
        return bool(self.items)

    @property
    def should_stop(self) -> bool:
        return bool(self.control is not None and self.control.should_training_stop)

    def _hf(self, c, event: str, step: int, **kw) -> None:
        self.state.global_step = step
        fn = getattr(c, event, None)
        if fn is not None:
            result = fn(self.args, self.state, self.control, model=self.model, processing_class=self.tokenizer, **kw)
            if result is not None:  # transformers' contract: a callback may return a new control
                self.control = result

    def train_begin(self, step: int) -> None:
        for c in self.items:
            if _is_trainer_callback(c):
                self._hf(c, "on_train_begin", step)
            elif hasattr(c, "on_train_begin"):
                c.on_train_begin()

    def step_end(self, step: int, metrics: Dict[str, float], logged: bool) -> None:
        for c in self.items:
            if _is_trainer_callback(c):
                self._hf(c, "on_step_end", step)
                if logged:
                    logs = {k: v for k, v in metrics.items()}
                    self.state.log_history.append({**logs, "step": step})
                    self._hf(c, "on_log", step, logs=logs)
            elif hasattr(c, "on_step_end"):
                c.on_step_end(step, dict(metrics))

    def evaluate(self, step: int, metrics: Dict[str, float]) -> None:
        for c in self.items:
            if _is_trainer_callback(c):
                self._hf(c, "on_evaluate", step, metrics=dict(metrics))
            elif hasattr(c, "on_evaluate"):
                c.on_evaluate(step, dict(metrics))

    def save(self, step: int, path) -> None:
        for c in self.items:
            if _is_trainer_callback(c):
                self._hf(c, "on_save", step)
            elif hasattr(c, "on_save"):
                c.on_save(step, Path(path))

    def train_end(self, step: int, metrics: Dict[str, float]) -> None:
        for c in self.items:
            if _is_trainer_callback(c):
                self._hf(c, "on_train_end", step)
            elif hasattr(c, "on_train_end"):
                c.on_train_end(step, dict(metrics))


def _is_trainer_callback(c) -> bool:
    try:
        # deferred: transformers is slow to import; it loads when a model does
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover
        return False
    return isinstance(c, TrainerCallback) or (isinstance(c, type) and issubclass(c, TrainerCallback))


def _training_args(cfg) -> SimpleNamespace:
    """The TrainingArguments fields callbacks commonly read, from our config."""
    if cfg is None:
        return SimpleNamespace()
    return SimpleNamespace(
        output_dir=cfg.output, per_device_train_batch_size=cfg.train.batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum, max_steps=cfg.train.max_steps or -1,
        num_train_epochs=cfg.train.epochs, learning_rate=cfg.optim.lr, seed=cfg.train.seed,
        logging_steps=cfg.log.every, eval_steps=cfg.log.eval_every, save_steps=cfg.log.save_every,
        report_to=list(cfg.log.report_to), run_name=cfg.log.run_name)


def run_callbacks(cfg, total_steps: int, model=None, tokenizer=None) -> Callbacks:
    """The loop's callbacks for this call (none outside an object-API call)."""
    items = [c() if isinstance(c, type) else c for c in current().callbacks]  # a class, as transformers allows
    return Callbacks(items, cfg, total_steps, model, tokenizer)


# ------------------------------------------------------------------ datasets -> files

def _rows_of(ds, what: str):
    """Rows (dicts) of a Dataset, IterableDataset or list of dicts."""
    if isinstance(ds, (list, tuple)):
        for i, r in enumerate(ds):
            if not isinstance(r, dict):
                raise TypeError(f"{what}: row {i} is a {type(r).__name__}, expected a dict")
            yield r
        return
    try:
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        import datasets
    except ImportError:  # pragma: no cover
        datasets = None
    if datasets is not None and isinstance(ds, (datasets.Dataset, datasets.IterableDataset)):
        for r in ds:
            yield dict(r)
        return
    raise TypeError(f"{what}: expected a datasets.Dataset, DatasetDict, IterableDataset or a list of dicts, "
                    f"got {type(ds).__name__}")


def _json_value(v):
    """JSON for values datasets hands out (numpy scalars and arrays, tensors); other objects as text."""
    if hasattr(v, "tolist"):
        return v.tolist()
    return str(v)


def write_rows(path: Path, rows) -> int:
    """``rows`` as JSON lines at ``path``, written aside and renamed (several processes write the same)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, default=_json_value) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def materialize(dataset, out: Path, name: str, what: str) -> Dict[str, Any]:
    """Write a dataset argument under ``out/inputs`` and return the ``data`` fields that read it: a file
    (``{path}``) or, for a DatasetDict, a folder of one file per split (read with its split names)."""
    try:
        # deferred: datasets (slow import) loads only for Hub / Arrow inputs
        from datasets import DatasetDict, IterableDatasetDict
        dicts: tuple = (DatasetDict, IterableDatasetDict)
    except ImportError:  # pragma: no cover
        dicts = ()
    base = Path(out) / "inputs"
    if (dicts and isinstance(dataset, dicts)) or (isinstance(dataset, dict) and all(
            not isinstance(v, (str, int, float)) for v in dataset.values())):
        folder = base / name
        for split, ds in dataset.items():
            write_rows(folder / f"{split}.jsonl", _rows_of(ds, f"{what}[{split!r}]"))
        return {"path": str(folder), "splits": list(dataset)}
    path = base / f"{name}.jsonl"
    n = write_rows(path, _rows_of(dataset, what))
    if n == 0:
        raise ValueError(f"{what}: the dataset has no rows")
    return {"path": str(path)}


# ------------------------------------------------------------------ the decorator

API_DOC = """
    Objects, as TRL's trainers take them (every one optional; a config-only call works as before):

    - ``model`` (``transformers.PreTrainedModel`` or ``peft.PeftModel``): the model to train, instead of
      ``model.name_or_path``. A peft model is trained as it is; a plain one gets ``lora`` adapters when
      ``lora.enabled``. It is trained in place.
    - ``tokenizer`` / ``processing_class`` (``PreTrainedTokenizerBase``): its tokenizer (default: loaded
      from the model's ``name_or_path``).
    - ``train_dataset``, ``eval_dataset`` (``datasets.Dataset``, ``DatasetDict``, ``IterableDataset`` or
      a list of dicts): the rows, in any shape the command reads from files. They are written to
      ``OUTPUT/inputs/`` and read from there (the data report names those files). A ``DatasetDict`` is
      read with its split names (``data.split``, and its test twin as held-out data).
    - ``ref_model`` (``PreTrainedModel``): the frozen reference (dpo family, ppo/grpo/rloo with a KL
      term). Default: a frozen copy of ``model`` taken before training, or with LoRA the model with its
      adapter off.
    - ``callbacks`` (list): objects with any of ``on_train_begin()``, ``on_step_end(step, metrics)``,
      ``on_evaluate(step, metrics)``, ``on_save(step, path)``, ``on_train_end(step, metrics)``, or
      transformers/TRL ``TrainerCallback`` objects (their ``on_log`` gets each logged step's metrics;
      ``control.should_training_stop`` ends the run early, saving the model).
    - ``config`` (config object or dict, YAML keys and TRL/transformers names alike) and ``**overrides``
      (``learning_rate=1e-5``, ``optim__lr=1e-5`` or ``**{"optim.lr": 1e-5}``).

    Returns a :class:`~alignkit.api.TrainResult`: the summary dict (final metrics, ``KEY_before``,
    ``model_dir``) with ``.model`` (the trained model), ``.tokenizer``, ``.metrics`` and ``.paths``
    (output, model, metrics, report, config).

    Example::

        import alignkit
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        tok = AutoTokenizer.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")
        {example}

        class Steps:
            def on_step_end(self, step, metrics):
                print(step, metrics["train/loss"])

        res = alignkit.{name}(model=model, processing_class=tok, train_dataset=ds, callbacks=[Steps()],
                              output="runs/{short}", max_steps=10, learning_rate=1e-5)
        res.model, res.metrics, res.paths["model"]
"""

EXAMPLES = {
    "sft": 'ds = Dataset.from_list([{"prompt": "2+2=", "completion": "4"}] * 16)',
    "rm": 'ds = Dataset.from_list([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}] * 16)\n'
          '        # train_rm: model = AutoModelForSequenceClassification.from_pretrained(..., num_labels=1)',
    "dpo": 'ds = Dataset.from_list([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}] * 16)',
    "online": 'ds = Dataset.from_list([{"prompt": "Count to three:"}] * 16)  # plus reward_funcs=/rewards=',
}


def object_api(config_cls, example: str = "dpo"):
    """Give a ``train_*(config=None, **overrides)`` function the object arguments (see ``API_DOC``) and a
    :class:`TrainResult` return value; its docstring gets the argument list and an example."""

    def wrap(fn):
        @functools.wraps(fn)
        def run(config=None, *, model=None, tokenizer=None, processing_class=None, train_dataset=None,
                eval_dataset=None, ref_model=None, callbacks=None, **overrides):
            # deferred: pydantic stays out of this module's import
            from alignkit.config import as_config

            if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
                raise TypeError(f"{fn.__name__}: give tokenizer or processing_class, not both")
            tok = tokenizer if tokenizer is not None else processing_class
            _check_model(model, "model")
            _check_model(ref_model, "ref_model")
            cfg = as_config(config_cls, config, overrides)
            cfg = _with_objects(cfg, model, tok, train_dataset, eval_dataset, fn.__name__)
            inputs = RunInputs(model=model, tokenizer=tok, ref_model=ref_model, callbacks=list(callbacks or []))
            token = _INPUTS.set(inputs)
            try:
                result = fn(cfg)
            finally:
                _INPUTS.reset(token)
            if not isinstance(result, TrainResult):
                result = TrainResult(result, output=cfg.output)
            return result

        short = fn.__name__.replace("train_", "")
        ex = EXAMPLES.get(short if short in EXAMPLES else ("online" if short in ("ppo", "grpo", "rloo", "rl") else "dpo"))
        run.__doc__ = (fn.__doc__ or "").rstrip() + "\n" + API_DOC.replace("{example}", ex).replace(
            "{name}", fn.__name__).replace("{short}", short)
        del run.__wrapped__  # help() and inspect show this signature, with the object arguments
        return run

    return wrap


def _check_model(model, what: str) -> None:
    if model is None:
        return
    # deferred: torch stays out of this module's import (CLI start-up)
    import torch

    if isinstance(model, (str, Path)):
        raise TypeError(f"{what}: a path or hub id goes in model_name_or_path= (model.name_or_path); "
                        f"{what}= takes a model object")
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"{what}: expected a transformers PreTrainedModel or a peft model, got {type(model).__name__}")


def _with_objects(cfg, model, tok, train_dataset, eval_dataset, fname: str):
    """The config with ``data.path``/``data.eval_path`` pointing at the written datasets and, for a given
    model, ``model.name_or_path`` from the model's own config (its checkpoint: model card, saved dtype)."""
    if model is not None and cfg.model.name_or_path is None:
        source = getattr(getattr(_base(model), "config", None), "_name_or_path", "") or ""
        if source and Path(source).expanduser().is_dir():
            cfg.model.name_or_path = source
        elif tok is None:
            raise TypeError(f"{fname}: model= was given without tokenizer= (processing_class=), and "
                            "its config names no local checkpoint to load one from")
        elif source:
            cfg.model.name_or_path = source  # a hub id: named in the model card, never downloaded here
    out = Path(cfg.output)
    if train_dataset is not None:
        if cfg.data.path is not None:
            raise TypeError(f"{fname}: give train_dataset= or data.path (dataset_name), not both")
        where = materialize(train_dataset, out, "train", "train_dataset")
        cfg.data.path = where["path"]
        splits = where.get("splits")
        trains = [s for s in splits or [] if "train" in s]
        if splits and cfg.data.split not in splits and (len(splits) == 1 or len(trains) == 1):
            cfg.data.split = trains[0] if trains else splits[0]  # the one training split (train_prefs, ...)
    if eval_dataset is not None:
        if cfg.data.eval_path is not None:
            raise TypeError(f"{fname}: give eval_dataset= or data.eval_path, not both")
        where = materialize(eval_dataset, out, "eval", "eval_dataset")
        cfg.data.eval_path = where["path"]
        if where.get("splits"):
            cfg.data.eval_split = cfg.data.eval_split or where["splits"][0]
    return cfg

