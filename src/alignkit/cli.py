"""The ``alignkit`` command line. Subcommands are generated from the config models.

Every command takes ``--config file.yaml``, dotted overrides as extra arguments (``optim.lr=1e-5``)
and a few convenience flags. ``alignkit CMD --help`` lists every config field with its docstring.
"""

from __future__ import annotations

import json
import re
import sys
import typing
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Type

import click

from alignkit.command import COMMANDS, Command, load_commands, load_ref, register_command  # noqa: F401  (re-exported)

if TYPE_CHECKING:  # pydantic and the config classes load only when a command runs (fast --help)
    from pydantic import BaseModel

_load = load_ref  # the old private name

TRAIN_FLAGS = {"model": "model.name_or_path", "data": "data.path", "output": "output",
               "max_steps": "train.max_steps", "resume": "resume", "overwrite": "overwrite",
               "resume_anyway": "resume_anyway", "push_to_hub": "hub.push"}


def _type_name(ann) -> str:
    origin = typing.get_origin(ann)
    args = typing.get_args(ann)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin is typing.Union:
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner)
    if origin in (list, List):
        return f"list[{_type_name(args[0])}]" if args else "list"
    if origin in (dict, Dict):
        return "mapping"
    return getattr(ann, "__name__", str(ann))


def _is_model(x: Any) -> bool:
    # deferred: pydantic stays out of this module's import (CLI start-up)
    from pydantic import BaseModel

    return isinstance(x, type) and issubclass(x, BaseModel)


def config_help(cls: Type[BaseModel]) -> str:
    rows = []
    for name, f in _leaf_fields(cls):
        default = "(required)" if f.is_required() else json.dumps(f.get_default(call_default_factory=True), default=str)
        desc = " ".join((f.description or "").split())
        rows.append(f"  {name} ({_type_name(f.annotation)}, default {default})\n      {desc}")
    return "\n".join(rows)


def _leaf_fields(cls: Type[BaseModel], prefix: str = ""):
    for name, f in cls.model_fields.items():
        if name == "command":
            continue
        ann = f.annotation
        if _is_model(ann):
            yield from _leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", f


class CommandWithRawEpilog(click.Command):
    def parse_args(self, ctx, args):
        # `--resume optim.lr=1e-3`: --resume takes an optional value (a checkpoint), and click would take the
        # override for it; an override after --resume stays an override, in its place
        args = list(args)
        for i, a in enumerate(args[:-1]):
            if a == "--resume" and _is_override(args[i + 1]):
                args[i] = "--resume=latest"
        return super().parse_args(ctx, args)

    def format_epilog(self, ctx, formatter):
        if self.epilog:
            formatter.write("\n" + self.epilog + "\n")


