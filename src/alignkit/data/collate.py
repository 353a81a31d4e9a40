"""Per-task collation: dataset items into the batches the losses read (``SeqBatch`` for SFT,
``PairBatch`` for paired preference losses, ``UnpairedBatch`` for KTO), padded, packed or prefix-shared
as the run's :class:`~alignkit.data.layout.Packing` says (the layouts themselves: ``data/layout.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, List, Optional

import torch

from alignkit.data.layout import PADDED, Packing, SeqBatch, layout_pairs, layout_sequences, prompt_response


def collate_sft(items: List[Dict[str, Any]], pad_id: int, packing: Packing = PADDED) -> SeqBatch:
    return layout_sequences([x["input_ids"] for x in items], [x["loss_mask"] for x in items], pad_id, packing)


@dataclass
class PairBatch:
    """Chosen sequences first (0..B-1), rejected after (B..2B-1): one forward pass for both."""

    seq: SeqBatch
    soft_label: torch.Tensor  # (B,) P(chosen preferred)
    margin: Optional[torch.Tensor] = None  # (B,)
    ref_chosen_logps: Optional[torch.Tensor] = None  # (B,) precomputed reference log-probs
    ref_rejected_logps: Optional[torch.Tensor] = None

    def to(self, device) -> "PairBatch":
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to(device) if v is not None else None
        return PairBatch(**out)

    @property
    def num_pairs(self) -> int:
        return self.soft_label.shape[0]

    def __len__(self) -> int:
        return self.num_pairs


def collate_pairs(items: List[Dict[str, Any]], pad_id: int, packing: Packing = PADDED) -> PairBatch:
    seq = layout_pairs([x["prompt_ids"] for x in items], [x["chosen_ids"] for x in items],
                       [x["rejected_ids"] for x in items], pad_id, packing)
    margin = torch.tensor([x["margin"] for x in items], dtype=torch.float32) if "margin" in items[0] else None
    ref = {}
    if "ref_chosen_logps" in items[0]:
        ref = {k: torch.tensor([x[k] for x in items], dtype=torch.float32)
               for k in ("ref_chosen_logps", "ref_rejected_logps")}
    return PairBatch(seq, torch.tensor([x.get("soft_label", 1.0) for x in items], dtype=torch.float32), margin,
                     **ref)


@dataclass
class UnpairedBatch:
    """KTO batch: the examples plus mismatched (prompt, other completion) pairs for the KL estimate.

    The partner completion is the item's ``kl_completion_ids`` when set (fixed per item), else the
    next item's in the batch."""

    seq: SeqBatch
    kl_seq: SeqBatch
    label: torch.Tensor  # (B,) bool, True = desirable
    ref_logps: Optional[torch.Tensor] = None
    ref_kl_logps: Optional[torch.Tensor] = None

    def to(self, device) -> "UnpairedBatch":
        return UnpairedBatch(**{f.name: (getattr(self, f.name).to(device) if getattr(self, f.name) is not None
                                         else None) for f in fields(self)})

    def __len__(self) -> int:
        return self.label.shape[0]


def collate_unpaired(items: List[Dict[str, Any]], pad_id: int, packing: Packing = PADDED) -> UnpairedBatch:
    n = len(items)
    main = [prompt_response(x["prompt_ids"], x["completion_ids"]) for x in items]
    # shift completions by one so no example is paired with its own completion
    mism = [prompt_response(items[i]["prompt_ids"],
                             items[i].get("kl_completion_ids", items[(i + 1) % n]["completion_ids"]))
            for i in range(n)]
    ref = {}
    if "ref_logps" in items[0]:
        ref = {k: torch.tensor([x[k] for x in items], dtype=torch.float32) for k in ("ref_logps", "ref_kl_logps")}
    return UnpairedBatch(layout_sequences(*zip(*main), pad_id, packing), layout_sequences(*zip(*mism), pad_id, packing),
                         torch.tensor([bool(x["label"]) for x in items]), **ref)
