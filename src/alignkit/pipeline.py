"""``alignkit pipeline pipeline.yaml``: multi-stage runs where each stage's output feeds the next.

A pipeline file lists stages that run in order; each is ``{name, command, config}`` where ``command``
is any alignkit command (sft, rm, dpo, ppo, grpo, eval, compare, ...) or a data stage (sample_pairs,
label) and ``config`` is that command's configuration, as in its own YAML file::

    output: runs/sft-dpo
    vars: {model: null}                 # CLI: vars.model=HuggingFaceTB/SmolLM2-360M-Instruct
    stages:
      - name: sft
        command: sft
        config: {model: {name_or_path: "${vars.model}"}, data: {path: sft.jsonl}, lora: {enabled: true}}
      - name: dpo
        command: dpo
        config: {model: {name_or_path: "${stages.sft.model}"}, data: {path: prefs.jsonl}}

Before the first stage runs, every stage is checked (:func:`check_stages`): references resolved with
placeholders for summary values, configs validated, ``python:`` rewards imported. References (resolved
again just before a stage runs; only earlier stages can be named):
``${stages.NAME.output}`` the stage's directory, ``${stages.NAME.model}`` its ``model/`` directory,
``${stages.NAME.summary.KEY}`` a value from its summary.json, ``${vars.KEY}`` a variable,
``${output}`` the pipeline's directory. A value that is exactly one reference keeps its type (a null
variable stays null); inside a longer string it is formatted as text.

Each stage writes to ``OUTPUT/NAME`` unless its config sets ``output``. When a stage finishes, a
``DONE`` file records a hash of its resolved config. On the next invocation a stage is skipped when its
DONE matches its config and no earlier stage ran; a stage without DONE whose ``checkpoints/`` holds a
checkpoint of the same config is resumed (``resume=latest``); anything else starts afresh. Every
decision is appended to ``OUTPUT/pipeline.jsonl``.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import pkgutil
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from alignkit.aliases import UnusableKey, normalize as normalize_aliases
from alignkit.config import (ConfigError, Section, apply_overrides, as_config, build_config,
                             format_validation_error)

DONE = "DONE"
STAGE_MARKER = ".alignkit-stage.json"  # written when a stage starts: we own the directory
_REF = re.compile(r"\$\{([^}]+)\}")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StageSpec(BaseModel):
    """One stage: a name (its directory), the command it runs and that command's config."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="Stage name: unique, used for its output directory and in references.")
    command: str = Field(description="An alignkit command (sft, rm, dpo, ppo, eval, compare, ...) or a data "
                                     "stage (sample_pairs, label).")
    config: Dict[str, Any] = Field(default_factory=dict, description="The command's configuration.")

    @field_validator("name")
    @classmethod
    def _safe(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"stage name {v!r}: use letters, digits, '_', '-' and '.' (it names a directory)")
        return v


class PipelineSpec(BaseModel):
    """The pipeline file."""

    model_config = ConfigDict(extra="forbid")
    output: str = Field("runs/pipeline", description="Directory holding one subdirectory per stage.")
    vars: Dict[str, Any] = Field(default_factory=dict, description="Variables for ${vars.KEY}.")
    presets: Dict[str, Dict[str, Any]] = Field(default_factory=dict,
                                               description="Named sets of variable values (preset=NAME).")
    stages: List[StageSpec] = Field(min_length=1, description="Stages, run in order.")


class PipelineConfig(Section):
    """Run the stages of a pipeline file in order, skipping finished ones and resuming an interrupted one."""

    command: Literal["pipeline"] = "pipeline"
    file: str
    """Pipeline YAML file (or builtin:NAME for one shipped with alignkit, e.g. builtin:demo_pipeline)."""
    output: Optional[str] = None
    """Pipeline directory (default: the file's `output`)."""
    vars: Dict[str, Any] = {}
    """Variable values that override the file's `vars` (e.g. vars.model=PATH)."""
    preset: Optional[str] = None
    """Apply a named preset of variable values from the file's `presets` (before `vars`)."""
    force: bool = False
    """Run every stage again, ignoring DONE markers and checkpoints."""
    stop_after: Optional[str] = None
    """Stop after this stage (the later ones are left for a later invocation)."""


