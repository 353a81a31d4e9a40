"""Atomic checkpoints: written aside, then renamed into place; the newest N are kept.

A crash while a checkpoint is written leaves only a ``.tmp-*`` directory behind, never a half
``step-*`` one, so "latest" always names a complete checkpoint. Before each checkpoint the free disk
space is checked against its size (model, optimizer state); a failed write removes its ``.tmp-*``
directory and raises :class:`~alignkit.train.rundir.SaveError` naming the path and the cause.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

_STEP = re.compile(r"^step-(\d+)$")


def step_dirs(root: Path) -> List[Path]:
    """Complete checkpoints ``root/step-N``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(root: Path, where: str) -> Path:
    """``latest`` (or auto/true): the newest ``root/step-N``; otherwise a checkpoint directory."""
    if where in ("latest", "auto", "true", "True"):
        found = step_dirs(root)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint under {root}")
        return found[-1]
    path = Path(where)
    if not (path / "trainer_state.json").exists():
        raise FileNotFoundError(f"--resume: {path} is not a complete checkpoint (no trainer_state.json)")
    return path


class CheckpointManager:
    def __init__(self, root: Path, accelerator, keep: int = 2):
        self.root, self.acc, self.keep = Path(root), accelerator, keep

    def list(self) -> List[Path]:
        return step_dirs(self.root)

    def latest(self) -> Optional[Path]:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, state: Dict[str, Any], need: int = 0) -> Path:
        """Write checkpoint ``step``; ``need``: bytes it takes (checked against the free space first)."""
        from alignkit.train.rundir import check_space, need_bytes, save_error

        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        latest = self.latest()
        hint = (f"; the latest checkpoint ({latest.name}) is intact: rerun with --resume once there is room"
                if latest is not None else "")
        what = f"checkpoint step {step}"
        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # leftovers of an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
        need = need_bytes(need)
        check_space(self.root, need, what, hint)
        self.acc.wait_for_everyone()
        try:
            self.acc.save_state(str(tmp))  # model, optimizer, registered scheduler, RNG of every process
            if self.acc.is_main_process:
                (tmp / "trainer_state.json").write_text(json.dumps(state))
        except Exception as e:
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back; "latest" is untouched
            raise save_error(e, self.root, need, what, hint) from e
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            for old in self.list()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
        return final

    def resolve(self, where: str) -> Path:
        return resolve_checkpoint(self.root, where)

    def load(self, where: str) -> Dict[str, Any]:
        path = self.resolve(where)
        self.acc.load_state(str(path))
        return json.loads((path / "trainer_state.json").read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
