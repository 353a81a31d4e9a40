"""A run directory belongs to one run; saves into it are all or nothing.

Ownership (:func:`claim`, called by ``start_run`` before anything is written):

- ``OUTPUT/.alignkit.lock`` holds ``{pid, host, command, started}``. It is created atomically
  (``O_EXCL``), so a second run into the same directory is refused while the first is alive. A lock
  whose process is gone (a crash or kill -9) is stale: it is reported and taken over. A lock from
  another host cannot be checked and is never taken over: the message names the file to delete.
- ``OUTPUT/.alignkit-run.json`` (:data:`MARKER`, written when a run takes a directory) names the
  directory as an alignkit run and lists the files that run writes. ``--overwrite`` and the fresh start
  over an interrupted run clear only a directory with that marker, and only the files it lists; a
  directory holding run-like files without it (the user's own ``config.yaml``, ``model/``, ...) is
  refused with one line naming what is there. A symlinked output is resolved and treated the same way.
- A finished run (``summary.json`` or ``model/``) is never overwritten unless ``overwrite=true``
  (``--overwrite``); an unfinished run with checkpoints needs ``--resume`` or ``--overwrite``. A run
  that stopped before its first checkpoint has nothing to resume: its files are cleared, with a note.
- ``--resume`` takes the newest intact checkpoint (train/checkpoint.py verifies its manifest), compares
  its config with the new one and refuses a mismatch, naming each differing field. Only the fields in
  :data:`MAY_CHANGE_ON_RESUME` may differ (and ``train.max_steps`` only upwards from the checkpoint's
  step). It also compares the fingerprints of what the run read (:func:`input_fingerprints`: data files'
  size and SHA-256, model and reference weights' hashes, Hub revisions) and refuses a changed input,
  naming it, unless ``resume_anyway`` (``--resume-anyway``).

Saves (:mod:`alignkit.train.disk`): a disk-space check before each checkpoint and the final model, and
write errors that name the path and the cause.
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from alignkit import __version__
from alignkit.models.default import DEFAULT_ALIASES, default_model_dir
from alignkit.train.checkpoint import resolve_checkpoint, step_dirs
from alignkit.train.disk import RunDirError, sha256_file

LOCK = ".alignkit.lock"
MARKER = ".alignkit-run.json"  # "this directory is an alignkit run", with the files the run writes
# what a training run writes into its directory; --overwrite (or a fresh start over an interrupted
# run without checkpoints) removes exactly these, never other files a user keeps there
RUN_FILES = ("config.yaml", "data_report.json", "data_report_rows.jsonl", "metrics.jsonl", "alerts.jsonl",
             "samples.jsonl", "completions.jsonl", "heldout_examples_before.json", "summary.json", "report.html", "checkpoints", "model", ".tmp-model", ".old-model",
             "tensorboard", "wandb")
# dotted fields (or section prefixes) that may differ between a checkpoint's config and the resumed one
MAY_CHANGE_ON_RESUME = ("resume", "overwrite", "resume_anyway", "optim.resume_schedule", "output", "log", "diagnostics", "train.max_steps", "train.epochs",
                        "train.max_bad_steps", "train.logprob_chunk", "data.num_proc", "model.gradient_checkpointing",
                        "model.attn_implementation", "reward_timeout_s", "log_completions")

_HELD: Dict[str, Path] = {}  # lock files this process holds (released at exit)


# ------------------------------------------------------------------------------------ lock

def _host() -> str:
    return socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _read_lock(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(info: Dict[str, Any]) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}, {info.get('command', 'a run')} started {when}"


def _prepare_dir(out: Path) -> None:
    """Create ``out``; a file in the way or an unwritable place is a one-line error."""
    for p in [out, *out.parents]:
        if p.exists():
            if not p.is_dir():
                raise RunDirError(f"output {out}: {p} is a file, not a directory; choose another --output")
            break
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"output {out}: cannot create the directory ({e.strerror or e}); "
                          "choose a writable --output") from None


def acquire(out: Path, command: str, warn=print) -> Path:
    """Create ``out/.alignkit.lock`` for this process, or raise :class:`RunDirError` when a live run
    holds it. A stale lock (its process is gone) is reported through ``warn`` and taken over."""
    out = Path(out)
    _prepare_dir(out)
    path = out / LOCK
    info = {"pid": os.getpid(), "host": _host(), "command": command, "started": time.time()}
    for attempt in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            held = _read_lock(path)
            pid, host = held.get("pid"), held.get("host")
            if not held and attempt == 0:  # being written right now by another run: look again
                time.sleep(0.2)
                continue
            if host not in (None, _host()):
                raise RunDirError(f"output {out} is locked by another run ({_describe(held)}); if that run is "
                                  f"no longer running, delete {path}, or choose another --output") from None
            if isinstance(pid, int) and pid != os.getpid() and _alive(pid):
                raise RunDirError(f"output {out} is in use by another run ({_describe(held)}); wait for it to "
                                  f"finish or choose another --output") from None
            if pid != os.getpid():  # our own lock is one an earlier run in this process did not release
                warn(f"{out}: removing a stale lock ({_describe(held)}: that process is no longer running)")
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        except OSError as e:
            why = "read-only file system" if e.errno == errno.EROFS else (e.strerror or str(e))
            raise RunDirError(f"output {out} is not writable ({why}); choose another --output") from None
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        _HELD[str(path.resolve())] = path
        return path
    raise RunDirError(f"output {out}: could not take the lock {path}; another run keeps creating it")


def release(out: Path) -> None:
    """Remove ``out``'s lock if this process holds it."""
    path = Path(out) / LOCK
    key = str(path.resolve()) if path.exists() else None
    if key is None or key not in _HELD:
        return
    if _read_lock(path).get("pid") == os.getpid():
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    _HELD.pop(key, None)


