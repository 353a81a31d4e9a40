"""Reward-model training: one batch element per prompt (its ranking), score read at the last real token.

Rows come in as pairs (data/formats expands a ranking ``{prompt, responses: [best, ..., worst]}`` into
its K-choose-2 pairs, all with the row's number). :func:`group_rankings` puts the pairs of one source
row back together into one *ranking element*: the distinct responses in rank order plus the soft label
and margin of the row. A plain pair row is an element with K = 2. Each response of an element goes
through the model once, and ``rm.loss`` (:data:`alignkit.losses.reward.RANKING_LOSSES`) turns the
element's K rewards into one loss: all-pairs Bradley-Terry (InstructGPT, the default) or Plackett-Luce.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from alignkit.api import object_api, policy_model, policy_tokenizer
from alignkit.config import RMConfig, as_config
from alignkit.data.layout import PADDED, Packing, SeqBatch, layout_prompted
from alignkit.losses.reward import RANKING_LOSSES, all_pairs_bradley_terry_loss, plackett_luce_loss
from alignkit.models.loading import load_reward_model
from alignkit.models.reward import reward_pad_token, reward_scores
from alignkit.ops.packing import resolve_packing
from alignkit.train.common import fit_and_finish, prepare_data, start_run
from alignkit.train.loop import EVAL_EXAMPLES, Task, Trainer


def _order(pairs: List[Tuple[int, int]], k: int) -> Optional[List[int]]:
    """The strict order (best first) that implies exactly ``pairs``, or None when there is none."""
    wins = [0] * k
    for w, _ in pairs:
        wins[w] += 1
    order = sorted(range(k), key=lambda i: -wins[i])
    implied = {(order[a], order[b]) for a in range(k) for b in range(a + 1, k)}
    return order if implied == set(pairs) else None


def group_rankings(items: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], int]:
    """Pair items -> ranking elements ``{prompt_ids, responses: [ids best first], soft_label, margin, row}``.

    Pairs with the same source row and prompt form one element when they are exactly the pairs of one
    strict order of their distinct responses (always so for a ranking row; truncation never splits
    one). Otherwise (e.g. a ranking listing the same text twice) each pair stays its own K = 2 element,
    and the second return value counts those rows.
    """
    groups: "OrderedDict[Tuple[int, Tuple[int, ...]], List[Dict[str, Any]]]" = OrderedDict()
    for x in items:
        groups.setdefault((x["row"], tuple(x["prompt_ids"])), []).append(x)
    out, split_rows = [], 0
    for group in groups.values():
        first = group[0]
        if len(group) == 1:
            resp, order = [first["chosen_ids"], first["rejected_ids"]], [0, 1]
        else:
            index: Dict[Tuple[int, ...], int] = {}
            for x in group:
                for key in ("chosen_ids", "rejected_ids"):
                    index.setdefault(tuple(x[key]), len(index))
            pairs = [(index[tuple(x["chosen_ids"])], index[tuple(x["rejected_ids"])]) for x in group]
            order = _order(pairs, len(index))
            if order is None:
                split_rows += 1
                out.extend(group_rankings([dict(x, row=(x["row"], i)) for i, x in enumerate(group)])[0])
                continue
            resp = [list(ids) for ids in index]
        el = {"prompt_ids": first["prompt_ids"], "responses": [resp[i] for i in order],
              "soft_label": first.get("soft_label", 1.0), "row": first["row"]}
        if "margin" in first:
            el["margin"] = first["margin"]
        out.append(el)
    return out, split_rows


@dataclass
class RankingBatch:
    """The responses of B ranking elements, flattened into one sequence batch.

    ``seq`` rows are element 0's responses (best first), then element 1's, ...; ``index`` ``(B, K)``
    maps each element's rank slot to its ``seq`` row (0 on padding), ``mask`` ``(B, K)`` marks real slots.
    """

    seq: SeqBatch
    index: torch.Tensor  # (B, K) long
    mask: torch.Tensor  # (B, K) bool
    soft_label: torch.Tensor  # (B,)
    margin: Optional[torch.Tensor] = None  # (B,)

    def to(self, device) -> "RankingBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})

    def __len__(self) -> int:
        return self.index.shape[0]


def collate_rankings(items: List[Dict[str, Any]], pad_id: int, packing: Packing = PADDED) -> RankingBatch:
    """Padded, packed, or (``packing.share_prompt``) one ``[prompt][response 1]...[response K]`` unit per
    element: the prompt runs once for its K responses."""
    groups = []
    n = 0
    K = max(len(x["responses"]) for x in items)
    index = torch.zeros((len(items), K), dtype=torch.long)
    mask = torch.zeros((len(items), K), dtype=torch.bool)
    for b, x in enumerate(items):
        responses = []
        for k, r in enumerate(x["responses"]):
            index[b, k], mask[b, k] = n, True
            responses.append((r, n))
            n += 1
        groups.append((x["prompt_ids"], responses))
    margin = torch.tensor([x["margin"] for x in items], dtype=torch.float32) if "margin" in items[0] else None
    return RankingBatch(layout_prompted(groups, pad_id, packing), index, mask,
                        torch.tensor([x.get("soft_label", 1.0) for x in items], dtype=torch.float32), margin)


class RewardTask(Task):
    """``units`` are ranking elements (prompts): each prompt weighs the same whatever its K."""

    name = "rm"

    def __init__(self, pad_id: int, center_coef: float = 0.0, loss: str = "bradley_terry",
                 packing: Packing = PADDED):
        self.pad_id, self.center_coef, self.packing = pad_id, center_coef, packing
        self.max_tokens = packing.max_tokens
        self.loss_fn = RANKING_LOSSES.get(loss).fn
        self.listwise = loss == "plackett_luce"

    def collate(self, items: List[Dict[str, Any]]) -> RankingBatch:
        return collate_rankings(items, self.pad_id, self.packing)

    def item_tokens(self, item: Dict[str, Any]) -> int:
        n = sum(len(r) for r in item["responses"])
        return n + len(item["prompt_ids"]) * (1 if self.packing.share_prompt else len(item["responses"]))

    def units(self, batch: RankingBatch) -> float:
        return float(len(batch))

    def _rewards(self, model, batch: RankingBatch) -> torch.Tensor:
        scores = reward_scores(model, batch.seq)  # (N,) one per response
        return scores[batch.index] * batch.mask  # (B, K) rank order, 0 on padding

    def _loss(self, rewards: torch.Tensor, batch: RankingBatch):
        out = self.loss_fn(rewards, batch.mask, margin=batch.margin, labels=batch.soft_label)
        if self.listwise and (batch.margin is not None or bool((batch.soft_label != 1).any())):
            # Plackett-Luce has no margin or soft label; a K = 2 element keeps them through Bradley-Terry,
            # which equals Plackett-Luce there at p = 1, m = 0
            bt = all_pairs_bradley_terry_loss(rewards, batch.mask, margin=batch.margin, labels=batch.soft_label)
            out.losses = torch.where(batch.mask.sum(-1) == 2, bt.losses, out.losses)
        return out

    def loss(self, model, batch: RankingBatch):
        rewards = self._rewards(model, batch)
        out = self._loss(rewards, batch)
        losses = out.losses
        if self.center_coef:
            # keeps the reward scale anchored at 0 (both losses are invariant to a shared shift):
            # the squared sum of the rewards of each pair i > j, averaged over the element's pairs
            k = batch.mask.sum(-1).to(rewards.dtype)
            s, s2 = rewards.sum(-1), (rewards ** 2).sum(-1)
            pair_sq = (k - 2) * s2 + s ** 2  # sum_{i<j} (r_i + r_j)^2
            losses = losses + self.center_coef * pair_sq / (k * (k - 1) / 2)
        return losses.sum(), out.metrics

    @torch.no_grad()
    def evaluate(self, model, items, batch_size: int) -> Dict[str, float]:
        """Pairwise accuracy (ties half) over every implied pair, the loss per prompt, and on elements with
        K >= 3: the rate of exactly recovered rankings and the Plackett-Luce NLL per prompt."""
        device = next(model.parameters()).device
        acc = margin = pairs = loss = n = exact = pl = n_list = 0.0
        rc = rr = 0.0
        per_acc: List[float] = []  # each element's pairwise accuracy and loss, for the held-out alert's test
        per_loss: List[float] = []
        for i in range(0, len(items), batch_size):
            b = self.collate(items[i:i + batch_size]).to(device)
            r = self._rewards(model, b)
            out = self._loss(r, b)
            k = b.mask.sum(-1).to(r.dtype)
            npairs = k * (k - 1) / 2
            acc += float((out.metrics["rewards/accuracy"] * npairs).sum())
            margin += float((out.metrics["rewards/margin"] * npairs).sum())
            rc += float(out.metrics["rewards/chosen"].sum())
            rr += float(out.metrics["rewards/rejected"].sum())
            pairs += float(npairs.sum())
            loss += float(out.losses.sum())
            per_acc += out.metrics["rewards/accuracy"].float().tolist()
            per_loss += out.losses.float().tolist()
            n += len(b)
            listwise = k >= 3
            if bool(listwise.any()):
                ordered = ((r[:, :-1] > r[:, 1:]) | ~b.mask[:, 1:]).all(-1)  # strictly decreasing on real slots
                exact += float(ordered[listwise].sum())
                pl += float(plackett_luce_loss(r, b.mask).losses[listwise].sum())
                n_list += float(listwise.sum())
        res = {"eval/loss": loss / n, "eval/accuracy": acc / pairs, "eval/margin": margin / pairs,
               "eval/rewards_chosen": rc / n, "eval/rewards_rejected": rr / n}
        if n_list:
            res.update({"eval/ranking_exact": exact / n_list, "eval/plackett_luce_nll": pl / n_list})
        res[EVAL_EXAMPLES] = {"eval/accuracy": per_acc, "eval/loss": per_loss}
        return res


@object_api(RMConfig, "rm")
def train_rm(config: Union[RMConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Train a reward model; the Python twin of ``alignkit rm``."""
    cfg = as_config(RMConfig, config, overrides)
    acc = start_run(cfg)
    tok = policy_tokenizer(cfg)
    pad_id = reward_pad_token(tok)
    data = prepare_data("preference", cfg, tok, acc, seed=cfg.train.seed, margin_field=cfg.rm.margin_field)
    train_items, split_train = group_rankings(data.train)
    eval_items, split_eval = group_rankings(data.eval)
    if (split_train or split_eval) and acc.is_main_process:
        print(f"rm: {split_train + split_eval} ranking rows imply no strict order (a response listed twice?); "
              "their pairs train as separate elements")
    model = policy_model(cfg, lambda: load_reward_model(cfg.model, pad_token_id=pad_id), task_type="SEQ_CLS")
    packing = resolve_packing(model, cfg.train.packing, cfg.train.prefix_sharing, cfg.train.max_tokens_per_batch)
    task = RewardTask(pad_id, cfg.rm.center_rewards_coef, cfg.rm.loss, packing)
    trainer = Trainer(cfg, task, model, train_items, eval_items, accelerator=acc, tokenizer=tok)
    return fit_and_finish(trainer, tok, cfg, eval_items, samples=False)  # a reward model does not generate
