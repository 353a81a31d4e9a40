"""Shared types for loss functions and the loss registries.

Every loss in :mod:`alignkit.losses` is a pure function: tensors in, a :class:`LossOutput` out.
``losses`` is per example (shape ``(B,)``), never reduced inside the function, so the caller
chooses the reduction (and normalizes by global counts under accumulation / several processes).
``metrics`` holds detached tensors, each either ``(B,)`` (averaged by the caller) or scalar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generic, Iterator, List, TypeVar

import torch


@dataclass
class LossOutput:
    """Per-example losses ``(B,)`` and detached metrics (name -> tensor)."""

    losses: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


F = TypeVar("F", bound=Callable)


@dataclass(frozen=True)
class LossSpec(Generic[F]):
    """A registry entry: the function and what it needs from the trainer."""

    name: str
    fn: F
    needs_reference: bool = True
    paired: bool = True
    length_normalized: bool = False
    doc: str = ""


S = TypeVar("S")


class Registry(Generic[S]):
    """Name -> spec (a :class:`LossSpec` by default), filled by the :meth:`register` decorator (a function
    and what it declares) or by :meth:`add` (an entry that is data, such as an online-RL preset).

    CLI choices, config validation and error messages all read this, so a name lives in exactly one
    place. ``spec`` is the entry type (a frozen dataclass with ``name``, ``fn`` and ``doc`` fields for
    :meth:`register`); ``what`` names an entry in errors ("unknown policy loss 'x'; choose one of: ...").
    """

    def __init__(self, family: str, spec: type = LossSpec, what: str = "loss"):
        self.family, self.spec, self.what = family, spec, what
        self._specs: Dict[str, S] = {}

    def register(self, name: str, **declared: Any):
        """Decorator: file ``fn`` under ``name`` as ``spec(name=name, fn=fn, doc=<its docstring's first line>,
        **declared)``; ``declared`` are the spec's fields (``needs_reference=False``, ``needs_critic=True``)."""
        def deco(fn):
            doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            self.add(self.spec(name=name, fn=fn, doc=doc, **declared))
            return fn

        return deco

    def add(self, spec: S) -> S:
        """File an entry built by hand (its ``name`` is the key)."""
        name = spec.name  # type: ignore[attr-defined]
        if name in self._specs:
            raise ValueError(f"{self.family} {self.what} {name!r} registered twice")
        self._specs[name] = spec
        return spec

    def get(self, name: str) -> S:
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.family} {self.what} {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def check(self, name: str) -> str:
        """``name`` itself when registered (a pydantic validator's body); else the error of :meth:`get`."""
        self.get(name)
        return name

    def names(self) -> List[str]:
        return sorted(self._specs)

    def describe(self) -> str:
        """Every entry as ``name (doc)``, for a config field's help: the one list of the choices."""
        return "; ".join(f"{n}: {s.doc.rstrip('.')}" if getattr(s, "doc", "") else n for n, s in self.items())

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._specs)

    def items(self):
        return sorted(self._specs.items())