def release_all() -> None:
    for path in list(_HELD.values()):
        release(path.parent)


atexit.register(release_all)


# ------------------------------------------------------------------------------------ ownership

def _checkpoints(out: Path) -> List[Path]:
    return step_dirs(out / "checkpoints")


def read_records(path: Path) -> List[Dict[str, Any]]:
    """The JSON objects of a JSON-lines file (metrics.jsonl, samples.jsonl); [] when it is missing;
    a line cut short by a crash is skipped."""
    try:
        text = Path(path).read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _last_step(out: Path) -> Optional[int]:
    """The last step logged in ``out/metrics.jsonl`` (None when there is none)."""
    steps = [r["step"] for r in read_records(out / "metrics.jsonl") if isinstance(r.get("step"), int)]
    return steps[-1] if steps else None


def read_marker(out: Path) -> Optional[Dict[str, Any]]:
    """``out``'s :data:`MARKER` (None when there is none or it is not one)."""
    data = _read_lock(Path(out) / MARKER)
    return data if data.get("tool") == "alignkit" and isinstance(data.get("files"), list) else None


def write_marker(out: Path, command: str, files: Optional[List[str]] = None) -> None:
    """Mark ``out`` as an alignkit run directory, listing the files a run writes there (default: the
    :data:`RUN_FILES` not already there; ``[]``: a directory another alignkit tool fills before a run)."""
    if files is None:
        files = [n for n in RUN_FILES if not ((Path(out) / n).exists() or (Path(out) / n).is_symlink())]
    info = {"tool": "alignkit", "version": __version__, "command": command, "created": time.time(),
            "files": list(files)}
    tmp = Path(out) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, Path(out) / MARKER)


def _run_like(out: Path) -> List[str]:
    """The names of :data:`RUN_FILES` present in ``out`` (a directory name with a trailing /)."""
    found = []
    for name in RUN_FILES:
        p = out / name
        if p.exists() or p.is_symlink():
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def clear_run_files(out: Path) -> List[str]:
    """Remove what a run wrote into ``out``: the files its :data:`MARKER` lists (none without a marker);
    returns the names removed."""
    marker = read_marker(out)
    if marker is None:
        return []
    removed = []
    for name in marker["files"]:
        if not isinstance(name, str) or name not in RUN_FILES:  # a tampered marker lists only our names
            continue
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def claim(cfg, warn=print) -> None:
    """Take ``cfg.output`` for this run (main process only): lock it, then check what it holds
    against ``cfg.resume`` and ``cfg.overwrite`` (see the module docstring). The lock is released
    by :func:`release` when the run ends, and at process exit."""
    out = Path(cfg.output)
    acquire(out, getattr(cfg, "command", "run"), warn)
    try:
        _check_contents(cfg, out.resolve(), warn)  # a symlinked output is what it points to
        if not (cfg.resume and read_marker(out) is not None):
            write_marker(out, getattr(cfg, "command", "run"))
    except BaseException:
        release(out)
        raise