class PipelineError(RuntimeError):
    """A stage failed or the pipeline file is invalid; the message names the stage."""


# ------------------------------------------------------------------------------------ loading

def resolve_pipeline_path(path: str) -> Path:
    if path.startswith("builtin:"):
        from importlib.resources import files

        p = Path(str(files("alignkit") / "resources" / f"{path[len('builtin:'):]}.yaml"))
    else:
        p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"pipeline file {path} not found")
    return p


def load_spec(cfg: PipelineConfig) -> PipelineSpec:
    """Read and validate the file; apply preset, vars and output overrides; check every reference."""
    p = resolve_pipeline_path(cfg.file)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
        spec = PipelineSpec.model_validate(raw)
    except (yaml.YAMLError, ValueError) as e:
        raise ConfigError(f"pipeline file {p}: {e}") from None
    if cfg.preset:
        if cfg.preset not in spec.presets:
            raise ConfigError(f"pipeline {p}: no preset {cfg.preset!r} (have: {', '.join(spec.presets) or 'none'})")
        spec.vars.update(spec.presets[cfg.preset])
    spec.vars.update(cfg.vars)
    if cfg.output:
        spec.output = cfg.output
    spec.output = _resolve_pipeline_output(spec, p)
    names: List[str] = []
    for st in spec.stages:
        if st.name in names:
            raise ConfigError(f"pipeline {p}: two stages are named {st.name!r}")
        command_for(st.command)  # raises for an unknown command
        for ref in _refs(st.config):
            _check_ref(ref, st.name, names, spec.vars)
        names.append(st.name)
    return spec


def _resolve_pipeline_output(spec: PipelineSpec, source: Path) -> str:
    """The pipeline's own ``output`` with its ``${vars.KEY}`` references substituted (the only kind it
    may hold: stages and ``${output}`` depend on it)."""
    for ref in _refs(spec.output):
        parts = ref.strip().split(".")
        if parts[0] != "vars" or len(parts) != 2:
            raise ConfigError(f"pipeline {source}: output: ${{{ref}}}: the pipeline's output may refer to "
                              "variables only (${vars.KEY})")
        if parts[1] not in spec.vars:
            raise ConfigError(f"pipeline {source}: output: ${{{ref}}}: no variable {parts[1]!r} "
                              f"(have: {', '.join(spec.vars) or 'none'})")
    out = _REF.sub(lambda m: str(spec.vars[m.group(1).strip().split(".")[1]]), spec.output)
    if "${" in out:
        raise ConfigError(f"pipeline {source}: output {out!r} holds an unresolved ${{...}}")
    return out


def unresolved(value: Any, path: Tuple[Any, ...] = (), skip: Tuple[Tuple[Any, ...], ...] = ()
               ) -> List[Tuple[Tuple[Any, ...], str]]:
    """``(field path, text)`` of every string in a resolved config that still holds ``${`` (a variable
    whose value is itself a reference, a brace never closed): such text would become a literal file
    name or value. Paths in ``skip`` (summary values not known yet) are left out."""
    if any(path[:len(p)] == p for p in skip):
        return []
    if isinstance(value, str):
        return [(path, value)] if "${" in value else []
    if isinstance(value, dict):
        return [u for k, v in value.items() for u in unresolved(v, path + (k,), skip)]
    if isinstance(value, list):
        return [u for i, v in enumerate(value) for u in unresolved(v, path + (i,), skip)]
    return []


def _unresolved_lines(data: Dict[str, Any], skip: Tuple[Tuple[Any, ...], ...] = ()) -> List[str]:
    return [f"{_dotted(path)}: unresolved reference in {text!r} (a ${{...}} that is not "
            "stages.NAME.output|model|summary.KEY, vars.KEY or output, or that a variable's value "
            "brought in)" for path, text in unresolved(data, (), skip)]


