"""Critic-free online RL: GRPO (``alignkit grpo``) and RLOO (``alignkit rloo``).

Both sample G responses per prompt and judge each against the others of its group, so no value model
is needed:

* GRPO (Shao et al. 2024, sec. 4.1.2, eq. 3-4): ``A_i = (r_i - mean_g) / std_g`` (``scale_by_std=false``
  drops the division: Dr. GRPO, Liu et al. 2025), clipped surrogate, and ``beta * k3`` KL to the
  reference *as a loss term*; ``beta = 0`` loads no reference. Token aggregation is a named choice.
* RLOO (Ahmadian et al. 2024, eq. 9): REINFORCE with the leave-one-out baseline
  ``A_i = r_i - mean_{j != i} r_j``; an optional KL penalty is folded into the sequence reward
  (``r_i - kl_coef * sum_t KL_t``), as in Ahmadian et al. sec. 3.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import torch

from alignkit.advantages import group_normalized_advantages, leave_one_out_advantages
from alignkit.losses.policy import grpo_loss, rloo_loss
from alignkit.ops.kl import kl_estimate, kl_k3
from alignkit.ops.masked import masked_mean
from alignkit.train.online import OnlineTask, load_reference, loss_aggregation, run_online
from alignkit.train.rl_config import GRPOConfig, RLOOConfig


class GroupTask(OnlineTask):
    """Shared by GRPO and RLOO: G samples per prompt, sequence-level advantages."""

    def __init__(self, cfg, opts, aggregation: str, tokenizer, reward, gold=None, ref_model=None,
                 adapter_ref=False, engine=None):
        super().__init__(cfg, tokenizer, reward, gold, ref_model, adapter_ref, engine)
        self.opts = opts
        self.samples_per_prompt = opts.num_generations
        self.agg, self.token_units = loss_aggregation(aggregation)
        self.max_len = cfg.generation.max_new_tokens

    def update_shape(self) -> Tuple[int, int]:
        return self.opts.epochs, self.opts.num_minibatches

    @property
    def several_updates(self) -> bool:
        return self.opts.epochs * self.opts.num_minibatches > 1

    def units(self, mb) -> float:
        return float(mb.mask.sum()) if self.token_units else float(len(mb))

    def advantages(self, scores: torch.Tensor, stats: Dict[str, torch.Tensor], mask: torch.Tensor,
                   metrics: Dict[str, float]) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, model, items, micro_batch_size: int):
        ro, scores, metrics = self.rollout(model, items)
        sched = self.schedule(len(ro), micro_batch_size)
        mask = ro.sequences.loss_mask[:, 1:].float()  # (N, T-1)
        stats: Dict[str, torch.Tensor] = {}
        if self.has_reference or self.several_updates:  # log-probs at rollout time are needed
            stats = self.rollout_stats(model, ro, sched[:self.opts.num_minibatches], ref=self.has_reference)
            metrics["policy/entropy"] = float(masked_mean(stats["entropy"], mask))
        if self.has_reference:
            # per-sequence k3 KL(pi || pi_ref) of the rollout, nats per sequence (the diagnostics' scale)
            seq_kl = (kl_k3(stats["old_logps"], stats["ref_logps"]) * mask).sum(-1)
            metrics["kl/ref"] = float(self._gather(seq_kl).mean())
        adv = self.advantages(scores, stats, mask, metrics)  # (N,)
        G = self.samples_per_prompt
        grouped = self._gather(scores).view(-1, G)
        metrics["rewards/zero_std_groups"] = float((grouped.std(dim=1) == 0).float().mean())
        per_row = {"advantages": adv, "old_logps": stats.get("old_logps") if self.several_updates else None,
                   "ref_logps": stats.get("ref_logps")}
        yield from self.yield_updates(ro, sched, per_row, metrics)


class GRPOTask(GroupTask):
    name = "grpo"

    def __init__(self, cfg: GRPOConfig, tokenizer, reward, gold=None, ref_model=None, adapter_ref=False, engine=None):
        super().__init__(cfg, cfg.grpo, cfg.grpo.aggregation, tokenizer, reward, gold, ref_model, adapter_ref, engine)

    def advantages(self, scores, stats, mask, metrics):
        return group_normalized_advantages(scores, self.samples_per_prompt, scale_by_std=self.opts.scale_by_std)

    def loss(self, model, mb):
        o = self.opts
        tl, _ = self.forward(model, mb.seq)
        mask = mb.mask
        out = grpo_loss(tl.logps, mb.old_logps, mb.ref_logps, mb.advantages, mask, clip_eps=o.clip_eps,
                        clip_eps_high=o.clip_eps_high, beta=o.beta, aggregation=self.agg,
                        max_len=self.max_len if self.agg == "sum_norm" else None)
        metrics = dict(out.metrics)
        if "kl/ref" in metrics:  # per-token mean; kl/ref itself is logged per sequence from the rollout
            metrics["kl/ref_token_mean"] = metrics.pop("kl/ref")
        metrics["policy/entropy"] = masked_mean(tl.entropy.detach(), mask)
        return out.losses.sum(), metrics


class RLOOTask(GroupTask):
    name = "rloo"

    def __init__(self, cfg: RLOOConfig, tokenizer, reward, gold=None, ref_model=None, adapter_ref=False, engine=None):
        super().__init__(cfg, cfg.rloo, cfg.rloo.aggregation, tokenizer, reward, gold, ref_model, adapter_ref, engine)

    def advantages(self, scores, stats, mask, metrics):
        o = self.opts
        if self.has_reference and o.kl_coef > 0:
            seq_kl = (kl_estimate(stats["old_logps"], stats["ref_logps"], o.kl_estimator) * mask).sum(-1)  # (N,)
            scores = scores - o.kl_coef * seq_kl
            metrics["kl/coef"] = o.kl_coef
            metrics["rewards/shaped_mean"] = float(self._gather(scores).mean())
        return leave_one_out_advantages(scores, self.samples_per_prompt)

    def loss(self, model, mb):
        o = self.opts
        tl, _ = self.forward(model, mb.seq)
        mask = mb.mask
        out = rloo_loss(tl.logps, mb.advantages, mask, old_logprobs=mb.old_logps, clip_eps=o.clip_eps,
                        clip_eps_high=o.clip_eps_high, aggregation=self.agg,
                        max_len=self.max_len if self.agg == "sum_norm" else None)
        metrics = {**out.metrics, "policy/entropy": masked_mean(tl.entropy.detach(), mask)}
        return out.losses.sum(), metrics


def _build_grpo(cfg: GRPOConfig, tok, policy, reward, gold, engine, acc):
    ref, adapter = load_reference(cfg, acc, needed=cfg.grpo.beta > 0)
    return GRPOTask(cfg, tok, reward, gold, ref, adapter, engine), policy


def _build_rloo(cfg: RLOOConfig, tok, policy, reward, gold, engine, acc):
    ref, adapter = load_reference(cfg, acc, needed=cfg.rloo.kl_coef > 0)
    return RLOOTask(cfg, tok, reward, gold, ref, adapter, engine), policy


def train_grpo(config: Union[GRPOConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run GRPO; the Python twin of ``alignkit grpo``."""
    from alignkit.config import as_config

    return run_online(as_config(GRPOConfig, config, overrides), _build_grpo)


def train_rloo(config: Union[RLOOConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run RLOO; the Python twin of ``alignkit rloo``."""
    from alignkit.config import as_config

    return run_online(as_config(RLOOConfig, config, overrides), _build_rloo)
