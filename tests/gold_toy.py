"""A continuous toy gold reward for tests on tiny random models (whose replies are random characters,
so a sentiment lexicon scores them all 0.0 and every pair would tie)."""

from pathlib import Path

SPEC = f"python:{Path(__file__).resolve()}:mean_code"


def mean_code(prompts, completions, **_):
    """Mean character code / 127 of each completion (0.0 for an empty one): "AB" -> (65 + 66) / 254."""
    return [sum(ord(c) for c in t) / (127.0 * len(t)) if t else 0.0 for t in completions]
