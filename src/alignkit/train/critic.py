"""The value model of online RL with a critic (the ``gae`` advantage; the ``ppo`` preset).

Policy and value model live in one :class:`PolicyWithValue` module, so the loop's single optimizer,
DDP wrapper and checkpoints cover both. The value model is either a separate critic (a
sequence-classification model with ``num_labels=1`` read at every position, :func:`build_critic`) or a
value head on the policy's own final hidden states (``value.shared=true``: one forward pass gives both).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from alignkit.data.layout import SeqBatch, SharedRows
from alignkit.models.default import resolve_model_path
from alignkit.models.loading import apply_lora, load_reward_model
from alignkit.models.reward import _score_head
from alignkit.ops import logprobs as lp
from alignkit.ops.wrappers import unwrap
from alignkit.train.rl_batch import disable_dropout
from alignkit.train.rl_config import OnlineRLConfig


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

    def forward(self, input_ids, attention_mask, loss_mask, with_entropy: bool = True, detach_value: bool = False,
                shared: Optional[SharedRows] = None):
        """``detach_value``: the shared value head reads detached features (critic warm-up trains the head
        alone); a separate critic is unaffected (it has its own backbone). ``shared`` (shared value head
        only): the same rows laid out with each prompt, and each prefix prompts share, once
        (:func:`~alignkit.data.layout.share_row_prompts`); log-probs and values come back in the rows'
        ``(B, T-1)`` label space, 0 off the labels (where GAE and the value loss never read)."""
        seq = SeqBatch(input_ids, attention_mask, loss_mask)
        chunk = self.logprob_chunk
        if self.value_head is None:
            tl = lp.token_logprobs(self.policy, seq, temperature=self.temperature, with_entropy=with_entropy,
                                   chunk_size=chunk)
            return tl, critic_values(self.critic, seq)
        run = shared.batch if shared is not None else seq
        out = self.policy(**lp.model_inputs(self.policy, run), output_hidden_states=True,
                          logits_to_keep=lp.keep_last(run.input_ids) if chunk else 0,  # 0: every position's logits
                          use_cache=False)
        hidden = out.hidden_states[-1]  # (R, L, H) final hidden states, shared by both heads
        tl = lp.token_logprobs(_Forwarded(self.policy, out), run, temperature=self.temperature,
                               with_entropy=with_entropy, chunk_size=chunk)
        if shared is None:
            features = hidden[:, :-1]  # V(s_t) for label t: the state at position t
        else:  # label t's state is the position that predicts it (a response's first: its prompt's last)
            src = run.label_from[:, 1:]  # (R, L-1)
            features = hidden.gather(1, src[..., None].expand(-1, -1, hidden.shape[-1]))
        features = features.detach() if detach_value else features
        values = self.value_head(features.to(self.value_head.weight.dtype)).squeeze(-1).float()
        if shared is None:
            return tl, values
        return lp.shared_to_rows(tl, seq, shared), shared.to_rows(values)


def _critic_path(cfg: OnlineRLConfig) -> str:
    init = cfg.value.init
    if init == "policy":
        return cfg.model.name_or_path
    if init == "reward":
        paths = [s.arg for s in cfg.rewards if s.kind == "model"]
        if not paths:
            raise ValueError("value.init=reward needs a model:PATH reward (or give value.init a path)")
        return paths[0]
    return init


def build_critic(cfg: OnlineRLConfig, tokenizer):
    """The separate critic: a sequence-classification model (num_labels=1) from ``value.init``."""
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
