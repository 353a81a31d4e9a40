"""Stage specs and the one resumable stage runner (:func:`run_stages`), below every command.

A stage is ``{name, command, config}`` (:class:`StageSpec`); a list of them with an output directory is
a :class:`PipelineSpec`. :func:`check_stages` checks every stage before the first runs;
:func:`run_stages` runs them in order, skipping a stage whose ``DONE`` hash matches its resolved
config, resuming one that left checkpoints of the same config, running the others afresh. Users reach
it through ``alignkit pipeline`` (:mod:`alignkit.pipeline`, which reads pipeline files); the
round-based methods (``iterative-dpo``, ``spin``: :mod:`alignkit.feedback.rounds`) generate their
specs in code. Commands are looked up in the registry of :mod:`alignkit.command`, so nothing here
imports the CLI.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from alignkit.aliases import UnusableKey, normalize as normalize_aliases
from alignkit.command import command_for, load_commands, load_ref  # noqa: F401  (load_commands: re-exported)
from alignkit.config import ConfigError, apply_overrides, build_config, format_validation_error
from alignkit.train.logging import console

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


class PipelineError(RuntimeError):
    """A stage failed or the pipeline file is invalid; the message names the stage."""


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
    # deferred: CLI start-up: importing rewards registers every reward kind (~0.1 s), not needed by `--help`
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
        cls = load_ref(cmd.config)
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

def run_stages(spec: PipelineSpec, *, force: bool = False, stop_after: Optional[str] = None,
               commands: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The one resumable runner: run ``spec``'s stages in order, skipping a stage whose DONE hash matches
    its resolved config (when no earlier stage ran), resuming one that left checkpoints of the same
    config, running the others afresh. ``commands`` adds stage commands that are not CLI commands
    (name -> :class:`alignkit.command.Command`), e.g. the rounds of ``iterative-dpo`` and ``spin``.
    Check the stages first (:func:`check_stages`)."""
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
        cls = load_ref(cmd.config)
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
            summary = load_ref(cmd.runner)(stage_cfg)
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
