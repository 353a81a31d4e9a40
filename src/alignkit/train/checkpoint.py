"""Checkpoints: written aside, committed by a manifest of file hashes, verified before they are trusted.

Layout of ``checkpoints/step-N`` (written into ``.tmp-step-N``, then renamed):

- ``model*.safetensors`` and ``optimizer*.bin`` from ``accelerate.save_state`` (FSDP/DeepSpeed aware);
- ``scheduler.json``: the learning-rate schedule's state (JSON);
- ``rng_state_R.safetensors``: the random states of process R (torch CPU and accelerator generators as
  tensors; Python's and NumPy's as JSON in the metadata). accelerate's pickled ``random_states_R.pkl`` is
  replaced by it, so no file of a checkpoint is a pickle that could carry code;
- ``trainer_state.json``: step, counters, the task's state, the config and the inputs' fingerprints;
- ``manifest.json``, written last (the commit marker): size and SHA-256 of every other file.

"Intact" means the manifest is there and every file it lists has its size and hash, with no file
beside them. ``--resume`` (latest) takes the newest intact checkpoint and says so in one line when it
passes over a damaged one; rotation never deletes the newest intact checkpoint. Loading goes through
safetensors, JSON and ``torch.load(weights_only=True)`` only (forced for every ``torch.load`` while
accelerate loads the state), and a file that does not load is one :class:`CheckpointError` line.

Before each checkpoint the free disk space is checked against its size; a failed write removes its
``.tmp-*`` directory and raises :class:`~alignkit.train.disk.SaveError` naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from alignkit.train.disk import RunDirError, check_space, need_bytes, save_error, sha256_file

_STEP = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
SCHEDULER = "scheduler.json"
RNG = "rng_state_{}.safetensors"
# names a checkpoint may hold (accelerate's model/optimizer files, FSDP's sharded folders, ours)
_ALLOWED = re.compile(r"^(model(_\d+)?\.safetensors|pytorch_model(_fsdp)?(_\d+)?(\.bin)?|optimizer(_\d+)?(\.bin)?"
                      r"|scheduler\.json|rng_state_\d+\.safetensors|trainer_state\.json|manifest\.json)$")


class CheckpointError(RunDirError):
    """A checkpoint is damaged, incomplete or refused; the message (one line) names the file."""


def step_dirs(root: Path) -> List[Path]:
    """Checkpoints ``root/step-N`` (renamed into place, not necessarily intact), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------------------ manifest

def _files(ckpt: Path) -> List[str]:
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if (p.is_file() or p.is_symlink())
                  and p.name != MANIFEST)


def _hash_all(ckpt: Path, names: List[str]) -> Dict[str, str]:
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(names)))) as pool:  # hashlib releases the GIL
        return dict(zip(names, pool.map(lambda n: sha256_file(ckpt / n), names)))


def write_manifest(ckpt: Path) -> None:
    """``ckpt/manifest.json``: size and SHA-256 of every file, written last and atomically."""
    names = _files(ckpt)
    hashes = _hash_all(ckpt, names)
    files = {n: {"size": (ckpt / n).stat().st_size, "sha256": hashes[n]} for n in names}
    tmp = ckpt / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt / MANIFEST)


def _read_manifest(ckpt: Path) -> Tuple[Optional[Dict[str, Any]], str]:
    try:
        data = json.loads((ckpt / MANIFEST).read_text())
    except FileNotFoundError:
        return None, f"no {MANIFEST} (an interrupted save, or a checkpoint of an older alignkit)"
    except (OSError, ValueError) as e:
        return None, f"{MANIFEST} is unreadable ({e})"
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        return None, f"{MANIFEST} is not a manifest"
    return data, ""


def damage(ckpt: Path, hashes: bool = True) -> Optional[str]:
    """Why ``ckpt`` is not intact (None when it is): a missing or changed file, a file the manifest does
    not list. ``hashes=False``: sizes only (cheap, for rotation)."""
    manifest, why = _read_manifest(ckpt)
    if manifest is None:
        return why
    listed = manifest["files"]
    present = _files(ckpt)
    extra = [n for n in present if n not in listed]
    if extra:
        return f"{extra[0]} is not in its {MANIFEST} (added after the checkpoint was written)"
    for name, info in listed.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != info.get("size"):
            return f"{name} has {p.stat().st_size} bytes, {info.get('size')} when written"
    if hashes:
        for name, digest in _hash_all(ckpt, sorted(listed)).items():
            if digest != listed[name].get("sha256"):
                return f"{name} changed after it was written (its SHA-256 differs from the manifest)"
    return None


