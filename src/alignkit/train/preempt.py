"""Graceful preemption: a stop signal finishes the current optimizer step, writes a checkpoint and exits.

Schedulers warn before they kill: Slurm sends the signal of ``--signal`` (SIGUSR1 with
``--signal=USR1@120``; SIGTERM at the time limit or on ``scancel``), Kubernetes and spot instances send
SIGTERM and wait a grace period, a terminal sends SIGINT. While :meth:`Trainer.fit` runs, the first of
these only sets a flag; the loop finishes the step it is in, writes a checkpoint (every process saves its
part: processes agree on the step through the all-reduce each update already does), prints one line with
the ``--resume`` command and raises :class:`Preempted`, which the CLI turns into exit code
:data:`EXIT_PREEMPTED`. A second signal aborts at once (the default action of that signal; for SIGINT a
``KeyboardInterrupt``); one that
comes within :data:`SAME_SIGNAL_S` of the first counts as the same request, because launchers forward the
signal they receive to workers that already got it from the process group (torchrun, srun).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Dict, Optional

#: exit code of a run stopped by a signal after writing its checkpoint (EX_TEMPFAIL: "try again later")
EXIT_PREEMPTED = 75
STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, n))
SAME_SIGNAL_S = 1.0


class Preempted(Exception):
    """The run stopped on a signal after writing the checkpoint ``checkpoint`` at ``step``."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, signame: str, step: int, checkpoint, output):
        self.signame, self.step, self.checkpoint, self.output = signame, step, checkpoint, output
        super().__init__(f"stopped by {signame} after step {step}; checkpoint {checkpoint} written: resume with "
                         f"resume='latest' (--resume)")


class StopSignals:
    """Context manager: while active, SIGTERM/SIGINT/SIGUSR1 set :attr:`signame` instead of killing the
    process; a later second signal restores the default action and re-sends itself. Installs nothing
    outside the main thread (signal handlers can only be set there)."""

    def __init__(self, announce: bool = True, label: str = ""):
        self.signame: Optional[str] = None
        self.announce, self.label = announce, label
        self._first = 0.0
        self._old: Dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signame is None:
            self.signame, self._first = signal.Signals(signum).name, now
            if self.announce:
                os.write(2, (f"[{self.label}] {self.signame}: finishing this step, then writing a checkpoint "
                             f"(send it again to abort at once)\n").encode())
            return
        if now - self._first < SAME_SIGNAL_S:  # the launcher forwarding what the process group already got
            return
        if signum == signal.SIGINT:  # Ctrl-C twice: Python's own interruption (a notebook's kernel survives)
            self.__exit__(None, None, None)
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # pragma: no cover - not settable here
                    pass
        return self

    def __exit__(self, *exc) -> bool:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError, TypeError):  # pragma: no cover
                pass
        self._old.clear()
        return False


def resume_command(argv) -> str:
    """The command line that resumes a run started with ``argv`` (the CLI's arguments after the program):
    the same arguments without ``--overwrite`` and any ``--resume [VALUE]``, plus ``--resume``."""
    import shlex

    args, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a in ("--overwrite", "--resume-anyway") or a.startswith("--resume="):
            continue
        if a == "--resume":
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            skip = nxt is not None and not nxt.startswith("-") and "=" not in nxt
            continue
        args.append(a)
    return shlex.join(["alignkit", *args, "--resume"])
