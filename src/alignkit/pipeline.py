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

from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Union

import yaml

from alignkit.command import command_for, load_commands  # noqa: F401  (re-exported)
from alignkit.config import ConfigError, Section, as_config
# the stage specs and the one resumable runner live below the commands, in alignkit.stages; these
# names stay importable from here
from alignkit.stages import (DONE, STAGE_MARKER, _REF, PipelineError, PipelineSpec, StageSpec,  # noqa: F401
                             _refs, check_stages, config_hash, resolve, run_stages, unresolved)


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
    declared = set(spec.vars)
    spec.vars.update(cfg.vars)
    if cfg.output:
        spec.output = cfg.output
    # a variable given on the command line that the file neither declares nor uses would be ignored
    # silently (a misspelling, or a name from an older version of the file): say so instead
    refs = [r.strip().split(".") for r in _refs(spec.output) + [r for st in spec.stages for r in _refs(st.config)]]
    used = {parts[1] for parts in refs if parts[0] == "vars" and len(parts) == 2}
    spec.output = _resolve_pipeline_output(spec, p)
    names: List[str] = []
    for st in spec.stages:
        if st.name in names:
            raise ConfigError(f"pipeline {p}: two stages are named {st.name!r}")
        command_for(st.command)  # raises for an unknown command
        for ref in _refs(st.config):
            _check_ref(ref, st.name, names, spec.vars)
        names.append(st.name)
    unused = sorted(set(cfg.vars) - declared - used)
    if unused:
        raise ConfigError(f"pipeline {p}: vars.{unused[0]} is not a variable of this pipeline "
                          f"(have: {', '.join(sorted(declared | used)) or 'none'})")
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


# ------------------------------------------------------------------------------------ running

def run_pipeline(config: Union[PipelineConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run the pipeline; returns ``{"output", "stages": {name: action}, "seconds"}`` where action is
    ``skipped``, ``ran`` or ``resumed``."""
    cfg = as_config(PipelineConfig, config, overrides)
    spec = load_spec(cfg)
    check_stages(spec, cfg.file)  # every stage's config and python rewards, before anything is written
    return run_stages(spec, force=cfg.force, stop_after=cfg.stop_after)


def run_pipeline_command(cfg: PipelineConfig) -> Dict[str, Any]:
    """The CLI runner: a flat summary for the table."""
    res = run_pipeline(cfg)
    return {"output": res["output"], **{f"stage {k}": v for k, v in res["stages"].items()},
            "seconds": res["seconds"]}
