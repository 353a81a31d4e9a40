"""Rewards with a deadline: user code (``python:``/``trl:`` reward functions, judges) runs under a timeout.

A reward function that hangs (a network call that never answers, an endless loop, a lock) would hang
the run forever with no output. :func:`call_with_deadline` runs it in the calling thread, so the
function keeps the main thread (libraries such as math_verify install their own ``SIGALRM`` timers,
which only work there), and a watchdog thread waits for the deadline:

1. At the deadline the watchdog sends ``SIGUSR2`` to the main thread (``signal.pthread_kill``). The
   handler installed for the call raises :class:`RewardTimeout` there: a Python loop stops at its next
   bytecode, a ``time.sleep`` or a blocking socket read is interrupted (EINTR) and raises. The caller
   turns it into one ``Error:`` line, and the run's lock is released on the way out.
2. Code that does not let the interruption through (C code that blocks the signal, or waits and retries
   on EINTR with the GIL released) keeps hanging. After a further grace period (:data:`GRACE_S`) the
   watchdog prints the ``Error:`` line itself, releases every run lock this process holds and ends the
   process with exit code 1 (``os._exit``).

   What no thread of the process can stop: a C loop that holds the GIL and never returns to the
   interpreter (``sum(range(10**15))``); the watchdog cannot run until it does. Only an outside
   timeout (the scheduler's) ends such a run.

Outside the main thread, or where ``pthread_kill`` does not exist (Windows), the function runs in a
daemon worker thread instead and the caller stops waiting at the deadline (the worker cannot be
stopped; it is abandoned and ends with the process).

The watchdog's signal is ignored unless its own deadline has passed, and the previous ``SIGUSR2``
handler is restored after every call.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

from alignkit.rewards.base import RewardError
from alignkit.train.rundir import release_all

#: seconds the watchdog waits after interrupting before it ends a process stuck outside Python
GRACE_S = 10.0
#: the default of ``rewards.timeout_s`` (``reward_timeout_s``): generous for a batch of rule checks or a
#: small local judge, short enough that a hang is noticed
DEFAULT_TIMEOUT_S = 120.0
_SIGNAL = getattr(signal, "SIGUSR2", None)


class RewardTimeout(RewardError):
    """A reward function did not return within its deadline."""


class _Deadline(BaseException):
    """Raised inside the reward function by the watchdog's signal: a BaseException, so the function's own
    ``except Exception`` cannot swallow it."""


def call_with_deadline(fn: Callable[[], Any], timeout_s: Optional[float], message: Callable[[], str]) -> Any:
    """``fn()``, or :class:`RewardTimeout` with ``message()`` when it runs longer than ``timeout_s``
    seconds (None or <= 0: no deadline)."""
    if not timeout_s or timeout_s <= 0:
        return fn()
    if (threading.current_thread() is threading.main_thread() and _SIGNAL is not None
            and hasattr(signal, "pthread_kill")):
        return _in_main_thread(fn, float(timeout_s), message)
    return _in_worker(fn, float(timeout_s), message)


def _in_main_thread(fn, timeout_s: float, message):
    done = threading.Event()
    expired = threading.Event()
    main_id = threading.main_thread().ident

    def on_signal(signum, frame):
        if expired.is_set() and not done.is_set():
            raise _Deadline()
        if callable(previous):  # not ours: whoever handled SIGUSR2 before still does
            previous(signum, frame)

    def watchdog():
        if done.wait(timeout_s):
            return
        expired.set()
        try:
            signal.pthread_kill(main_id, _SIGNAL)
        except (OSError, ValueError):  # pragma: no cover - the main thread is gone
            return
        if done.wait(GRACE_S):
            return
        _hard_stop(message() + f" It did not stop within {GRACE_S:g} s of being interrupted (stuck outside "
                               "Python), so the process ends here.")

    previous = signal.signal(_SIGNAL, on_signal)
    dog = threading.Thread(target=watchdog, name="alignkit-reward-deadline", daemon=True)
    dog.start()
    late = False
    try:
        try:
            value = fn()
        finally:
            done.set()  # from here on the handler ignores the signal
        late = expired.is_set()  # it swallowed the interruption and returned late: still a timeout
    except _Deadline:
        late = True
    finally:
        signal.signal(_SIGNAL, previous if previous is not None else signal.SIG_DFL)
    if late:
        raise RewardTimeout(message())
    return value


def _in_worker(fn, timeout_s: float, message):
    box: dict = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    worker = threading.Thread(target=run, name="alignkit-reward", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise RewardTimeout(message())
    if "error" in box:
        raise box["error"]
    return box["value"]


def _hard_stop(text: str) -> None:  # pragma: no cover - exercised in a subprocess test
    """The last resort for code that cannot be interrupted: one line, every lock released, exit 1."""
    try:
        release_all()
    finally:
        sys.stderr.write(f"Error: {text}\n")
        sys.stderr.flush()
        os._exit(1)
