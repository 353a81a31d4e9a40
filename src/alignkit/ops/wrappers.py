"""The model under its wrappers: the one ``unwrap`` every module uses."""

from __future__ import annotations

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/accelerate (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers.

    peft wrappers stay: they route calls to the adapters (and switch them off for a LoRA reference),
    so code that needs the base model asks peft for it. Safe on an unwrapped model (returned as is).
    """
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, torch.nn.Module):
            model = inner
            continue
        compiled = getattr(model, "_orig_mod", None)
        if isinstance(compiled, torch.nn.Module):
            model = compiled
            continue
        return model


__all__ = ["unwrap"]
