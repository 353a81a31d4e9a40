"""One line for a refusal by a safety layer: a chat template stopped by Jinja's sandbox, a pickle that
``torch.load(weights_only=True)`` would not unpickle, or model weights offered only as a pickle. The refusal is the system working as meant, so the
CLI says what was refused and why (one ``Error:`` line) instead of showing the library's traceback."""

from __future__ import annotations

import re
from pickle import UnpicklingError
from typing import Iterator, Optional


def _chain(e: BaseException) -> Iterator[BaseException]:
    """``e`` and the exceptions it was raised from or while handling (a wrapper keeps the cause)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _unpickled_file(e: BaseException) -> Optional[str]:
    """The file ``torch.load`` was reading when it refused (its ``f`` argument), if the traceback has it."""
    tb = e.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "load" and frame.f_globals.get("__name__") == "torch.serialization":
            f = frame.f_locals.get("f")
            found = str(f) if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__") else getattr(f, "name", None)
        tb = tb.tb_next
    return found


def _why_unpickling(msg: str) -> str:
    """torch's reason (the forbidden global) without its advice to turn weights_only off."""
    for line in msg.splitlines():
        if re.search(r"GLOBAL|Unsupported|unsupported", line):
            return line.strip().rstrip(".")
    first = msg.strip().splitlines()[0] if msg.strip() else "not a plain tensor file"
    return first.strip().rstrip(".")


def refusal_line(e: BaseException) -> Optional[str]:
    """The one-line message for a sandbox or unpickling refusal anywhere in ``e``'s chain, else None."""
    try:
        from jinja2.exceptions import SecurityError
    except ImportError:  # pragma: no cover  (jinja2 comes with transformers)
        SecurityError = None  # type: ignore[assignment]
    for err in _chain(e):
        if SecurityError is not None and isinstance(err, SecurityError):
            return (f"the chat template was stopped by the sandbox: {err} (a chat template may only format "
                    "the messages; one that reaches into Python objects is refused: use a plain template, "
                    "e.g. model.chat_template=chatml)")
        if isinstance(err, UnpicklingError):
            where = _unpickled_file(err)
            return (f"refused to unpickle {where or 'a pickled file'}: {_why_unpickling(str(err))}; such a "
                    "file could run code when loaded, so alignkit loads pickles with weights_only=True only "
                    "(use a file you trust, saved as safetensors)")
        if isinstance(err, OSError) and "model.safetensors" in str(err) and "no file named" in str(err):
            return (f"{' '.join(str(err).split())}: alignkit loads model weights from safetensors only (a pickled "
                    "pytorch_model.bin can run code when loaded); convert it once where you trust it "
                    "(from_pretrained, then save_pretrained(DIR, safe_serialization=True))")
    return None
