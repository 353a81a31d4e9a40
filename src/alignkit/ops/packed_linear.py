"""Linear layers with their bf16 weight pre-packed for oneDNN, for decoding on a CPU.

A plain bf16 ``F.linear`` on a CPU re-packs its weight into oneDNN's blocked layout on every call. At a
decode step's few rows that costs more than the product itself (SmolLM2-135M, 16 rows, 576 x 1536:
219 us against 110 us pre-packed; the outputs are identical bit for bit). The rollout engine's bf16
decode copy (:meth:`alignkit.rollout.engine.FastEngine.decode_model`) therefore holds its linear layers
as :class:`PackedLinear` s, packed from the policy's weights at each refill. Training never uses them: at
training's hundreds of rows the re-pack is a small share of the product.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Sequence

import torch

from alignkit.hardware import isa_allows


class PackedLinear(torch.nn.Module):
    """A decode copy's linear layer whose bf16 weight lives only in oneDNN's blocked layout (CPU).

    ``torch.ops.mkldnn._reorder_linear_weight`` packs the weight (``rows``: the expected number of input
    rows, a blocking hint) and ``_linear_pointwise`` multiplies with it; a plain bf16 linear call packs
    its weight again every time. Same output bit for bit as ``F.linear`` with the bf16 weight (checked
    by :func:`packing_works`). :meth:`pack` takes a new weight in any float dtype (cast to bf16 here), so
    the copy never holds a plain bf16 weight next to the packed one."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: int):
        super().__init__()
        self.rows, self.bias = rows, bias
        self.pack(weight)

    def pack(self, weight: torch.Tensor) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16).contiguous(),
                                                              self.rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def packing_works() -> bool:
    """Whether the decode copy's linear layers are packed here: oneDNN packs a bf16 weight and the packed
    product gives ``F.linear``'s numbers bit for bit (tried once per process), and the settings do not
    make this process answer as a CPU without AVX512 (``ALIGNKIT_CPU_ISA=avx2`` forces the fallback,
    plain bf16 ``F.linear``; :mod:`alignkit.hardware`). oneDNN refuses the op where it has no bf16
    kernels (an AVX2-only CPU: "bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl
    and avx512dq"), so no flag is trusted: the op itself is tried."""
    return isa_allows("avx512") and _packing_probe()


@functools.lru_cache(maxsize=None)
def _packing_probe() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    g = torch.Generator().manual_seed(0)
    w, b = (torch.randn(40, 24, generator=g).to(torch.bfloat16), torch.randn(40, generator=g).to(torch.bfloat16))
    x = torch.randn(3, 2, 24, generator=g).to(torch.bfloat16)
    try:
        return torch.equal(PackedLinear(w, b, 4)(x), torch.nn.functional.linear(x, w, b))
    except (RuntimeError, AttributeError):  # no bf16 kernels in oneDNN here, or a build without these ops
        return False


def packable_linears(model: torch.nn.Module) -> List[str]:
    """Paths of the CPU ``nn.Linear`` layers of ``model`` a bf16 decode copy packs: every one but LoRA
    adapters' own layers (off during a rollout)."""
    return [path for path, m in model.named_modules() if type(m) is torch.nn.Linear and ".lora_" not in f".{path}"
            and m.weight.device.type == "cpu"]


def pack_linears(copy: torch.nn.Module, rows: int, source: Optional[torch.nn.Module] = None,
                 paths: Optional[Sequence[str]] = None) -> int:
    """Swap linear layers of ``copy`` (a decode copy: never the user's model) at ``paths`` (default
    :func:`packable_linears` of the bf16 ones) for :class:`PackedLinear` s packed from ``source``'s
    weights at the same paths (default: the copy's own). Returns the number swapped (0 where
    :func:`packing_works` says no)."""
    if paths is None:
        paths = [p for p in packable_linears(copy) if copy.get_submodule(p).weight.dtype == torch.bfloat16]
    if not paths or not packing_works():
        return 0
    for path in paths:
        parent, _, name = path.rpartition(".")
        old = copy.get_submodule(path)
        weight = (source if source is not None else copy).get_submodule(path).weight
        setattr(copy.get_submodule(parent) if parent else copy, name, PackedLinear(weight, old.bias, rows))
    return len(paths)
