"""Atomic checkpoints: written aside, then renamed into place; the newest N are kept.

A crash while a checkpoint is written leaves only a ``.tmp-*`` directory behind, never a half
``step-*`` one, so "latest" always names a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

_STEP = re.compile(r"^step-(\d+)$")


class CheckpointManager:
    def __init__(self, root: Path, accelerator, keep: int = 2):
        self.root, self.acc, self.keep = Path(root), accelerator, keep

    def list(self) -> List[Path]:
        if not self.root.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[Path]:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(self, step: int, state: Dict[str, Any]) -> Path:
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if self.acc.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):  # leftovers of an interrupted save
                shutil.rmtree(stale, ignore_errors=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))  # model, optimizer, registered scheduler, RNG of every process
        if self.acc.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(state))
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
        if where in ("latest", "auto", "true", "True"):
            path = self.latest()
            if path is None:
                raise FileNotFoundError(f"--resume: no checkpoint under {self.root}")
            return path
        path = Path(where)
        if not (path / "trainer_state.json").exists():
            raise FileNotFoundError(f"--resume: {path} is not a complete checkpoint (no trainer_state.json)")
        return path

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
