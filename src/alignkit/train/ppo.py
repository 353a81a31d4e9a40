"""PPO with a value model for language models (``alignkit ppo``).

Schulman et al. 2017 (PPO), as applied to LMs by Ziegler et al. 2019 and Ouyang et al. 2022:

* per-token reward ``r_t = -beta * KL_t + [t = last] * R(x, y)`` with ``KL_t`` an estimate of
  ``log pi(y_t) - log pi_ref(y_t)`` (Ziegler et al. 2019, eq. 2; k1 by default);
* GAE advantages and returns (Schulman et al. 2016, eq. 16), whitened over the rollout;
* clipped surrogate (PPO eq. 7), clipped value loss, entropy bonus, several epochs of minibatches;
* ``beta`` fixed or adapted towards a target KL (Ziegler et al. 2019, eq. 2), saved in checkpoints.

Policy and value model live in one :class:`PolicyWithValue` module, so the loop's single optimizer,
DDP wrapper and checkpoints cover both. The value model is either a separate critic (a
sequence-classification model with ``num_labels=1`` read at every position) or a value head on the
policy's own final hidden states (``value.shared=true``: one forward pass gives both).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from alignkit.advantages import AdaptiveKLController, FixedKLController, RunningMoments, gae
from alignkit.data.collate import SeqBatch
from alignkit.losses.policy import ppo_loss
from alignkit.losses.value import explained_variance, value_loss
from alignkit.ops import logprobs as lp
from alignkit.ops.kl import kl_estimate
from alignkit.ops.masked import masked_mean, masked_whiten
from alignkit.ops.wrappers import unwrap
from alignkit.train.online import (OnlineTask, disable_dropout, from_response_space, last_response_index,
                                   load_reference, response_index, run_online, to_response_space)
from alignkit.train.rl_config import PPOConfig, PPOOptions


class _Forwarded:
    """Looks like the policy to :func:`token_logprobs` but returns an output computed already, so the
    shared value head and the log-probs come from one forward pass."""

    def __init__(self, policy, output):
        self._policy, self._output = policy, output
        self.module = policy  # what the log-prob head unwraps to: the policy's config and head

    @property
    def config(self):
        return self._policy.config

    def __call__(self, **kwargs):
        return self._output

    def get_output_embeddings(self):
        return unwrap(self._policy).get_output_embeddings()


def critic_values(critic, seq: SeqBatch) -> torch.Tensor:
    """(B, T-1) values V(s_t) of a sequence-classification critic: its scalar head at every position
    t < T-1 (the state before label t+1 is emitted), aligned with the log-probs."""
    from alignkit.models.reward import _score_head

    inner = critic.get_base_model() if hasattr(critic, "get_base_model") else critic
    backbone = inner.base_model  # the transformer without the head (LoRA layers, if any, are inside)
    out = backbone(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                   position_ids=lp.position_ids(seq.attention_mask), use_cache=False)
    hidden = out.last_hidden_state[:, :-1]  # (B, T-1, H), after the final norm
    return _score_head(critic)(hidden).squeeze(-1).float()


class PolicyWithValue(nn.Module):
    """The policy and its value model as one trainable module.

    ``forward(input_ids, attention_mask, loss_mask)`` returns ``(TokenLogprobs (B, T-1) with entropy,
    values (B, T-1))``. With ``critic=None`` a zero-initialised linear value head reads the policy's
    final hidden states (shared backbone).
    """

    def __init__(self, policy: nn.Module, critic: Optional[nn.Module] = None, temperature: float = 1.0,
                 logprob_chunk: int = lp.DEFAULT_CHUNK):
        super().__init__()
        self.policy, self.critic, self.temperature = policy, critic, temperature
        self.logprob_chunk = logprob_chunk  # train.logprob_chunk; 0 = full logits
        self.value_head = None
        if critic is None:
            self.value_head = nn.Linear(policy.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)  # values start at 0: no random noise in the first advantages
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, loss_mask, with_entropy: bool = True):
        seq = SeqBatch(input_ids, attention_mask, loss_mask)
        chunk = self.logprob_chunk
        if self.value_head is None:
            tl = lp.token_logprobs(self.policy, seq, temperature=self.temperature, with_entropy=with_entropy,
                                   chunk_size=chunk)
            return tl, critic_values(self.critic, seq)
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=lp.position_ids(attention_mask), output_hidden_states=True,
                          logits_to_keep=1 if chunk else 0, use_cache=False)  # 0: every position's logits
        hidden = out.hidden_states[-1]  # (B, T, H) final hidden states, shared by both heads
        tl = lp.token_logprobs(_Forwarded(self.policy, out), seq, temperature=self.temperature,
                               with_entropy=with_entropy, chunk_size=chunk)
        values = self.value_head(hidden[:, :-1].to(self.value_head.weight.dtype)).squeeze(-1).float()
        return tl, values


class PPOTask(OnlineTask):
    name = "ppo"

    def __init__(self, cfg: PPOConfig, tokenizer, reward, gold=None, ref_model=None, adapter_ref=False, engine=None):
        super().__init__(cfg, tokenizer, reward, gold, ref_model, adapter_ref, engine)
        self.opts: PPOOptions = cfg.ppo
        o = self.opts
        self.kl_ctl = AdaptiveKLController(o.kl_coef, o.kl_target, o.kl_horizon) if o.adaptive_kl \
            else FixedKLController(o.kl_coef)
        self.moments = RunningMoments() if o.normalize_reward else None

    def update_shape(self) -> Tuple[int, int]:
        return self.opts.epochs, self.opts.num_minibatches

    def forward(self, model, seq: SeqBatch, with_entropy: bool = True):
        return model(input_ids=seq.input_ids, attention_mask=seq.attention_mask, loss_mask=seq.loss_mask,
                     with_entropy=with_entropy)

    def units(self, mb) -> float:
        return float(mb.mask.sum())  # token-mean over the whole update

    # ------------------------------------------------------------------ rollout -> targets
    def shape_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Optional running normalization (statistics over every process) and clipping of (N,) rewards."""
        if self.moments is not None:
            self.moments.update(self._gather(scores))
            scores = self.moments.normalize(scores)
        if self.opts.reward_clip:
            scores = scores.clamp(-self.opts.reward_clip, self.opts.reward_clip)
        return scores

    def plan(self, model, items, micro_batch_size: int):
        o = self.opts
        ro, scores, metrics = self.rollout(model, items)
        sched = self.schedule(len(ro), micro_batch_size)
        st = self.rollout_stats(model, ro, sched[:o.num_minibatches], ref=self.has_reference)
        seq = ro.sequences
        T1 = seq.input_ids.shape[1] - 1
        mask = seq.loss_mask[:, 1:].float()  # (N, T-1) response tokens
        scores = self.shape_scores(scores)
        if self.has_reference:
            kl = kl_estimate(st["old_logps"], st["ref_logps"], o.kl_estimator) * mask  # (N, T-1)
        else:
            kl = torch.zeros_like(mask)
        beta = self.kl_ctl.value
        rewards = -beta * kl
        last = last_response_index(ro.prompt_lengths, [len(r) for r in ro.response_ids])
        rewards[torch.arange(len(ro)), last] += scores  # the sequence reward lands on the last response token
        index, valid = response_index(ro.prompt_lengths, [len(r) for r in ro.response_ids], T1)
        adv_r, ret_r = gae(to_response_space(rewards, index, valid), to_response_space(st["values"], index, valid),
                           valid, gamma=o.gamma, lam=o.lam)  # (N, R) each
        advantages = from_response_space(adv_r, index, valid, T1)
        returns = from_response_space(ret_r, index, valid, T1)
        if o.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        seq_kl = self._gather(kl.sum(-1))  # (N,) nats per sequence
        if self.has_reference:
            metrics.update({"kl/ref": float(seq_kl.mean()), "kl/coef": beta})
            self.kl_ctl.update(float(seq_kl.mean()), len(ro) * self.world)
        metrics.update({
            "policy/entropy": float(masked_mean(st["entropy"], mask)),
            "value/explained_variance": float(explained_variance(st["values"], returns, mask)),
            "value/mean": float(masked_mean(st["values"], mask)),
            "rewards/shaped_mean": float(self._gather(scores).mean()),
        })
        per_row = {"advantages": advantages, "returns": returns, "old_logps": st["old_logps"],
                   "old_values": st["values"]}
        yield from self.yield_updates(ro, sched, per_row, metrics)

    # ------------------------------------------------------------------ loss
    def loss(self, model, mb):
        o = self.opts
        tl, values = self.forward(model, mb.seq, with_entropy=o.ent_coef > 0)  # the softmax costs; skip it unused
        mask = mb.mask
        pg = ppo_loss(tl.logps, mb.old_logps, mb.advantages, mask, clip_eps=o.clip_eps, aggregation="sum")
        vf = value_loss(values, mb.old_values, mb.returns, mask, clip_range=o.vf_clip, aggregation="sum")
        total = pg.losses.sum() + o.vf_coef * vf.losses.sum()
        if o.ent_coef:
            total = total - o.ent_coef * (tl.entropy * mask).sum()
        n = mask.sum().clamp(min=1.0)
        metrics = {**pg.metrics, "policy/loss": pg.losses.detach().sum() / n,
                   "value/loss": vf.losses.detach().sum() / n, **vf.metrics}
        return total, metrics

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"kl_ctl": self.kl_ctl.state_dict()}
        if self.moments is not None:
            state["reward_moments"] = self.moments.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "kl_ctl" in state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
        if self.moments is not None and "reward_moments" in state:
            self.moments.load_state_dict(state["reward_moments"])


