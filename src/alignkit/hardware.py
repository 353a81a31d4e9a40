"""What this CPU lets the hardware-specific paths do: one answer per process, from probes, and the
settings that force the fallbacks.

The paths that depend on the instruction set are bf16 autocast on a CPU (``models.loading.native_bf16``:
``train.precision=auto``, ``model.dtype=auto``, ``generation.dtype=auto``) and oneDNN's packed bf16
linear layers of the rollout engine's decode copy (``ops.packed_linear.packing_works``). Each asks
:func:`cpu_isa` (or :func:`isa_allows`) and then tries its own operation once: a flag alone does not
settle it, because a process can be limited below what the chip reports.

:func:`cpu_isa` is the lowest of

- what the chip reports (torch's cpuinfo: AMX tiles, AVX512-BF16, AVX512, AVX2);
- what ATen dispatches to (``torch.backends.cpu.get_cpu_capability()``, which honours
  ``ATEN_CPU_CAPABILITY``);
- what oneDNN may use (``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``, read here because torch's cpuinfo
  ignores them: with ``ONEDNN_MAX_CPU_ISA=AVX2`` on a Zen 4 it still says ``avx512_bf16``), and for the
  bf16 levels whether oneDNN really packs a bf16 weight (:func:`onednn_bf16`, the op the decode copy
  uses; it fails with "bf16 path needs the cpu support ..." where oneDNN has no bf16 kernels);
- ``ALIGNKIT_CPU_ISA`` (``auto``, or one of :data:`LEVELS`): our own cap, so a test or a user can make
  every probe answer as on a smaller CPU without restarting torch under other variables.

``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` (what CI's second pass sets, scripts/test.sh) makes
the probes answer as on an AVX2-only CPU: ``cpu_isa() == "avx2"``, ``native_bf16("cpu")`` False, no
packed linears. Not x86 (aarch64: Apple silicon, Graviton): :func:`cpu_isa` is ``"other"``, bf16 autocast
is not chosen automatically, and the packed linears are used where oneDNN's op itself works there and
gives ``F.linear``'s numbers (its probe); nothing here assumes x86.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional

import torch

ISA_ENV = "ALIGNKIT_CPU_ISA"
LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")
"""x86-64 CPU classes, each able to do what the one before it does: no AVX2; AVX2 (most laptops, many
cloud CPUs); AVX512 without bf16 (Skylake-SP to Ice Lake); AVX512-BF16 (Cooper Lake, Zen 4); AMX tiles
(Sapphire Rapids and later)."""

_X86 = {"x86_64", "amd64", "i386", "i686", "x86"}

# oneDNN's ISA names (ONEDNN_MAX_CPU_ISA) -> the class it leaves at most; unknown names cap nothing
_ONEDNN_CAP = {
    "sse41": "generic", "avx": "generic", "avx2": "avx2", "avx2_vnni": "avx2", "avx2_vnni_2": "avx2",
    "avx512_core": "avx512", "avx512_core_vnni": "avx512", "avx512_core_bf16": "avx512_bf16",
    "avx512_core_fp16": "avx512_bf16", "avx10_1_512": "avx512_bf16",
}
# ATen's dispatch level (get_cpu_capability) -> the class it leaves at most (AVX512 caps nothing)
_ATEN_CAP = {"default": "generic", "avx2": "avx2"}


def is_x86() -> bool:
    return platform.machine().lower() in _X86


def _rank(level: str) -> int:
    return LEVELS.index(level)


def _setting() -> Optional[str]:
    """``ALIGNKIT_CPU_ISA`` as a level, or None for ``auto`` / unset; a bad value is an error naming it."""
    value = os.environ.get(ISA_ENV, "auto").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in LEVELS:
        raise ValueError(f"{ISA_ENV}={value!r}: expected auto or one of {', '.join(LEVELS)}")
    return value


def isa_cap() -> Optional[str]:
    """The lowest class that the settings of this process allow (``ALIGNKIT_CPU_ISA``,
    ``ONEDNN_MAX_CPU_ISA`` / ``DNNL_MAX_CPU_ISA``, ATen's dispatch level on x86), or None when nothing
    caps the chip."""
    caps = []
    own = _setting()
    if own:
        caps.append(own)
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        cap = _ONEDNN_CAP.get(os.environ.get(var, "").strip().lower())
        if cap:
            caps.append(cap)
    if is_x86():
        cap = _ATEN_CAP.get(str(torch.backends.cpu.get_cpu_capability()).strip().lower())
        if cap:
            caps.append(cap)
    return min(caps, key=_rank) if caps else None


def isa_allows(level: str) -> bool:
    """Whether the settings (:func:`isa_cap`) leave ``level`` or above usable; the hardware is not asked."""
    cap = isa_cap()
    return cap is None or _rank(cap) >= _rank(level)


def _has(flag: str) -> bool:
    check = getattr(getattr(torch, "cpu", None), flag, None)
    return bool(check()) if check is not None else False


def chip_isa() -> str:
    """The class the chip reports (torch's cpuinfo), settings not applied; ``"other"`` off x86."""
    if not is_x86():
        return "other"
    for level, flag in (("amx", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"),
                        ("avx512", "_is_avx512_supported"), ("avx2", "_is_avx2_supported")):
        if _has(flag):
            return level
    return "generic"


@functools.lru_cache(maxsize=None)
def onednn_bf16() -> bool:
    """Whether oneDNN packs a bf16 linear weight in this process (the op the decode copy's
    :class:`~alignkit.ops.packed_linear.PackedLinear` uses). It refuses where oneDNN has no bf16 kernels
    (an AVX2 CPU, or ``ONEDNN_MAX_CPU_ISA`` below AVX512); a torch build without the op says no too.
    Tried once per process."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.ones(8, 8, dtype=torch.bfloat16)
        torch.ops.mkldnn._reorder_linear_weight(w, 1)
        return True
    except (RuntimeError, AttributeError):
        return False


def cpu_isa() -> str:
    """The CPU class the hardware-specific paths may use here: the lowest of what the chip reports
    (:func:`chip_isa`), what the settings allow (:func:`isa_cap`) and, for the bf16 classes, whether oneDNN
    really has bf16 (:func:`onednn_bf16`). One of :data:`LEVELS`, or ``"other"`` off x86."""
    level = chip_isa()
    if level == "other":
        return level
    cap = isa_cap()
    if cap is not None and _rank(cap) < _rank(level):
        level = cap
    if _rank(level) >= _rank("avx512_bf16") and not onednn_bf16():
        level = "avx512"
    return level


def lean_decode_allowed() -> bool:
    """``ALIGNKIT_LEAN_DECODE=off`` makes the rollout engine decode with the model's own forward even where
    :class:`~alignkit.rollout.lean.LeanStep` passes its probe (to test the fallback, or to rule the lean
    steps out when chasing a difference)."""
    value = os.environ.get("ALIGNKIT_LEAN_DECODE", "on").strip().lower()
    if value not in ("on", "off", "1", "0", "true", "false"):
        raise ValueError(f"ALIGNKIT_LEAN_DECODE={value!r}: expected on or off")
    return value in ("on", "1", "true")


def describe() -> dict:
    """For ``alignkit env``: the chip's class, the cap from settings and the class the paths use."""
    return {"machine": platform.machine(), "chip": chip_isa(), "cap": isa_cap(), "cpu_isa": cpu_isa(),
            "onednn_bf16": onednn_bf16()}
