"""Small learnable datasets shared by the tests."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch


def write_jsonl(path, rows) -> Path:
    """Write ``rows`` as JSON Lines to ``path``; returns the path."""
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pref_rows(n, seed):
    """Preference pairs a tiny model learns in seconds: vowels are preferred over consonants."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "say:" + "".join(rng.choice("mnop") for _ in range(rng.randint(1, 4)))
        good = "".join(rng.choice("aeiou") for _ in range(rng.randint(2, 8)))
        bad = "".join(rng.choice("xyzqw") for _ in range(rng.randint(2, 8)))
        out.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return out


def sft_rows(n=48, seed=0):
    """SFT rows with a learnable pattern: "n=k:" -> " " + "xy" * k."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        k = rng.randint(1, 6)
        rows.append({"prompt": f"n={k}:", "completion": " " + "xy" * k})
    return rows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: a second thread costs more than it saves, and on a busy machine spinning threads
    slow these tests down tenfold."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def ranking_rows(n, seed, k=4):
    """Rankings ``{prompt, responses: [best, ..., worst]}``: more vowels rank higher (6 letters each)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = "say:" + "".join(rng.choice("mnop") for _ in range(rng.randint(1, 4)))
        vowels = sorted(rng.sample(range(7), k), reverse=True)
        resp = []
        for v in vowels:
            letters = [rng.choice("aeiou") for _ in range(v)] + [rng.choice("xyzqw") for _ in range(6 - v)]
            rng.shuffle(letters)
            resp.append("".join(letters))
        out.append({"prompt": prompt, "responses": resp})
    return out


def chromium_path() -> str:
    """The system Chromium that Playwright drives (its own browser download cannot work here)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("no Chromium found: `apt-get install -y chromium chromium-driver` (scripts/test.sh does it)")


def free_port() -> int:
    """A TCP port nobody listens on now, for torch.distributed launches (a fixed port collides with
    other test runs on the same machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Crash(Exception):
    """A simulated interruption (see :func:`crash_after_save`)."""


def crash_after_save(monkeypatch, step: int):
    """Make ``Trainer._save`` raise :class:`Crash` right after it wrote the checkpoint of ``step``.
    Returns a function that restores the real ``_save`` (for the resumed run)."""
    from alignkit.train.loop import Trainer

    orig = Trainer._save

    def save_then_crash(self):
        orig(self)
        if self.step == step:
            raise Crash("simulated interruption")

    monkeypatch.setattr(Trainer, "_save", save_then_crash)
    return lambda: monkeypatch.setattr(Trainer, "_save", orig)
