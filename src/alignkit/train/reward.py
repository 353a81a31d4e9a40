"""Reward-model training: Bradley-Terry loss on preference pairs, score read at the last real token."""

from __future__ import annotations

from typing import Any, Dict, List, Union

import torch

from alignkit.config import RMConfig, as_config
from alignkit.data import prepare
from alignkit.data.collate import PairBatch, collate_pairs
from alignkit.losses.reward import bradley_terry_loss
from alignkit.models.reward import reward_scores
from alignkit.train.loop import Task, Trainer


class RewardTask(Task):
    name = "rm"

    def __init__(self, pad_id: int, center_coef: float = 0.0):
        self.pad_id, self.center_coef = pad_id, center_coef

    def collate(self, items: List[Dict[str, Any]]) -> PairBatch:
        return collate_pairs(items, self.pad_id)

    def units(self, batch: PairBatch) -> float:
        return float(batch.num_pairs)

    def _scores(self, model, batch: PairBatch):
        scores = reward_scores(model, batch.seq)  # (2B,) chosen first, then rejected
        B = batch.num_pairs
        return scores[:B], scores[B:]

    def loss(self, model, batch: PairBatch):
        chosen, rejected = self._scores(model, batch)
        out = bradley_terry_loss(chosen, rejected, margin=batch.margin, labels=batch.soft_label)
        losses = out.losses
        if self.center_coef:
            # keeps the reward scale anchored at 0 (the BT loss is invariant to a shared shift)
            losses = losses + self.center_coef * (chosen + rejected) ** 2
        return losses.sum(), out.metrics

    @torch.no_grad()
    def evaluate(self, model, items, batch_size: int) -> Dict[str, float]:
        device = next(model.parameters()).device
        ch, rj, losses = [], [], []
        for i in range(0, len(items), batch_size):
            b = self.collate(items[i:i + batch_size]).to(device)
            c, r = self._scores(model, b)
            ch.append(c)
            rj.append(r)
            losses.append(bradley_terry_loss(c, r, margin=b.margin, labels=b.soft_label).losses)
        c, r = torch.cat(ch), torch.cat(rj)
        diff = c - r
        return {"eval/loss": float(torch.cat(losses).mean()),
                "eval/accuracy": float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean()),
                "eval/margin": float(diff.mean()), "eval/rewards_chosen": float(c.mean()),
                "eval/rewards_rejected": float(r.mean())}


def train_rm(config: Union[RMConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Train a reward model; the Python twin of ``alignkit rm``."""
    from alignkit.models.loading import apply_lora, load_reward_model, load_tokenizer
    from alignkit.models.reward import reward_pad_token
    from alignkit.train.common import fit_and_finish, report_data, start_run

    cfg = as_config(RMConfig, config, overrides)
    acc = start_run(cfg)
    tok = load_tokenizer(cfg.model)
    pad_id = reward_pad_token(tok)
    data = prepare("preference", cfg.data, tok, seed=cfg.train.seed, margin_field=cfg.rm.margin_field)
    report_data(data, cfg.output, acc.is_main_process)
    model = load_reward_model(cfg.model, pad_token_id=pad_id)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, task_type="SEQ_CLS")
    task = RewardTask(pad_id, cfg.rm.center_rewards_coef)
    trainer = Trainer(cfg, task, model, data.train, data.eval, accelerator=acc, tokenizer=tok)
    return fit_and_finish(trainer, tok, cfg, data.eval, samples=False)  # a reward model does not generate