def _refs(value: Any) -> List[str]:
    if isinstance(value, str):
        return _REF.findall(value)
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def _check_ref(ref: str, stage: str, earlier: List[str], variables: Dict[str, Any]) -> None:
    parts = ref.strip().split(".")
    where = f"stage {stage!r}: ${{{ref}}}"
    if parts[0] == "output" and len(parts) == 1:
        return
    if parts[0] == "vars" and len(parts) == 2:
        if parts[1] not in variables:
            raise ConfigError(f"{where}: no variable {parts[1]!r} (have: {', '.join(variables) or 'none'})")
        return
    if parts[0] == "stages" and len(parts) >= 3:
        if parts[1] not in earlier:
            raise ConfigError(f"{where}: {parts[1]!r} is not an earlier stage (earlier: {', '.join(earlier) or 'none'})")
        if parts[2] in ("output", "model") and len(parts) == 3 or parts[2] == "summary" and len(parts) == 4:
            return
    raise ConfigError(f"{where}: unknown reference; use stages.NAME.output, stages.NAME.model, "
                      "stages.NAME.summary.KEY, vars.KEY or output")


# ------------------------------------------------------------------------------------ commands

def load_commands():
    """Import every module of alignkit.commands (each registers its commands) and return the registry."""
    import alignkit.commands as pkg
    from alignkit.cli import COMMANDS

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    return COMMANDS


def command_for(name: str, extra: Optional[Dict[str, Any]] = None):
    """The registered command ``name`` (``sample_pairs`` and ``sample-pairs`` are the same), or the one
    ``extra`` names (stage commands of generated pipelines that are not CLI commands)."""
    if extra and name in extra:
        return extra[name]
    commands = {c.name: c for c in load_commands()}
    for candidate in (name, name.replace("_", "-")):
        if candidate in commands and candidate not in ("pipeline", "demo"):
            return commands[candidate]
    raise ConfigError(f"unknown pipeline command {name!r}; known: "
                      + ", ".join(sorted(n for n in commands if n not in ("pipeline", "demo"))))


# ------------------------------------------------------------------------------------ resolving

def _lookup(ref: str, spec: PipelineSpec, outputs: Dict[str, Path]) -> Any:
    parts = ref.strip().split(".")
    if parts[0] == "output":
        return str(Path(spec.output))
    if parts[0] == "vars":
        return spec.vars[parts[1]]
    out = outputs[parts[1]]
    if parts[2] == "output":
        return str(out)
    if parts[2] == "model":
        return str(out / "model")
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    if parts[3] not in summary:
        raise PipelineError(f"${{{ref}}}: {summary_path} has no key {parts[3]!r}")
    return summary[parts[3]]


def resolve(value: Any, spec: PipelineSpec, outputs: Dict[str, Path]) -> Any:
    """Substitute the ${...} references in a config value (recursively)."""
    if isinstance(value, dict):
        return {k: resolve(v, spec, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, spec, outputs) for v in value]
    if not isinstance(value, str):
        return value
    whole = _REF.fullmatch(value.strip())
    if whole:  # exactly one reference: keep the value's type (null, number, list)
        return _lookup(whole.group(1), spec, outputs)
    return _REF.sub(lambda m: str(_lookup(m.group(1), spec, outputs)), value)


# ------------------------------------------------------------------------------------ checking up front

def _resolve_placeholders(value: Any, spec: PipelineSpec, outputs: Dict[str, Path], path: Tuple[Any, ...],
                          pending: List[Tuple[Any, ...]]) -> Any:
    """:func:`resolve` before anything ran: outputs, models, variables and ``${output}`` are known;
    a ``${stages.NAME.summary.KEY}`` is not, so it stays as its own text and its field's path is
    recorded in ``pending`` (that field is checked when the stage starts)."""
    if isinstance(value, dict):
        return {k: _resolve_placeholders(v, spec, outputs, path + (k,), pending) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_placeholders(v, spec, outputs, path + (i,), pending) for i, v in enumerate(value)]
    if not isinstance(value, str) or not _REF.search(value):
        return value
    if any(r.strip().split(".")[2:3] == ["summary"] for r in _REF.findall(value)):
        pending.append(path)
        return value
    return resolve(value, spec, outputs)