_VERIFIED: Dict[Tuple[str, int], Optional[str]] = {}


def verified_damage(ckpt: Path) -> Optional[str]:
    """:func:`damage` with the hashes, remembered per manifest (a resume checks once, then loads)."""
    try:
        key = (str(Path(ckpt).resolve()), (Path(ckpt) / MANIFEST).stat().st_mtime_ns)
    except OSError:
        return damage(ckpt)
    if key not in _VERIFIED:
        _VERIFIED[key] = damage(ckpt)
    return _VERIFIED[key]


def resolve_checkpoint(root: Path, where: str, warn: Callable[[str], None] = print) -> Path:
    """The checkpoint to resume from, verified. ``latest`` (or auto/true): the newest intact
    ``root/step-N``, with one line through ``warn`` for each damaged newer one passed over; a named
    checkpoint must itself be intact. Raises :class:`CheckpointError` otherwise."""
    if where in ("latest", "auto", "true", "True"):
        found = step_dirs(root)
        if not found:
            raise CheckpointError(f"--resume: no checkpoint under {root}")
        passed = []
        for ckpt in reversed(found):
            why = verified_damage(ckpt)
            if why is None:
                for bad, reason in passed:
                    warn(f"--resume: {bad} is damaged ({reason}); resuming from {ckpt.name}, the newest intact "
                         f"checkpoint")
                return ckpt
            passed.append((ckpt, why))
        raise CheckpointError(f"--resume: no intact checkpoint under {root} ("
                              + "; ".join(f"{p.name}: {r}" for p, r in passed)
                              + "); start afresh with --overwrite")
    path = Path(where)
    if not path.is_dir():
        raise CheckpointError(f"--resume: {path} is not a checkpoint directory")
    why = verified_damage(path)
    if why is not None:
        raise CheckpointError(f"--resume: the checkpoint {path} is damaged ({why}); resume from another "
                              f"checkpoint or start afresh with --overwrite")
    return path


# ------------------------------------------------------------------------------------ RNG and schedule

def save_rng(path: Path) -> None:
    """This process's random states into a safetensors file (tensors + JSON metadata: no pickle)."""
    # deferred: torch, numpy, safetensors load with the RNG files; rundir reads the manifests without them
    import numpy as np
    import torch
    from safetensors.torch import save_file

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, py_gauss = random.getstate()
    meta = {"python": json.dumps([version, list(internal), py_gauss]),
            "numpy": json.dumps([kind, int(pos), int(has_gauss), float(gauss)])}
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> None:
    # deferred: torch, numpy, safetensors load with the RNG files; rundir reads the manifests without them
    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, internal, py_gauss = json.loads(meta["python"])
    kind, pos, has_gauss, gauss = json.loads(meta["numpy"])
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate((version, tuple(internal), py_gauss))


@contextlib.contextmanager
def _weights_only(seen: List[str]):
    """Every ``torch.load`` inside runs with ``weights_only=True`` (whatever its caller asked: accelerate
    loads custom state with ``weights_only=False``); ``seen`` records the files it opens."""
    # deferred: torch loads with a checkpoint; rundir reads the manifests without it
    import torch

    orig = torch.load

    def safe_load(f, *args, **kwargs):
        seen.append(str(f))
        kwargs["weights_only"] = True
        return orig(f, *args, **kwargs)

    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = orig


# ------------------------------------------------------------------------------------ manager

