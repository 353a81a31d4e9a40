"""Process-level settings of the host that make training and rollouts faster.

Only one lives here: :func:`keep_host_memory`. glibc's ``malloc`` serves every block above its mmap
threshold (128 KiB, rising to at most 32 MiB) with a fresh ``mmap`` and gives it back with ``munmap``
when freed, and it trims the top of the heap back to the OS as soon as 128 KiB (or twice the threshold)
lies free there. A training step allocates and frees the same large tensors every time (logits chunks,
the LM head's bf16 cast, gradient buffers, activations), so each step touches brand-new pages: one page
fault per 4 KiB, expensive on a virtual machine. Measured on the 2-core development VM (torch 2.13):
filling a fresh 113 MB tensor took 25.7 ms against 6.7 ms for a reused one, and a SmolLM2-135M DPO step
fell from 2.28 s to 1.77 s once freed memory stayed with the process (bench/README.md).

Not a module-level setting that a second run would inherit by accident: the allocator is the process's,
like ``torch.set_num_threads``; calling this again is a no-op, and ``ALIGNKIT_HOST_ALLOC=system`` before the
process starts keeps glibc's defaults (the process then gives freed memory back to the OS sooner, at the
speed cost above).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Optional

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""Free memory at the top of the heap kept before trimming: the largest value mallopt's int takes (2 GiB).
The peak stays resident for the process's life; memory beyond 2 GiB free at the top is still returned."""

_applied: Optional[bool] = None


def keep_host_memory() -> bool:
    """Make glibc keep freed memory in the process: no ``mmap`` for large blocks (``M_MMAP_MAX`` 0, so they
    come from the heap and are reused) and trimming only past 2 GiB free (``M_TRIM_THRESHOLD``).

    Returns whether the setting is in force: False on a non-glibc platform (macOS, musl, Windows: their
    allocators differ and are left alone) or with ``ALIGNKIT_HOST_ALLOC=system``. Safe to call many times.
    Large blocks requested by threads other than the main one still fall back to ``mmap`` when their
    arena cannot grow (glibc does that itself), so nothing fails for lack of mmap."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("ALIGNKIT_HOST_ALLOC", "keep").strip().lower() == "system":
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # pragma: no cover - glibc without the usual soname
        return False
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
