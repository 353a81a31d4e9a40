"""The command registry: what a command is and how its config and runner are loaded.

Each module of :mod:`alignkit.commands` registers its commands here (:func:`register_command`); the
CLI (:mod:`alignkit.cli`), pipelines and the round-based methods (:mod:`alignkit.stages`) all look
commands up here, so none of them imports another to find one. Importing this module is cheap (no
pydantic, no torch): ``alignkit --help`` lists the commands without loading any config class.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import alignkit.commands as _commands_pkg  # the package only; its modules are imported by load_commands


@dataclass
class Command:
    name: str
    config: str  # "module:Class"
    runner: str  # "module:function" taking the config, returning a summary dict
    help: str
    flags: Dict[str, str]  # convenience flag -> dotted field
    defaults: Optional[Dict[str, Any]] = None  # dotted field -> value preset by an alias (e.g. kto)
    choices: Optional[Dict[str, str]] = None  # flag -> "module:REGISTRY" whose names() are the choices
    positional: Optional[str] = None  # dotted field filled by bare arguments (no "="), e.g. RUN_DIR


# filled by the modules of alignkit.commands, each registering its own commands
COMMANDS: List[Command] = []

# commands that run pipelines themselves and cannot be a pipeline stage
NOT_A_STAGE = ("pipeline", "demo")


def register_command(cmd: Command) -> None:
    """Called by the modules of alignkit.commands; a name may be registered once."""
    if any(c.name == cmd.name for c in COMMANDS):
        return  # a module imported twice (e.g. by tests) registers nothing new
    COMMANDS.append(cmd)


def load_ref(ref: str):
    """The object a ``"module:attr"`` reference names (a command's config class or runner)."""
    mod, attr = ref.split(":")
    return getattr(importlib.import_module(mod), attr)


def load_commands() -> List[Command]:
    """Import every module of alignkit.commands (each registers its commands) and return the registry."""
    for info in sorted(pkgutil.iter_modules(_commands_pkg.__path__), key=lambda i: i.name):
        importlib.import_module(f"{_commands_pkg.__name__}.{info.name}")
    return COMMANDS


def command_for(name: str, extra: Optional[Dict[str, Any]] = None) -> Command:
    """The registered command ``name`` (``sample_pairs`` and ``sample-pairs`` are the same), or the one
    ``extra`` names (stage commands of generated pipelines that are not CLI commands)."""
    if extra and name in extra:
        return extra[name]
    commands = {c.name: c for c in load_commands()}
    for candidate in (name, name.replace("_", "-")):
        if candidate in commands and candidate not in NOT_A_STAGE:
            return commands[candidate]
    # deferred: CLI start-up (`alignkit --help` loads no pydantic or torch)
    from alignkit.config import ConfigError  # pydantic: only on this error path, so --help stays light

    raise ConfigError(f"unknown pipeline command {name!r}; known: "
                      + ", ".join(sorted(n for n in commands if n not in NOT_A_STAGE)))
