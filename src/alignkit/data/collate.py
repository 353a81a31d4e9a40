"""Padded batches as small dataclasses. Right padding; masks come from lengths, not from pad ids."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Sequence

import torch


@dataclass
class SeqBatch:
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    loss_mask: torch.Tensor  # (B, T) 1 on tokens that are labels (response tokens, EOS included)

    def to(self, device) -> "SeqBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def num_label_tokens(self) -> int:
        return int(self.loss_mask[:, 1:].sum())

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def pad_sequences(seqs: Sequence[List[int]], masks: Sequence[List[int]], pad_id: int,
                  pad_to_multiple_of: int = 1) -> SeqBatch:
    T = max(len(s) for s in seqs)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    loss = torch.zeros((B, T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        loss[i, : len(m)] = torch.tensor(m, dtype=torch.long)
    return SeqBatch(ids, attn, loss)


def collate_sft(items: List[Dict[str, Any]], pad_id: int) -> SeqBatch:
    return pad_sequences([x["input_ids"] for x in items], [x["loss_mask"] for x in items], pad_id)


@dataclass
class PairBatch:
    """Chosen sequences in rows [0, B), rejected in rows [B, 2B): one forward pass for both."""

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


def _prompt_response(p: List[int], r: List[int]):
    return p + r, [0] * len(p) + [1] * len(r)


def collate_pairs(items: List[Dict[str, Any]], pad_id: int) -> PairBatch:
    seqs, masks = [], []
    for key in ("chosen_ids", "rejected_ids"):
        for x in items:
            s, m = _prompt_response(x["prompt_ids"], x[key])
            seqs.append(s)
            masks.append(m)
    margin = torch.tensor([x["margin"] for x in items], dtype=torch.float32) if "margin" in items[0] else None
    ref = {}
    if "ref_chosen_logps" in items[0]:
        ref = {k: torch.tensor([x[k] for x in items], dtype=torch.float32)
               for k in ("ref_chosen_logps", "ref_rejected_logps")}
    return PairBatch(pad_sequences(seqs, masks, pad_id),
                     torch.tensor([x.get("soft_label", 1.0) for x in items], dtype=torch.float32), margin, **ref)


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


def collate_unpaired(items: List[Dict[str, Any]], pad_id: int) -> UnpairedBatch:
    n = len(items)
    main = [_prompt_response(x["prompt_ids"], x["completion_ids"]) for x in items]
    # shift completions by one so no example is paired with its own completion
    mism = [_prompt_response(items[i]["prompt_ids"],
                             items[i].get("kl_completion_ids", items[(i + 1) % n]["completion_ids"]))
            for i in range(n)]
    ref = {}
    if "ref_logps" in items[0]:
        ref = {k: torch.tensor([x[k] for x in items], dtype=torch.float32) for k in ("ref_logps", "ref_kl_logps")}
    return UnpairedBatch(pad_sequences(*zip(*main), pad_id), pad_sequences(*zip(*mism), pad_id),
                         torch.tensor([bool(x["label"]) for x in items]), **ref)
