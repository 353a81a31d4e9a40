"""Supervised fine-tuning: next-token NLL on response tokens only."""

from __future__ import annotations

from typing import Any, Dict, List, Union

import torch

from alignkit.api import object_api, policy_model, policy_tokenizer
from alignkit.config import SFTConfig, as_config
from alignkit.data.collate import collate_sft
from alignkit.data.layout import PADDED, Packing, SeqBatch
from alignkit.models.loading import load_causal_lm
from alignkit.ops.logprobs import DEFAULT_CHUNK, token_logprobs
from alignkit.ops.packing import resolve_packing
from alignkit.train.common import fit_and_finish, prepare_data, start_run
from alignkit.train.loop import EVAL_EXAMPLES, Task, Trainer


class SFTTask(Task):
    name = "sft"

    def __init__(self, pad_id: int, reduction: str = "token", logprob_chunk: int = DEFAULT_CHUNK,
                 packing: Packing = PADDED):
        self.pad_id, self.reduction, self.logprob_chunk, self.packing = pad_id, reduction, logprob_chunk, packing
        self.max_tokens = packing.max_tokens

    def collate(self, items: List[Dict[str, Any]]) -> SeqBatch:
        return collate_sft(items, self.pad_id, self.packing)

    def units(self, batch: SeqBatch) -> float:
        return float(batch.num_label_tokens) if self.reduction == "token" else float(len(batch))

    def loss(self, model, batch: SeqBatch):
        tl = token_logprobs(model, batch, chunk_size=self.logprob_chunk)
        if self.reduction == "token":
            total = -tl.sum().sum()  # summed over label tokens (the masked set: padding never counts)
        else:
            total = -tl.mean().sum()  # each sequence's mean over its label tokens
        return total, {"train/tokens": tl.lengths().sum().detach() / max(len(batch), 1)}

    @torch.no_grad()
    def evaluate(self, model, items, batch_size: int) -> Dict[str, float]:
        """Held-out loss per label token and perplexity; each sequence's summed NLL also comes back under
        ``EVAL_EXAMPLES`` (the same tokens at every evaluation, so the held-out alert's paired test of
        those sums tests the sign of the change of the per-token loss)."""
        nll, tokens = 0.0, 0.0
        per_seq: List[float] = []
        for i in range(0, len(items), batch_size):
            b = self.collate(items[i:i + batch_size]).to(next(model.parameters()).device)
            tl = token_logprobs(model, b, chunk_size=self.logprob_chunk)
            nll += float(-tl.logps.sum())
            tokens += float(tl.mask.sum())
            per_seq += (-tl.sum()).float().tolist()
        loss = nll / max(tokens, 1.0)
        return {"eval/loss": loss, "eval/perplexity": float(torch.exp(torch.tensor(loss))),
                EVAL_EXAMPLES: {"eval/loss": per_seq}}


@object_api(SFTConfig, "sft")
def train_sft(config: Union[SFTConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run SFT; the Python twin of ``alignkit sft``. Returns the summary (final metrics, paths)."""
    cfg = as_config(SFTConfig, config, overrides)
    acc = start_run(cfg)
    tok = policy_tokenizer(cfg)
    data = prepare_data("sft", cfg, tok, acc, seed=cfg.train.seed)
    model = policy_model(cfg, lambda: load_causal_lm(cfg.model))
    packing = resolve_packing(model, cfg.train.packing, max_tokens=cfg.train.max_tokens_per_batch)
    task = SFTTask(tok.pad_token_id, cfg.sft.loss_reduction, cfg.train.logprob_chunk, packing)
    trainer = Trainer(cfg, task, model, data.train, data.eval, accelerator=acc, tokenizer=tok)
    return fit_and_finish(trainer, tok, cfg, data.eval)

