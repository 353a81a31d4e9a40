"""Reference log-probs for preference training, three ways that give the same numbers.

- ``model``: a separate frozen model (default: the starting policy, or ``dpo.ref_model``).
- ``adapter``: with LoRA, the policy's own weights with the adapter switched off (no second copy).
- ``precomputed``: one pass over the data before training; nothing extra in memory afterwards. With
  LoRA (and no ``dpo.ref_model``) the pass uses the policy with its adapter off, so no second copy is
  ever loaded; otherwise a frozen copy is loaded for the pass and freed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from alignkit.api import current, reference_model, uses_adapter_reference
from alignkit.data.collate import PairBatch, UnpairedBatch, collate_pairs, collate_unpaired
from alignkit.data.layout import PADDED, Packing, SeqBatch
from alignkit.models.loading import is_peft, precast_frozen_linears
from alignkit.ops.logprobs import DEFAULT_CHUNK, token_logprobs
from alignkit.ops.packing import resolve_packing
from alignkit.ops.wrappers import unwrap
from alignkit.train.logging import phase


class Reference:
    mode = "base"
    #: the batch layout this reference can score exactly, when narrower than the policy's (a separate
    #: reference model of another architecture); None: whatever the policy uses
    packing: Optional[Packing] = None

    def __init__(self, logprob_chunk: int = DEFAULT_CHUNK):
        self.logprob_chunk = logprob_chunk  # train.logprob_chunk of the run

    def seq_logps(self, policy, seq: SeqBatch) -> torch.Tensor:
        raise NotImplementedError

    def pair_logps(self, policy, batch: PairBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        B = batch.num_pairs
        lp = self.seq_logps(policy, batch.seq)
        return lp[:B], lp[B:]

    def unpaired_logps(self, policy, batch: UnpairedBatch) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.seq_logps(policy, batch.seq), self.seq_logps(policy, batch.kl_seq)


class ModelReference(Reference):
    mode = "model"

    def __init__(self, model, logprob_chunk: int = DEFAULT_CHUNK):
        super().__init__(logprob_chunk)
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def seq_logps(self, policy, seq: SeqBatch) -> torch.Tensor:
        return token_logprobs(self.model, seq, chunk_size=self.logprob_chunk).sum()


class AdapterReference(Reference):
    mode = "adapter"

    @torch.no_grad()
    def seq_logps(self, policy, seq: SeqBatch) -> torch.Tensor:
        peft_model = unwrap(policy)
        with peft_model.disable_adapter():
            return token_logprobs(peft_model, seq, chunk_size=self.logprob_chunk).sum()


class PrecomputedReference(Reference):
    mode = "precomputed"

    def pair_logps(self, policy, batch: PairBatch):
        if batch.ref_chosen_logps is None:
            raise RuntimeError("precomputed reference: batch has no reference log-probs")
        return batch.ref_chosen_logps, batch.ref_rejected_logps

    def unpaired_logps(self, policy, batch: UnpairedBatch):
        if batch.ref_logps is None:
            raise RuntimeError("precomputed reference: batch has no reference log-probs")
        return batch.ref_logps, batch.ref_kl_logps


@torch.no_grad()
def precompute(ref: Reference, items: List[Dict[str, Any]], pad_id: int, paired: bool, device,
               batch_size: int = 8, policy=None, packing: Packing = PADDED) -> None:
    """Store reference log-probs in each item (``ref_chosen_logps``/``ref_rejected_logps`` or
    ``ref_logps``/``ref_kl_logps``), computed by ``ref`` in one pass (``policy``: for an adapter reference;
    ``packing``: the batch layout, so the reference pass is packed and shares prompts like training)."""
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        if paired:
            b = collate_pairs(chunk, pad_id, packing).to(device)
            rc, rr = ref.pair_logps(policy, b)
            for it, c, r in zip(chunk, rc.tolist(), rr.tolist()):
                it["ref_chosen_logps"], it["ref_rejected_logps"] = c, r
        else:
            b = collate_unpaired(chunk, pad_id, packing).to(device)
            lp, kl = ref.unpaired_logps(policy, b)
            for it, a, k in zip(chunk, lp.tolist(), kl.tolist()):
                it["ref_logps"], it["ref_kl_logps"] = a, k


def make_reference(cfg, policy, data, tokenizer, accelerator, packing: Packing = PADDED) -> Reference:
    """Build the reference that ``cfg.dpo.reference`` asks for (see the module docstring); ``packing``
    is the policy's batch layout, narrowed for a separate reference model that cannot do all of it."""
    opts = cfg.dpo
    mode = opts.reference
    use_adapter = uses_adapter_reference(cfg, policy)  # LoRA (or a given peft model), no reference given
    if mode == "auto":
        mode = "adapter" if use_adapter else "model"
    if mode == "adapter":
        if not is_peft(policy):
            raise ValueError("dpo.reference=adapter needs LoRA (--lora): without an adapter there is nothing "
                             "to switch off")
        if opts.ref_model:
            raise ValueError("dpo.reference=adapter uses the policy's base weights; it cannot use dpo.ref_model")
        return AdapterReference(cfg.train.logprob_chunk)
    if mode == "precomputed" and use_adapter:
        ref: Reference = AdapterReference(cfg.train.logprob_chunk)  # the policy with its adapter off: no second copy to load
        policy.to(accelerator.device)  # the trainer would move it there anyway
    else:
        ref_cfg = cfg.model.model_copy(update={"name_or_path": opts.ref_model or cfg.model.name_or_path,
                                               "gradient_checkpointing": False})
        # same dtype as the policy and run under the same autocast, so at step 0 reference == policy exactly
        # (its linear weights pre-cast to the autocast dtype: the same numbers without a cast per forward)
        ref = ModelReference(reference_model(ref_cfg, opts.ref_model).to(accelerator.device), cfg.train.logprob_chunk)
        precast_frozen_linears(ref.model, accelerator)
        if (opts.ref_model or current().ref_model is not None) and packing.pack:  # another model: must pack exactly too
            ref_packing = resolve_packing(ref.model, packing.pack, packing.share_prompt, packing.max_tokens)
            if ref_packing != packing:
                packing = ref_packing
                if mode == "model":
                    ref.packing = packing
        if mode == "model":
            return ref
    n = len(data.train) + len(data.eval)
    with accelerator.autocast(), phase(f"precomputing reference log-probs of {n} examples", label=cfg.command,
                                       enabled=accelerator.is_main_process and cfg.log.progress):
        for items in (data.train, data.eval):
            precompute(ref, items, tokenizer.pad_token_id, opts.paired, accelerator.device, cfg.train.batch_size,
                       policy=policy, packing=packing)
    del ref  # nothing of the reference stays in memory while training
    return PrecomputedReference()
