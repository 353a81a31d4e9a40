"""Writes into a run directory: all or nothing, with the free space checked first and every failure one
line that names the path and the cause ("no space left on device ...: need ~N MB, M MB free"), whatever
layer (``torch.save``'s "unexpected pos", safetensors) raised it; and the errors of run directories.

The lowest module of the run-directory code: :mod:`alignkit.train.rundir` (ownership, resume checks) and
:mod:`alignkit.train.checkpoint` (checkpoints) both build on it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Optional

__all__ = ["RunDirError", "SaveError", "sha256_file", "free_bytes", "tensor_bytes", "need_bytes", "check_space",
           "save_error", "atomic_save_dir"]

_MB = 1 << 20


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked; the message says why and what to do."""


class SaveError(OSError):
    """A checkpoint or the model could not be written; the message names the path and the cause."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno, self.message = code, message

    def __str__(self) -> str:
        return self.message


def sha256_file(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB blocks (input fingerprints and checkpoint manifests)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------ disk space

def _existing(path: Path) -> Path:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> Optional[int]:
    try:
        return shutil.disk_usage(_existing(path)).free
    except OSError:
        return None


def tensor_bytes(*objs) -> int:
    """Bytes of the tensors of modules, optimizers (their state) and state dicts, for space checks."""
    # deferred: torch stays out of this module's import (CLI start-up)
    import torch

    total = 0

    def add(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                add(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                add(v)

    for obj in objs:
        if obj is None:
            continue
        if isinstance(obj, torch.nn.Module):
            total += sum(t.numel() * t.element_size() for t in obj.state_dict().values())
        elif hasattr(obj, "state") and isinstance(getattr(obj, "state"), dict):  # an optimizer
            add(list(obj.state.values()))
        else:
            add(obj)
    return total


def need_bytes(payload: int) -> int:
    """Space asked for a write of ``payload`` bytes: 10% and 4 MB of slack (tokenizer, metadata)."""
    return int(payload * 1.1) + 4 * _MB


def _mb(n: Optional[int]) -> str:
    return "?" if n is None else f"{max(n, 0) / _MB:,.0f}"


def check_space(path: Path, need: int, what: str, hint: str = "") -> None:
    """Raise :class:`SaveError` when the file system of ``path`` has less than ``need`` bytes free."""
    free = free_bytes(path)
    if free is not None and free < need:
        raise SaveError(errno.ENOSPC, f"no space left on device for {what} at {path}: need ~{_mb(need)} MB, "
                                      f"{_mb(free)} MB free; free some space or choose another --output{hint}")


def _is_enospc(e: BaseException) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "unexpected pos" in text or "file write failed" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def save_error(e: BaseException, path: Path, need: int, what: str, hint: str = "") -> SaveError:
    """A one-line :class:`SaveError` for a failed write of ``what`` into ``path``."""
    free = free_bytes(path)
    if _is_enospc(e) or (free is not None and free < need):
        return SaveError(errno.ENOSPC, f"no space left on device writing {what} to {path}: need ~{_mb(need)} MB, "
                                       f"{_mb(free)} MB free; free some space or choose another --output{hint}")
    reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
    return SaveError(getattr(e, "errno", None) or errno.EIO, f"could not write {what} to {path} ({reason}){hint}")


def atomic_save_dir(final: Path, write, payload: int, what: str, hint: str = "") -> Path:
    """Write a directory all or nothing: ``write(tmp)`` fills ``final``'s sibling ``.tmp-NAME``, which then
    replaces ``final`` by renames (the old one is removed only after the new one is in place).
    ``payload``: bytes of the tensors written (the free space is checked first)."""
    final = Path(final)
    need = need_bytes(payload)
    tmp, old = final.with_name(f".tmp-{final.name}"), final.with_name(f".old-{final.name}")
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    check_space(final.parent, need, what, hint)
    try:
        write(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise save_error(e, final.parent, need, what, hint) from e
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final