def _check_contents(cfg, out: Path, warn) -> None:
    overwrite, resume = bool(getattr(cfg, "overwrite", False)), getattr(cfg, "resume", None)
    found = _run_like(out)
    if found and read_marker(out) is None:
        shown = str(out) if str(out) == str(Path(cfg.output)) else f"{cfg.output} (-> {out})"
        asked = "--overwrite" if overwrite and not resume else ("--resume" if resume else "a new run")
        raise RunDirError(f"output {shown} holds {', '.join(found)} but no {MARKER}: alignkit did not write them, "
                          f"so {asked} will not touch them; choose another --output, or move those files away")
    finished = (out / "summary.json").exists() or (out / "model").is_dir()
    ckpts = _checkpoints(out)
    if overwrite and not resume:
        removed = clear_run_files(out)
        if removed:
            warn(f"{out}: --overwrite: removed the earlier run ({', '.join(removed)})")
        return
    if resume:
        check_resume(cfg, out, warn)
        return
    if finished:
        summary = _read_lock(out / "summary.json")  # any JSON file
        what = f"a finished {summary.get('command', '')} run".replace("  ", " ")
        if "steps" in summary:
            what += f" ({summary['steps']} steps)"
        also = ", --resume to continue it from its last checkpoint" if ckpts else ""
        raise RunDirError(f"output {out} holds {what}: pass --overwrite to replace it{also}, or choose "
                          f"another --output")
    if ckpts:
        raise RunDirError(f"output {out} holds an unfinished run with a checkpoint at step "
                          f"{step_of(ckpts[-1])}: pass --resume to continue it or --overwrite to start afresh")
    step = _last_step(out)
    if step is not None:  # files other tools put there before the run (e.g. a round's pairs) stay
        removed = clear_run_files(out)
        warn(f"{out}: an earlier run stopped at step {step} without a checkpoint; starting afresh "
             f"(removed {', '.join(removed)})")


def step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("-")[-1])


# ------------------------------------------------------------------------------------ resume

def flatten_config(cfg: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"optim.lr": 1e-5, ...}``: dotted keys of a nested config mapping (lists stay values; a
    non-mapping is ``{prefix: value}``). Used by --resume's config check and compare's config diff."""
    if not isinstance(cfg, dict):
        return {prefix: cfg}
    out: Dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = v
    return out


def _may_change(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in MAY_CHANGE_ON_RESUME)


def config_differences(saved: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """``"field: A in the checkpoint, B now"`` for every field that differs and may not change on
    resume. A field only one side has (added or removed by another alignkit version) is skipped."""
    a, b = flatten_config(saved), flatten_config(new)
    diffs = []
    for key in sorted(set(a) & set(b)):
        if _may_change(key):
            continue
        va, vb = a.get(key), b.get(key)
        if va != vb and not (isinstance(va, (int, float)) and isinstance(vb, (int, float)) and float(va) == float(vb)):
            diffs.append(f"{key}: {va!r} in the checkpoint, {vb!r} now")
    return diffs


def saved_config(ckpt: Path) -> Optional[Dict[str, Any]]:
    """The config a checkpoint was written with: stored in trainer_state.json, else the config.yaml of
    the run directory that holds it (checkpoints from before configs were stored)."""
    state = _read_lock(ckpt / "trainer_state.json")
    if isinstance(state.get("config"), dict):
        return state["config"]
    cfg_file = ckpt.parent.parent / "config.yaml"
    if cfg_file.exists():
        import yaml

        try:
            data = yaml.safe_load(cfg_file.read_text())
        except yaml.YAMLError:
            return None
        return data if isinstance(data, dict) else None
    return None


def check_resume(cfg, out: Path, warn=print) -> Path:
    """Refuse to resume from a damaged checkpoint (the newest intact one is taken for ``latest``, with a
    line through ``warn``), from one written with another config, or over changed inputs; returns the
    checkpoint."""
    ckpt = resolve_checkpoint(out / "checkpoints", cfg.resume, warn)
    step = step_of(ckpt) if ckpt.name.startswith("step-") else int(_read_lock(ckpt / "trainer_state.json").get("step", 0))
    max_steps = getattr(getattr(cfg, "train", None), "max_steps", None)
    if max_steps is not None and max_steps < step:
        raise RunDirError(f"--resume: the checkpoint {ckpt} is at step {step}, past train.max_steps={max_steps}; "
                          f"raise train.max_steps, or start afresh with --overwrite")
    saved = saved_config(ckpt)
    if saved is None:
        return ckpt
    diffs = config_differences(saved, cfg.model_dump(mode="json"))
    if diffs:
        raise RunDirError(f"--resume: the checkpoint {ckpt} was written with another config ({'; '.join(diffs)}); "
                          f"resume with the same settings (only log.*, diagnostics.*, a larger train.max_steps "
                          f"and the like may change), or start afresh with --overwrite")
    recorded = _read_lock(ckpt / "trainer_state.json").get("inputs")
    if isinstance(recorded, dict) and recorded:
        changed = input_changes(recorded, input_fingerprints(cfg))
        if changed and not getattr(cfg, "resume_anyway", False):
            more = f" (and {len(changed) - 1} more input(s))" if len(changed) > 1 else ""
            raise RunDirError(f"--resume: {changed[0][0]} changed since the checkpoint {ckpt} was written "
                              f"({changed[0][1]}){more}; resume with the inputs the run read, pass --resume-anyway "
                              f"to continue on the changed input, or start afresh with --overwrite")
        for what, how in changed:
            warn(f"--resume-anyway: {what} changed since the checkpoint {ckpt.name} was written ({how}); "
                 f"continuing on it")
    return ckpt


# ------------------------------------------------------------------------------------ inputs

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def _hub_revision(name: str, repo_type: str, revision: Optional[str]) -> Optional[str]:
    """The commit a Hub name resolves to in the local cache (None when it is not cached)."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        # deferred: huggingface_hub loads only for Hub access
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:  # pragma: no cover
        return revision
    ref = Path(HF_HUB_CACHE) / f"{repo_type}s--{name.replace('/', '--')}" / "refs" / (revision or "main")
    try:
        return ref.read_text().strip() or revision
    except OSError:
        return revision