class CheckpointManager:
    def __init__(self, root: Path, accelerator, keep: int = 2):
        self.root, self.acc, self.keep = Path(root), accelerator, keep

    def list(self) -> List[Path]:
        return step_dirs(self.root)

    def latest(self) -> Optional[Path]:
        """The newest checkpoint that looks intact (manifest and sizes; the hashes are checked on resume)."""
        for ckpt in reversed(self.list()):
            if damage(ckpt, hashes=False) is None:
                return ckpt
        return None

    def save(self, step: int, state: Dict[str, Any], scheduler=None, need: int = 0) -> Path:
        """Write checkpoint ``step``; ``need``: bytes it takes (checked against the free space first)."""
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
            self.acc.save_state(str(tmp))  # model, optimizer (and accelerate's pickled RNG, replaced below)
            rank = self.acc.process_index
            save_rng(tmp / RNG.format(rank))
            (tmp / f"random_states_{rank}.pkl").unlink(missing_ok=True)
            if self.acc.is_main_process:
                if scheduler is not None:
                    (tmp / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
                (tmp / STATE).write_text(json.dumps(state))
            self.acc.wait_for_everyone()
            if self.acc.is_main_process:
                write_manifest(tmp)  # last: the commit marker
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
            self.rotate()
        self.acc.wait_for_everyone()
        return final

    def rotate(self) -> None:
        """Keep the newest ``keep`` checkpoints, and the newest intact one (manifest, sizes and finite
        weights) when none of those is."""
        ckpts = self.list()
        kept = ckpts[-self.keep:]
        if not any(_usable(c) for c in kept):
            older = [c for c in ckpts[:-self.keep] if _usable(c)]
            kept = kept + older[-1:]
        for old in ckpts:
            if old not in kept:
                shutil.rmtree(old, ignore_errors=True)

    def resolve(self, where: str, warn: Callable[[str], None] = print) -> Path:
        return resolve_checkpoint(self.root, where, warn)

    def load(self, where: str, scheduler=None) -> Tuple[Path, Dict[str, Any]]:
        """Restore model, optimizer, scheduler and this process's random states from a verified checkpoint.
        The main process chooses it (the newest intact one for ``latest``) and tells the others."""
        # deferred: accelerate (slow import) loads only for training
        from accelerate.utils import broadcast_object_list

        chosen: List[Any] = [None]
        if self.acc.is_main_process:
            try:
                chosen[0] = str(self.resolve(where, warn=lambda m: None))  # claim() said it already
            except CheckpointError as e:
                chosen[0] = e
        if self.acc.num_processes > 1:
            chosen = broadcast_object_list(chosen)
        if isinstance(chosen[0], BaseException):
            raise chosen[0]
        path = Path(chosen[0])
        rank, world = self.acc.process_index, self.acc.num_processes
        state = _load_json(path, STATE)
        written_by = int(state.get("world_size", world))
        if written_by != world:
            raise CheckpointError(f"--resume: the checkpoint {path} was written by {written_by} processes, this run "
                                  f"has {world}: the data order and random states would not continue exactly; "
                                  f"resume with {written_by} processes")
        for name in sorted(_files(path)):
            if not _ALLOWED.match(Path(name).parts[0]):
                raise CheckpointError(f"--resume: {path / name} is not a file alignkit writes into a checkpoint "
                                      f"(a pickle could run code); refused")
        rng = path / RNG.format(rank)
        if not rng.is_file():
            raise CheckpointError(f"--resume: {rng} is missing (process {rank}'s random states): the resume would "
                                  f"not be exact; resume from another checkpoint")
        sched = _load_json(path, SCHEDULER) if scheduler is not None else None
        seen: List[str] = []
        try:
            with _weights_only(seen):
                self.acc.load_state(str(path), load_kwargs={"weights_only": True})
        except Exception as e:  # noqa: BLE001 - every failure is the same story: that file did not load
            where_ = seen[-1] if seen else str(path / "model.safetensors")
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"--resume: {where_} did not load ({type(e).__name__}: {reason[:200]}); "
                                  f"resume from another checkpoint") from None
        try:
            load_rng(rng)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"--resume: {rng} did not load ({type(e).__name__}: {e}); resume from another "
                                  f"checkpoint") from None
        if scheduler is not None:
            try:
                scheduler.load_state_dict(sched)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"--resume: {path / SCHEDULER} did not load ({type(e).__name__}: {e})") from None
        return path, state


def _load_json(path: Path, name: str) -> Dict[str, Any]:
    try:
        data = json.loads((path / name).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"--resume: {path / name} is missing; resume from another checkpoint") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"--resume: {path / name} did not load ({e}); resume from another checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"--resume: {path / name} is not a JSON object; resume from another checkpoint")
    return data


def _usable(ckpt: Path) -> bool:
    if damage(ckpt, hashes=False) is not None:
        return False
    try:
        return bool(json.loads((ckpt / STATE).read_text()).get("finite", True))
    except (OSError, ValueError):
        return False


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
