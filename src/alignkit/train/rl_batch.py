"""The data of online RL between the rollout and the loss: rollout rows, the response (label) space
of their tokens, and the micro-batch the loss reads (:class:`RLBatch`). Used by
:mod:`alignkit.train.online` and the trainers built on it."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from alignkit.data.layout import SeqBatch, SharedRows
from alignkit.losses.policy import AGGREGATIONS
from alignkit.ops.wrappers import unwrap
from alignkit.rollout.generate import Rollout


def policy_of(model):
    """The causal LM inside ``model`` (a policy+value wrapper exposes it as ``.policy``)."""
    m = unwrap(model)
    inner = getattr(m, "policy", None)
    return inner if isinstance(inner, torch.nn.Module) else m


def disable_dropout(model: torch.nn.Module) -> None:
    """RL compares log-probs of the same tokens across passes; dropout would make them disagree."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def response_index(prompt_lengths: Sequence[int], response_lengths: Sequence[int], width: int,
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where each response token's log-prob sits in the ``(N, T-1)`` label space.

    Response token ``k`` of row ``i`` is ``input_ids[i, p_i + k]``; its log-prob is at column
    ``p_i - 1 + k``. Returns ``(index (N, R), valid (N, R))`` with ``R`` the longest response;
    invalid slots point at column ``width - 1`` (and must be masked).
    """
    p = torch.tensor(list(prompt_lengths), dtype=torch.long)
    r = torch.tensor(list(response_lengths), dtype=torch.long)
    k = torch.arange(int(r.max()) if len(r) else 0)
    valid = k[None, :] < r[:, None]  # (N, R)
    index = (p[:, None] - 1 + k[None, :]).clamp(min=0, max=width - 1)
    return torch.where(valid, index, torch.full_like(index, width - 1)), valid


def last_response_index(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> torch.Tensor:
    """(N,) column of each response's last token (EOS, or the cut-off token) in label space."""
    return torch.tensor([p - 1 + r - 1 for p, r in zip(prompt_lengths, response_lengths)], dtype=torch.long)


def loss_aggregation(name: str) -> Tuple[str, bool]:
    """(aggregation for the loss function, units are tokens). An aggregation in token units (token_mean)
    becomes a plain sum here and the loop divides by the global token count of the update
    (alignkit.losses.policy docstring)."""
    return ("sum", True) if AGGREGATIONS.get(name).token_units else (name, False)


@dataclass
class RLBatch:
    """One micro-batch of a rollout with its training targets (right-padded, trimmed to its rows)."""

    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T)
    loss_mask: torch.Tensor  # (B, T) response tokens
    advantages: torch.Tensor  # (B, T-1) token-level or (B,) sequence-level
    old_logps: Optional[torch.Tensor] = None  # (B, T-1) behaviour policy
    ref_logps: Optional[torch.Tensor] = None  # (B, T-1) reference
    returns: Optional[torch.Tensor] = None  # (B, T-1) value targets
    old_values: Optional[torch.Tensor] = None  # (B, T-1)
    shared: Optional[SharedRows] = None  # the rows with each prompt once (prefix sharing), or None
    keep: Optional[torch.Tensor] = None  # (B,) 0 for rows left out of the loss (mask_truncated_completions)
    # what the loss needs of its rollout beside tensors (nothing is kept on the task between plan and loss)
    beta: float = 0.0  # KL coefficient of this rollout for the loss-placed KL term (0: none)
    warmup: bool = False  # critic warm-up: the value loss alone, the policy untouched
    #: the loss pass logs the rollout's KL/entropy metrics (RLTask.on_policy_stats): sum -> per-unit factors
    #: of a per-sequence ("seq") and a per-token ("tok") metric; None: the plan logged them
    metric_scale: Optional[Dict[str, float]] = None

    def to(self, device) -> "RLBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), (torch.Tensor, SharedRows))})

    @property
    def seq(self) -> SeqBatch:
        return SeqBatch(self.input_ids, self.attention_mask, self.loss_mask)

    @property
    def mask(self) -> torch.Tensor:
        """(B, T-1) the response tokens the loss reads (rows with ``keep`` 0 have none)."""
        mask = self.loss_mask[:, 1:].float()
        return mask if self.keep is None else mask * self.keep[:, None].to(mask.dtype)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def rows_of(seq: SeqBatch, rows: Sequence[int]) -> SeqBatch:
    """Rows of a right-padded batch, trimmed to their own longest sequence."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    T = int(seq.attention_mask[idx].sum(-1).max())
    return SeqBatch(seq.input_ids[idx, :T], seq.attention_mask[idx, :T], seq.loss_mask[idx, :T])


def select_rows(parts: Sequence[Tuple[Rollout, List[int]]], pad_id: int) -> Rollout:
    """One rollout of the given rows of several rollouts (dynamic sampling keeps groups from several
    rounds), re-padded on the right to the longest kept sequence; ``prompt_index`` renumbered by group."""
    ids, attn, lm, plen, resp, texts, ended, pidx, info = [], [], [], [], [], [], [], [], []
    for g, (ro, rows) in enumerate(parts):
        for r in rows:
            info.append(ro.info[r] if ro.info is not None else None)
            n = int(ro.sequences.attention_mask[r].sum())
            ids.append(ro.sequences.input_ids[r, :n])
            attn.append(ro.sequences.attention_mask[r, :n])
            lm.append(ro.sequences.loss_mask[r, :n])
            plen.append(ro.prompt_lengths[r])
            resp.append(ro.response_ids[r])
            texts.append(ro.texts[r])
            ended.append(bool(ro.ended[r]))
            pidx.append(g)
    T = max(len(x) for x in ids)

    def pad(rows, value):
        return torch.stack([torch.cat([x, torch.full((T - len(x),), value, dtype=x.dtype)]) for x in rows])

    return Rollout(SeqBatch(pad(ids, pad_id), pad(attn, 0), pad(lm, 0)), plen, resp, texts,
                   torch.tensor(ended, dtype=torch.bool), pidx,
                   info=info if all(x is not None for x in info) else None)