def fingerprint(value: str, kind: str, revision: Optional[str] = None) -> Dict[str, Any]:
    """What identifies one input: a file's size and SHA-256; a directory's files (a model directory: its
    weights and config.json) by name, size and SHA-256; a Hub name's revision (``kind``: model or
    dataset)."""
    path = Path(value).expanduser()
    if path.is_file():
        return {"file": str(path), "size": path.stat().st_size, "sha256": sha256_file(path)}
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts and ".git" not in p.parts)
        if kind == "model" and any(p.suffix in _WEIGHTS for p in files):
            files = [p for p in files if p.suffix in _WEIGHTS or p.name == "config.json"]
        import hashlib

        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.relative_to(path)}\0{p.stat().st_size}\0{sha256_file(p)}\n".encode())
        return {"dir": str(path), "files": len(files), "size": sum(p.stat().st_size for p in files),
                "sha256": h.hexdigest()}
    if value.startswith("builtin:"):
        return {"builtin": value}
    return {"hub": value, "revision": _hub_revision(value, kind, revision)}


def _inputs_of(cfg) -> Dict[str, tuple]:
    """``{field: (value, kind, revision)}`` of the inputs a run reads: model, reference and critic
    weights, reward models, training and held-out data."""
    dump = cfg.model_dump(mode="json")
    found: Dict[str, tuple] = {}

    def walk(node: Any, key: str) -> None:
        if isinstance(node, dict):
            if node.get("kind") == "model" and isinstance(node.get("arg"), str) and node["arg"]:
                found[key] = (node["arg"], "model", None)  # a reward model
                return
            for k, v in node.items():
                walk(v, f"{key}.{k}" if key else k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{key}[{i}]")
        elif isinstance(node, str) and node:
            leaf = key.rsplit(".", 1)[-1]
            if key == "model.name_or_path":
                return
            if leaf in ("ref_model", "name_or_path"):
                found[key] = (node, "model", None)
            elif key.endswith("value.init") and node not in ("policy", "reward"):
                found[key] = (node, "model", None)
            elif key in ("data.path", "data.eval_path"):
                found[key] = (node, "dataset", None)

    walk(dump, "")
    model = getattr(cfg, "model", None)
    if model is not None:
        name = model.name_or_path
        if name is None or name.strip().lower() in DEFAULT_ALIASES:
            name = str(default_model_dir(convert=False))
        found["model.name_or_path"] = (name, "model", model.revision)
    return found


def input_fingerprints(cfg) -> Dict[str, Dict[str, Any]]:
    """The fingerprint (:func:`fingerprint`) of every input of ``cfg``'s run, by config field."""
    return {key: fingerprint(value, kind, rev) for key, (value, kind, rev) in _inputs_of(cfg).items()}


def _say(fp: Dict[str, Any]) -> str:
    if "sha256" in fp:
        return f"{fp['size']} bytes, sha256 {fp['sha256'][:12]}"
    if "hub" in fp:
        return f"Hub revision {fp.get('revision') or 'unknown'}"
    return json.dumps(fp)


def input_changes(recorded: Dict[str, Any], now: Dict[str, Any]) -> List[tuple]:
    """``("FIELD (WHAT)", "A then, B now")`` for each input whose fingerprint differs (a Hub name whose
    revision is unknown on either side is not compared)."""
    out = []
    for key in sorted(set(recorded) & set(now)):
        a, b = recorded[key], now[key]
        if not isinstance(a, dict) or a == b:
            continue
        if "hub" in a and "hub" in b and a.get("hub") == b.get("hub") and None in (a.get("revision"), b.get("revision")):
            continue
        what = b.get("file") or b.get("dir") or b.get("hub") or b.get("builtin")
        now_said = "no such file or directory now" if ("file" in a or "dir" in a) and "hub" in b else f"{_say(b)} now"
        out.append((f"{key} ({what})", f"{_say(a)} then, {now_said}"))
    return out
