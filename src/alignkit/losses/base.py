"""Shared types for loss functions and the loss registries.

Every loss in :mod:`alignkit.losses` is a pure function: tensors in, a :class:`LossOutput` out.
``losses`` is per example (shape ``(B,)``), never reduced inside the function, so the caller
chooses the reduction (and normalizes by global counts under accumulation / several processes).
``metrics`` holds detached tensors, each either ``(B,)`` (averaged by the caller) or scalar.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Generic, TypeVar

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


class Registry:
    """Name -> :class:`LossSpec`, filled by the :meth:`register` decorator.

    CLI choices, config validation and error messages all read this, so a loss name lives in
    exactly one place.
    """

    def __init__(self, family: str):
        self.family = family
        self._specs: Dict[str, LossSpec] = {}

    def register(self, name: str, *, needs_reference: bool = True, paired: bool = True,
                 length_normalized: bool = False):
        def deco(fn):
            if name in self._specs:
                raise ValueError(f"{self.family} loss {name!r} registered twice")
            doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
            self._specs[name] = LossSpec(name, fn, needs_reference, paired, length_normalized, doc)
            return fn

        return deco

    def get(self, name: str) -> LossSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.family} loss {name!r}; choose one of: {', '.join(self.names())}"
            ) from None

    def names(self):
        return sorted(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def items(self):
        return sorted(self._specs.items())