def _make(cmd: Command) -> click.Command:
    def callback(config_path, overrides, lora, debug, **flags):
        # deferred: CLI start-up (`alignkit --help` loads no pydantic or torch)
        from alignkit.aliases import cli_tokens_to_overrides
        from alignkit.config import ConfigError, load_config

        _quiet_hf_progress()
        cls = _load(cmd.config)
        overrides = cli_tokens_to_overrides(list(overrides))  # TRL style: --learning_rate 5e-7
        flat = dict(cmd.defaults or {})
        # a repeatable flag (list field) given zero times leaves the YAML value alone
        flat.update({cmd.flags[k]: (list(v) if isinstance(v, tuple) else v) for k, v in flags.items()
                     if v is not None and v != ()})
        if lora:
            flat["lora.enabled"] = True
        if cmd.positional:  # bare arguments (no "=") fill one field: `alignkit report RUN_DIR`
            bare = [o for o in overrides if "=" not in o]
            overrides = [o for o in overrides if "=" in o]
            if bare:
                flat[cmd.positional] = bare if _is_list_field(cls, cmd.positional) else bare[0]
                if len(bare) > 1 and not _is_list_field(cls, cmd.positional):
                    raise click.UsageError(f"expected one {cmd.positional.upper()} argument, got {len(bare)}")
        try:
            cfg = load_config(cls, config_path, list(overrides), **flat)
        except ConfigError as e:
            raise click.UsageError(str(e)) from None
        runner = _load(cmd.runner)
        debug = bool(debug or (click.get_current_context().find_root().params or {}).get("debug"))
        summary = run_reporting_errors(lambda: runner(cfg), debug)
        if summary:
            _print_summary(summary)

    params: List[click.Parameter] = [
        click.Option(["--config", "config_path"], type=click.Path(dir_okay=False), default=None,
                     help="YAML file with any of the fields below."),
        click.Argument(["overrides"], nargs=-1),
    ]
    cls = _load(cmd.config)
    has_lora = "lora" in cls.model_fields
    params.append(click.Option(["--lora"], is_flag=True, default=False, hidden=not has_lora,
                               help="Train LoRA adapters (lora.enabled=true)."))
    params.append(click.Option(["--debug"], is_flag=True, default=False,
                               help="On an error, show the full traceback instead of a one-line message."))
    for flag, dotted in cmd.flags.items():
        opt_type = int if dotted.endswith("max_steps") else str
        if dotted == "resume":
            params.append(click.Option(["--resume"], is_flag=False, flag_value="latest", default=None,
                                       help="Resume from OUTPUT's latest checkpoint, or from a given one."))
            continue
        if cmd.choices and flag in cmd.choices:
            opt_type = click.Choice(_load(cmd.choices[flag]).names())
        if _is_bool_field(cls, dotted):  # --quick sets quick=true
            params.append(click.Option([f"--{flag.replace('_', '-')}", flag], is_flag=True, default=None,
                                       help=f"Shorthand for {dotted}=true."))
            continue
        multiple = _is_list_field(cls, dotted)  # list fields take a repeatable flag
        params.append(click.Option([f"--{flag.replace('_', '-')}", flag], type=opt_type, default=None,
                                   multiple=multiple,
                                   help=f"Add an item to {dotted} (repeatable; replaces the YAML list)."
                                   if multiple else f"Shorthand for {dotted}=VALUE."))
    epilog = "Overrides: KEY=VALUE (dotted, YAML values), e.g. optim.lr=1e-5 train.batch_size=4\n" \
        "TRL / transformers names work too, as KEY=VALUE, --KEY VALUE or in the YAML file\n" \
        "(learning_rate, per_device_train_batch_size, model_name_or_path, dataset_name, beta, ...).\n\nFields:\n" \
        + config_help(cls)
    return CommandWithRawEpilog(cmd.name, callback=callback, params=params, help=cmd.help, epilog=epilog,
                                context_settings={"max_content_width": 120, "ignore_unknown_options": True})


def _is_override(token: str) -> bool:
    """A ``KEY=VALUE`` override (not a checkpoint path that happens to hold an '=')."""
    from pathlib import Path

    return "=" in token and re.match(r"^[A-Za-z_][\w.\-]*=", token) is not None and not Path(token).exists()


#: the arguments of the command being run (after the program name), for the --resume hint of a preempted run
_ARGV: List[str] = []


def _user_errors() -> tuple:
    """Exceptions that describe a mistake in the input (data, paths, config, run directory): their
    message is the whole story, so the CLI prints it as one line without a traceback."""
    # deferred: CLI start-up (`alignkit --help` imports only the command registry: no pydantic, no torch)
    from alignkit.config import ConfigError
    from alignkit.data.load import DataError
    from alignkit.hub import HubPushError  # the model is saved; the message says where and how to log in
    from alignkit.rewards.base import RewardError
    from alignkit.train.logging import MissingPackage
    from alignkit.train.loop import TrainingAborted
    from alignkit.train.disk import RunDirError, SaveError

    return (DataError, ConfigError, TrainingAborted, RunDirError, SaveError, MissingPackage, FileNotFoundError,
            PermissionError, IsADirectoryError, NotADirectoryError, HubPushError, RewardError)