def _critic_path(cfg: PPOConfig) -> str:
    init = cfg.value.init
    if init == "policy":
        return cfg.model.name_or_path
    if init == "reward":
        paths = [s.arg for s in cfg.rewards if s.kind == "model"]
        if not paths:
            raise ValueError("value.init=reward needs a model:PATH reward (or give value.init a path)")
        return paths[0]
    return init


def build_critic(cfg: PPOConfig, tokenizer):
    """The separate critic: a sequence-classification model (num_labels=1) from ``value.init``."""
    from alignkit.models.default import resolve_model_path
    from alignkit.models.loading import apply_lora, load_reward_model

    path = _critic_path(cfg)
    critic = load_reward_model(cfg.model.model_copy(update={"name_or_path": path}),
                               pad_token_id=tokenizer.pad_token_id)
    vocab = critic.get_input_embeddings().weight.shape[0]
    if vocab < len(tokenizer):
        raise ValueError(f"value.init={cfg.value.init}: the critic ({resolve_model_path(path)}) has {vocab} "
                         f"token embeddings but the policy's tokenizer has {len(tokenizer)}; the critic reads the "
                         "policy's tokens, so it must share its tokenizer (use value.init=policy or value.shared=true)")
    disable_dropout(critic)
    if cfg.lora.enabled:
        critic = apply_lora(critic, cfg.lora, task_type="SEQ_CLS")
    return critic


def _build(cfg: PPOConfig, tok, policy, reward, gold, engine, acc):
    o = cfg.ppo
    ref, adapter = load_reference(cfg, acc, needed=o.kl_coef > 0 or o.adaptive_kl)
    critic = None if cfg.value.shared else build_critic(cfg, tok)
    model = PolicyWithValue(policy, critic, temperature=cfg.generation.temperature or 1.0,
                            logprob_chunk=cfg.train.logprob_chunk)
    return PPOTask(cfg, tok, reward, gold, ref, adapter, engine), model


def train_ppo(config: Union[PPOConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Run PPO; the Python twin of ``alignkit ppo``. Returns the summary (final metrics, paths)."""
    from alignkit.config import as_config

    return run_online(as_config(PPOConfig, config, overrides), _build)
