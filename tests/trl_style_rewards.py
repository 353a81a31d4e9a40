"""Reward functions written the way TRL's documentation writes them: keyword arguments, ``**kwargs`` for the
rest, ``None`` where a function does not apply, conversational completions read as
``completion[0]["content"]``. tests/test_trl_compat.py runs them unchanged; they record what they were
given so the tests can check it."""

import re
import time

SEEN = {"steps": [], "ids": []}


def reward_len(completions, **kwargs):
    """Length: prefer completions of 4 characters."""
    return [-abs(4 - len(completion)) for completion in completions]


def format_reward(completions, **kwargs):
    """Format: the whole completion is a number."""
    pattern = r"^[0-9]+$"
    return [1.0 if re.match(pattern, completion) else 0.0 for completion in completions]


def accuracy_reward(prompts, completions, completion_ids, answer, **kwargs):
    """Accuracy against the `answer` column; None (does not apply) for rows without an answer."""
    SEEN["ids"].extend(zip(completion_ids, completions))
    return [None if ans is None else float(ans in completion) for completion, ans in zip(completions, answer)]


def ids_length(completion_ids, trainer_state, **kwargs):
    """Tokens sampled per completion; records the step TRL's trainer_state says it is at."""
    SEEN["steps"].append(trainer_state.global_step)
    return [float(len(ids)) for ids in completion_ids]


def conversational_digits(completions, **kwargs):
    """Conversational format: share of digits in the assistant message."""
    contents = [completion[0]["content"] for completion in completions]
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in contents]


def positional_pair(p, c, **fields):
    """alignkit's older positional style: prompts and completions under other names."""
    return [float(len(text) * k) for text, k in zip(c, fields["k"])]


def hangs(completions, **kwargs):
    time.sleep(600)
    return [0.0] * len(completions)


def spins(prompts, completions, **kwargs):
    while True:
        pass


def ignores_signals(completions, **kwargs):
    """Waits where no signal reaches it (as C code that blocks signals or retries on EINTR would)."""
    import signal

    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})
    try:
        time.sleep(600)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})
    return [0.0] * len(completions)


def raises(prompts, completions, **kwargs):
    return [1 / 0 for _ in completions]


def needs_a_column(prompts, completions, solution, **kwargs):
    return [0.0] * len(completions)


def fits_neither(x):
    return [0.0]