def run_reporting_errors(fn, debug: bool = False):
    """Call ``fn``; a mistake in the input (:func:`_user_errors`) becomes one ``Error: ...`` line and
    exit code 1 (``debug``: the traceback). Anything else is a bug and keeps its traceback."""
    # deferred: CLI start-up (`alignkit --help` imports only the command registry)
    from alignkit.train.preempt import Preempted, resume_command
    from alignkit.train.rundir import release_all

    try:
        return fn()
    except Preempted as e:
        # deferred: CLI start-up (`alignkit --help` imports only the command registry)
        from alignkit.train.logging import is_main_process

        if is_main_process():
            cmd = next((c for c in COMMANDS if _ARGV and c.name == _ARGV[0]), None)
            how = (f"resume with: {resume_command(_ARGV)}" if cmd is None or "resume" in cmd.flags.values()
                   else "rerun the same command to resume it")  # e.g. a pipeline resumes its stage itself
            click.echo(f"preempted by {e.signame} after step {e.step}: checkpoint {e.checkpoint} written; {how}",
                       err=True)
        raise SystemExit(e.exit_code) from None
    except Exception as e:
        if debug or isinstance(e, click.ClickException):
            raise
        # deferred: CLI start-up (`alignkit --help` imports only the command registry)
        from alignkit.refusals import refusal_line  # sandbox and unpickling refusals: one line too

        line = str(e) if isinstance(e, _user_errors()) else refusal_line(e)
        if line is None:
            raise
        raise click.ClickException(line) from None
    finally:
        release_all()


def _is_bool_field(cls: Type[BaseModel], dotted: str) -> bool:
    node: Any = cls
    for part in dotted.split("."):
        if not _is_model(node) or part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    return node is bool


def _is_list_field(cls: Type[BaseModel], dotted: str) -> bool:
    """Whether the dotted field of ``cls`` is a list (then its flag may be given several times)."""
    node: Any = cls
    f = None
    for part in dotted.split("."):
        if not _is_model(node) or part not in node.model_fields:
            return False
        f = node.model_fields[part]
        node = f.annotation
    return f is not None and typing.get_origin(f.annotation) in (list, List)


def _print_summary(summary: Dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    # deferred: CLI start-up (`alignkit --help` imports only the command registry)
    from alignkit.train.logging import is_main_process

    if not is_main_process():  # under torchrun/accelerate only rank 0 prints (the numbers are global)
        return

    table = Table(title="summary", show_header=False)
    for k, v in summary.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        table.add_row(str(k), str(v))
    Console(stderr=True).print(table)


def short_help(text: str) -> str:
    """The first sentence of a command's help, whole: never cut inside a citation ("Azar et al. 2023"),
    a title or abbreviation ("Dr. GRPO", "Eq. 3", "cf.") or an initial ("J. Schulman")."""
    m = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bDr)(?<!\bMr)(?<!\bEq)(?<!\beq)(?<!\bFig)"
                  r"(?<!\bcf)(?<!\bSec)(?<!\bNo)(?<!\b[A-Z])\.(\s|$)", text)
    return text[: m.start() + 1] if m else text


class LazyGroup(click.Group):
    """Builds a command's click object (which imports its config class, often torch) only when that
    command runs or shows its own help: ``alignkit --help`` imports neither torch nor pydantic."""

    def list_commands(self, ctx):
        return sorted(c.name for c in COMMANDS)

    def get_command(self, ctx, name):
        if name in self.commands:
            return self.commands[name]
        cmd = next((c for c in COMMANDS if c.name == name), None)
        if cmd is None:
            return None
        self.commands[name] = built = _make(cmd)
        return built

    def format_commands(self, ctx, formatter):
        rows = [(c.name, short_help(c.help)) for c in sorted(COMMANDS, key=lambda c: c.name)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def build_cli() -> click.Group:
    load_commands()  # every module of alignkit.commands registers its commands (cheap: no config classes)

    @click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    @click.version_option(package_name="alignkit")
    @click.option("--debug", is_flag=True, default=False,
                  help="On an error, show the full traceback instead of a one-line message.")
    def cli(debug):
        """alignkit: align language models with preferences (SFT, reward models, DPO family, PPO/GRPO/RLOO).

        With no --model every command uses the embedded SmolLM2-135M-Instruct. `alignkit CMD --help` lists
        every field of a command; `alignkit env` prints versions and devices for bug reports."""

    return cli


def _quiet_hf_progress() -> None:
    try:  # our own progress bar is enough
        # deferred: transformers is slow to import; it loads when a model does
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def main(argv: Optional[List[str]] = None) -> None:
    _ARGV[:] = list(sys.argv[1:] if argv is None else argv)
    build_cli()(args=argv, prog_name="alignkit")


if __name__ == "__main__":  # pragma: no cover
    # `python -m alignkit.cli`: run the imported module, where the command modules register
    from alignkit.cli import main as _main

    _main(sys.argv[1:])