def _python_rewards(value: Any, path: Tuple[Any, ...] = ()):
    """``(path, spec)`` for every ``python:`` reward spec in a resolved config (string or mapping)."""
    if isinstance(value, str) and value.startswith("python:") and "${" not in value:
        yield path, value
    elif isinstance(value, dict) and value.get("kind") == "python" and "${" not in str(value.get("arg", "")):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _python_rewards(v, path + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _python_rewards(v, path + (i,))


def _dotted(path: Tuple[Any, ...]) -> str:
    return ".".join(str(x) for x in path) or "(config)"


def check_stages(spec: PipelineSpec, source: str = "", commands: Optional[Dict[str, Any]] = None
                 ) -> List[Tuple[str, str, Dict[str, Any]]]:
    """Check every stage before the first one runs: resolve its references (placeholders for summary
    values), validate its config with its command's model, and import its ``python:`` rewards.

    Returns ``(stage, command, resolved data)`` per stage; raises :class:`ConfigError` listing every
    problem of every stage, one line each, so a typo in the last stage costs nothing.
    """
    from pydantic import ValidationError

    from alignkit.cli import _load
    from alignkit.rewards.base import RewardSpec
    from alignkit.rewards.pyfunc import load_callable

    root = Path(spec.output)
    outputs: Dict[str, Path] = {}
    problems: List[str] = []
    checked: List[Tuple[str, str, Dict[str, Any]]] = []
    for st in spec.stages:
        cmd = command_for(st.command, commands)
        where = f"stage {st.name!r} ({cmd.name})"
        pending: List[Tuple[Any, ...]] = []
        data = _resolve_placeholders(dict(st.config), spec, outputs, (), pending)
        problems.extend(f"{where}: {line}" for line in _unresolved_lines(data, tuple(pending)))
        out = data.get("output")
        outputs[st.name] = Path(out) if isinstance(out, str) and out and ("output",) not in pending \
            else root / st.name
        data["output"] = str(outputs[st.name])
        for k, v in (cmd.defaults or {}).items():
            apply_overrides(data, [f"{k}={json.dumps(v)}"])
        cls = _load(cmd.config)
        try:
            cls.model_validate(normalize_aliases(cls, data))  # TRL-style names, as when the stage runs
        except UnusableKey as e:
            problems.append(f"{where}: {e}")
        except ValidationError as err:
            def later(loc: tuple) -> bool:  # a summary value's field: checked when the stage starts
                return any(loc[:len(p)] == p for p in pending)

            if any(not later(tuple(e["loc"])) for e in err.errors()):  # "invalid configuration:" + one line each
                lines = format_validation_error(err, cls, ignore=later).splitlines()[1:]
                problems.extend(f"{where}: {line.strip()}" for line in lines)
        for path, raw in _python_rewards(data):
            try:
                load_callable(RewardSpec.coerce(raw).arg or "")
            except Exception as e:  # noqa: BLE001  (an import runs user code: any error is the user's)
                problems.append(f"{where}: {_dotted(path)}: {type(e).__name__}: {e}")
        checked.append((st.name, cmd.name, data))
    if problems:
        raise ConfigError(f"pipeline {source or spec.output}: {len(problems)} problem(s), nothing was run:\n"
                          + "\n".join(f"  {p}" for p in problems))
    return checked


def config_hash(command: str, data: Dict[str, Any]) -> str:
    text = json.dumps({"command": command, "config": data}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _has_checkpoint(out: Path) -> bool:
    ck = out / "checkpoints"
    return ck.is_dir() and any(p.is_dir() and p.name.startswith("step-") for p in ck.iterdir())


# ------------------------------------------------------------------------------------ running

def run_pipeline(config: Union[PipelineConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run the pipeline; returns ``{"output", "stages": {name: action}, "seconds"}`` where action is
    ``skipped``, ``ran`` or ``resumed``."""
    cfg = as_config(PipelineConfig, config, overrides)
    spec = load_spec(cfg)
    check_stages(spec, cfg.file)  # every stage's config and python rewards, before anything is written
    return run_stages(spec, force=cfg.force, stop_after=cfg.stop_after)


def run_stages(spec: PipelineSpec, *, force: bool = False, stop_after: Optional[str] = None,
               commands: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The one resumable runner: run ``spec``'s stages in order, skipping a stage whose DONE hash matches
    its resolved config (when no earlier stage ran), resuming one that left checkpoints of the same
    config, running the others afresh. ``commands`` adds stage commands that are not CLI commands
    (name -> :class:`alignkit.cli.Command`), e.g. the rounds of ``iterative-dpo`` and ``spin``.
    Check the stages first (:func:`check_stages`)."""
    from alignkit.cli import _load
    from alignkit.train.common import console

    root = Path(spec.output)
    root.mkdir(parents=True, exist_ok=True)
    con = console()
    outputs: Dict[str, Path] = {}
    actions: Dict[str, str] = {}
    upstream_ran = False
    t_all = time.perf_counter()
    for st in spec.stages:
        cmd = command_for(st.command, commands)
        data = resolve(dict(st.config), spec, outputs)
        left = _unresolved_lines(data)
        if left:
            raise PipelineError(f"stage {st.name!r} ({cmd.name}): " + "; ".join(left))
        out = Path(data["output"]) if data.get("output") else root / st.name
        outputs[st.name] = out
        data["output"] = str(out)
        h = config_hash(cmd.name, data)
        done = _read_json(out / DONE)
        if not force and not upstream_ran and done and done.get("config_hash") == h:
            actions[st.name] = "skipped"
            _event(root, st.name, "skipped", hash=h)
            con.print(f"[pipeline] {st.name}: done earlier, skipped", style="dim", highlight=False, markup=False)
            if st.name == stop_after:
                break
            continue
        cls = _load(cmd.config)
        started = _read_json(out / STAGE_MARKER)
        resume = (not force and done is None and "resume" in cls.model_fields and _has_checkpoint(out)
                  and started is not None and started.get("config_hash") == h)
        if resume:
            data["resume"] = "latest"
        else:
            _clear(out, con)
        for k, v in (cmd.defaults or {}).items():  # e.g. the kto alias presets dpo.loss
            apply_overrides(data, [f"{k}={json.dumps(v)}"])
        try:
            stage_cfg = build_config(cls, data)
        except ConfigError as e:
            raise PipelineError(f"stage {st.name!r} ({cmd.name}): {e}") from None
        out.mkdir(parents=True, exist_ok=True)
        (out / STAGE_MARKER).write_text(json.dumps({"stage": st.name, "command": cmd.name, "config_hash": h}))
        action = "resumed" if resume else "ran"
        con.print(f"[pipeline] {st.name}: {'resuming' if resume else 'running'} {cmd.name} -> {out}",
                  style="bold cyan", highlight=False, markup=False)
        t0 = time.perf_counter()
        try:
            summary = _load(cmd.runner)(stage_cfg)
        except Exception as e:
            _event(root, st.name, "failed", error=f"{type(e).__name__}: {e}")
            con.print(f"[pipeline] stage {st.name!r} ({cmd.name}) failed; rerun the pipeline to resume it",
                      style="bold red", highlight=False, markup=False)
            raise
        finally:
            gc.collect()
        seconds = time.perf_counter() - t0
        if not (out / "summary.json").exists() and isinstance(summary, dict):
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        (out / DONE).write_text(json.dumps({"stage": st.name, "command": cmd.name, "config_hash": h,
                                            "seconds": round(seconds, 2), "finished": time.time()}))
        actions[st.name] = action
        upstream_ran = True
        _event(root, st.name, action, hash=h, seconds=round(seconds, 2))
        if st.name == stop_after:
            break
    total = time.perf_counter() - t_all
    return {"output": str(root), "stages": actions, "seconds": round(total, 2)}


def _clear(out: Path, con) -> None:
    """Start a stage afresh: remove what an earlier run of this stage left (only in directories the
    pipeline created, recognised by their marker file)."""
    if (out / STAGE_MARKER).exists():
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        con.print(f"[pipeline] {out} exists and was not made by a pipeline stage; writing into it",
                  style="yellow", highlight=False, markup=False)


def _event(root: Path, stage: str, action: str, **info: Any) -> None:
    with (root / "pipeline.jsonl").open("a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), "stage": stage, "action": action, **info}) + "\n")


def run_pipeline_command(cfg: PipelineConfig) -> Dict[str, Any]:
    """The CLI runner: a flat summary for the table."""
    res = run_pipeline(cfg)
    return {"output": res["output"], **{f"stage {k}": v for k, v in res["stages"].items()},
            "seconds": res["seconds"]}
