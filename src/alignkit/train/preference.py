"""Direct preference optimization and its family (``alignkit dpo --loss NAME``).

The losses live in :mod:`alignkit.losses.preference` (one registry). This module is the trainer:
one forward pass over chosen and rejected together, the reference log-probs from one of three
sources (a frozen model, the LoRA adapter switched off, or precomputed once), and the metrics.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import torch
from pydantic import Field, field_validator, model_validator

from alignkit.api import object_api, policy_model, policy_tokenizer
from alignkit.config import RunConfig, Section, as_config
from alignkit.data.collate import PairBatch, UnpairedBatch, collate_pairs, collate_unpaired
from alignkit.data.layout import PADDED, Packing
from alignkit.losses.preference import PREFERENCE_LOSSES, combine, loss_hparams, nll_term
from alignkit.losses.preference_variants import DISCOPOP_MONOTONE_TAU
from alignkit.models.loading import load_causal_lm
from alignkit.ops.dist import gather_cat
from alignkit.ops.logprobs import DEFAULT_CHUNK, TokenLogprobs, token_logprobs
from alignkit.ops.masked import masked_mean
from alignkit.ops.packing import resolve_packing
from alignkit.train.common import fit_and_finish, prepare_data, start_run
from alignkit.train.loop import EVAL_EXAMPLES, Task, Trainer
from alignkit.train.reference import Reference, make_reference

log = logging.getLogger(__name__)

#: Hyper-parameters with a field of their own in DPOOptions; any other keyword a registered loss
#: declares (e.g. discopop_tau) goes through ``dpo.hparams`` with no change to this module.
NAMED_HPARAMS = ("beta", "label_smoothing", "gamma", "desirable_weight", "undesirable_weight")

#: TRL's extra loss term "sft" in a loss list: the NLL of the chosen response (our sft_weight).
SFT_TERM = "sft"


def _all_hparams() -> Dict[str, Any]:
    """Every hyper-parameter some registered loss declares, with one default (for --help)."""
    out: Dict[str, Any] = {}
    for name, _ in PREFERENCE_LOSSES.items():
        for k, v in loss_hparams(name).items():
            out.setdefault(k, v)
    return out


class DPOOptions(Section):
    loss: str = Field("dpo", description="Preference loss, one of: " + ", ".join(PREFERENCE_LOSSES.names())
                      + " (the equations are in docs/preference.md). A list (TRL's multi-loss form, "
                      "e.g. [dpo, sft] with loss_weights) is split into loss, extra_losses and sft_weight.")
    loss_weight: float = Field(1.0, gt=0)
    """Weight of the main loss in a weighted sum (the first of TRL's loss_weights)."""
    beta: Optional[float] = Field(None, gt=0)
    """Strength (beta; tau for ipo, lambda for orpo). Empty: the loss's own default. Must be > 0: beta
    scales the implicit reward beta * log(pi/ref), so a negative beta trains the reverse preference
    (the rejected response up) while the logged accuracy still looks right, and 0 learns nothing."""
    label_smoothing: Optional[float] = Field(None, ge=0, le=0.5)
    """Assumed label-noise rate for cdpo/robust (and dpo's label smoothing; exo_pair's eps). Must be in
    [0, 0.5]: it is the probability that a label is flipped, and above 0.5 the labels would be read
    backwards (robust and exo_pair also need it below 0.5)."""
    gamma: Optional[float] = Field(None, ge=0)
    """SimPO target reward margin. Must be >= 0: it is a margin the chosen reward must exceed the
    rejected one by; a negative margin rewards ranking the pair the wrong way."""
    desirable_weight: float = Field(1.0, gt=0)
    """KTO weight of desirable examples (lambda_D)."""
    undesirable_weight: float = Field(1.0, gt=0)
    """KTO weight of undesirable examples (lambda_U)."""
    loss_weights: Optional[List[float]] = None
    """TRL's loss_weights: one weight per loss when ``loss`` is a list (read into loss_weight,
    extra_losses and sft_weight, then cleared)."""
    hparams: Dict[str, float] = {}
    """Other hyper-parameters by the name the loss function declares, e.g. {discopop_tau: 0.05};
    each must belong to one of the losses in use."""
    extra_losses: Dict[str, float] = {}
    """More paired losses added with weights, e.g. {hinge: 0.5}; they share beta and the other knobs.
    Each weight must be > 0: a negative weight would maximize that loss."""
    sft_weight: float = Field(0.0, ge=0)
    """Weight of an NLL term on the chosen response (length-averaged), as in RPO / DPO+SFT."""
    reference: Literal["auto", "model", "adapter", "precomputed"] = "auto"
    """Reference log-probs: model (a frozen copy), adapter (LoRA off, no second copy), precomputed
    (one pass before training, nothing in memory while training); auto = adapter with LoRA, else model."""
    ref_model: Optional[str] = None
    """Reference model path or id (default: the starting policy)."""

    @model_validator(mode="before")
    @classmethod
    def _loss_list(cls, data: Any) -> Any:
        """TRL's ``loss_type: [sigmoid, sft]`` + ``loss_weights: [1.0, 0.5]`` -> our fields."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        weights = data.pop("loss_weights", None)
        data["loss_weights"] = None
        losses = data.get("loss")
        if not isinstance(losses, (list, tuple)):
            if weights is not None:
                if len(weights) != 1:
                    raise ValueError(f"loss_weights has {len(weights)} weights for one loss")
                data["loss_weight"] = weights[0]
            return data
        losses = list(losses)
        weights = [1.0] * len(losses) if weights is None else list(weights)
        if len(weights) != len(losses):
            raise ValueError(f"loss_weights has {len(weights)} weights for {len(losses)} losses {losses}")
        if len(set(losses)) != len(losses):
            raise ValueError(f"loss list {losses} names a loss twice")
        pairs = [(n, float(w)) for n, w in zip(losses, weights)]
        main = [(n, w) for n, w in pairs if n != SFT_TERM]
        if not main:
            raise ValueError(f"loss list {losses} has no preference loss ({SFT_TERM!r} alone is SFT: use alignkit sft)")
        data["loss"], data["loss_weight"] = main[0]
        extra = dict(data.get("extra_losses") or {})
        extra.update(dict(main[1:]))
        data["extra_losses"] = extra
        for n, w in pairs:
            if n == SFT_TERM:
                data["sft_weight"] = w
        return data

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        PREFERENCE_LOSSES.get(v)  # raises with the list of choices
        return v

    @model_validator(mode="after")
    def _check(self):
        for name, weight in self.extra_losses.items():
            if not weight > 0:
                raise ValueError(f"extra_losses.{name}: weight must be > 0 (a negative weight maximizes that "
                                 f"loss, 0 computes it for nothing), got {weight}")
            spec = PREFERENCE_LOSSES.get(name)
            if not spec.paired or not PREFERENCE_LOSSES.get(self.loss).paired:
                raise ValueError(f"extra_losses: {name!r} cannot be combined with {self.loss!r} "
                                 "(kto is unpaired; combine paired losses only)")
        accepted = {k for n, _ in self.losses() for k in loss_hparams(n)}
        known = set(_all_hparams()) - set(NAMED_HPARAMS)
        for key in self.hparams:
            if key in NAMED_HPARAMS:
                raise ValueError(f"dpo.hparams.{key}: set it as dpo.{key}")
            if key not in known:
                raise ValueError(f"dpo.hparams.{key}: no registered loss takes it; the losses' own "
                                 f"hyper-parameters are: {', '.join(sorted(known))}")
            if key not in accepted:  # e.g. TRL's discopop_tau in a dumped DPOConfig for sigmoid
                log.warning("config: dpo.hparams.%s is ignored: no loss in use (%s) takes it", key,
                            ", ".join(n for n, _ in self.losses()))
        tau = {**loss_hparams("discopop"), **self.hparams_for("discopop")}["discopop_tau"]
        if "discopop" in dict(self.losses()) and tau < DISCOPOP_MONOTONE_TAU:
            log.warning("dpo: discopop with discopop_tau=%g < %.3f: at policy = reference the loss rises with "
                        "the margin, so training starts by ranking pairs the wrong way (docs/preference.md); "
                        "dpo.hparams.discopop_tau=0.2 learns from the start", tau, DISCOPOP_MONOTONE_TAU)
        return self

    def hparams_for(self, name: str) -> Dict[str, Any]:
        """The hyper-parameters this loss accepts, from the fields that are set."""
        accepted = loss_hparams(name)
        out = {k: getattr(self, k) for k in NAMED_HPARAMS if k in accepted and getattr(self, k) is not None}
        out.update({k: v for k, v in self.hparams.items() if k in accepted})
        return out

    def losses(self) -> List[Tuple[str, float]]:
        return [(self.loss, self.loss_weight)] + list(self.extra_losses.items())

    @property
    def needs_reference(self) -> bool:
        return any(PREFERENCE_LOSSES.get(n).needs_reference for n, _ in self.losses())

    @property
    def paired(self) -> bool:
        return PREFERENCE_LOSSES.get(self.loss).paired


class DPOConfig(RunConfig):
    """Direct preference optimization and its family."""

    command: Literal["dpo"] = "dpo"
    dpo: DPOOptions = DPOOptions()
    """Loss and reference options."""


def _split(tl: TokenLogprobs, B: int):
    logps, lengths = tl.sum(), tl.lengths()
    return logps[:B], logps[B:], lengths[:B], lengths[B:]


class PreferenceTask(Task):
    name = "dpo"

    def __init__(self, opts: DPOOptions, pad_id: int, reference: Optional[Reference],
                 logprob_chunk: int = DEFAULT_CHUNK, packing: Packing = PADDED):
        self.opts, self.pad_id, self.ref, self.logprob_chunk = opts, pad_id, reference, logprob_chunk
        self.packing = packing
        self.max_tokens = packing.max_tokens
        self.specs = [(PREFERENCE_LOSSES.get(n), w) for n, w in opts.losses()]

    # ------------------------------------------------------------------ batching
    def collate(self, items: List[Dict[str, Any]]):
        """Pairs padded, packed or prefix-shared; KTO's examples and mismatched pairs padded or packed."""
        if self.opts.paired:
            return collate_pairs(items, self.pad_id, self.packing)
        return collate_unpaired(items, self.pad_id, self.packing)

    def item_tokens(self, item: Dict[str, Any]) -> int:
        p = len(item["prompt_ids"])
        if self.opts.paired:
            return p * (1 if self.packing.share_prompt else 2) + len(item["chosen_ids"]) + len(item["rejected_ids"])
        return 2 * p + len(item["completion_ids"]) + len(item.get("kl_completion_ids", item["completion_ids"]))

    def units(self, batch) -> float:
        return float(len(batch))

    # ------------------------------------------------------------------ loss
    def _paired(self, model, batch: PairBatch):
        B = batch.num_pairs
        pc, pr, lc, lr = _split(token_logprobs(model, batch.seq, chunk_size=self.logprob_chunk), B)
        rc = rr = None
        if self.ref is not None:
            rc, rr = self.ref.pair_logps(model, batch)
        outs = []
        for spec, w in self.specs:
            out = spec.fn(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, labels=batch.soft_label,
                          **self.opts.hparams_for(spec.name))
            outs.append((w, out, spec.name))
        primary = outs[0][1]
        weighted = len(outs) > 1 or outs[0][0] != 1.0
        total = combine([(w, o) for w, o, _ in outs], names=[n for _, _, n in outs]) if weighted else primary
        losses = total.losses
        metrics = dict(primary.metrics)
        metrics.update({k: v for k, v in total.metrics.items() if k.endswith("/loss")})
        if self.opts.sft_weight:
            nll = nll_term(pc, lc)
            losses = losses + self.opts.sft_weight * nll.losses
            metrics.update(nll.metrics)
        metrics.update({"logps/chosen": pc.detach(), "logps/rejected": pr.detach(),
                        "lengths/chosen": lc.detach(), "lengths/rejected": lr.detach()})
        return losses, metrics, (pc, pr, lc, lr, rc, rr)

    def _unpaired(self, model, batch: UnpairedBatch, gather: bool = False):
        tl = token_logprobs(model, batch.seq, chunk_size=self.logprob_chunk)
        with torch.no_grad():  # the KL reference point carries no gradient (KTO eq. 8)
            kl_tl = token_logprobs(model, batch.kl_seq, chunk_size=self.logprob_chunk)
        ref, ref_kl = self.ref.unpaired_logps(model, batch)
        kl_policy, kl_ref = kl_tl.sum().detach(), ref_kl.detach()
        if gather:  # training: one z0 from the mismatched pairs of every process (2 processes = 1)
            kl_policy, kl_ref = gather_cat(kl_policy), gather_cat(kl_ref)
        out = PREFERENCE_LOSSES.get("kto").fn(tl.sum(), ref, batch.label, kl_policy_logps=kl_policy,
                                             kl_ref_logps=kl_ref, **self.opts.hparams_for("kto"))
        metrics = dict(out.metrics)
        lab = batch.label.float()
        metrics["logps/desirable"] = masked_mean(tl.sum().detach(), lab)
        metrics["lengths/completion"] = tl.lengths().detach()
        return out.losses, metrics, (tl.sum(), ref, batch.label)

    def loss(self, model, batch):
        losses, metrics, _ = self._paired(model, batch) if self.opts.paired else \
            self._unpaired(model, batch, gather=True)
        return losses.sum(), metrics

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model, items, batch_size: int) -> Dict[str, float]:
        """Held-out loss, metrics and preference accuracy.

        ``eval/accuracy`` is the share of pairs ranked right by the implicit reward (policy minus
        reference log-ratio) or, for reference-free losses, by the length-normalized log-probs.
        Each pair's (or example's) accuracy and loss also come back under ``EVAL_EXAMPLES``, for the
        held-out alert's paired test.
        """
        device = next(model.parameters()).device
        sums: Dict[str, float] = {}
        n = 0
        by_row: Dict[int, Dict[bool, List[float]]] = {}
        per_loss: List[float] = []
        per_acc: List[float] = []
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            b = self.collate(chunk).to(device)
            if self.opts.paired:
                losses, metrics, (pc, pr, lc, lr, rc, rr) = self._paired(model, b)
                if rc is not None:
                    sc, sr = pc - rc, pr - rr  # implicit rewards (up to beta)
                else:
                    sc, sr = pc / lc.clamp(min=1), pr / lr.clamp(min=1)
                # ties count half: before training policy == reference and every pair ties. The loss's
                # rewards/accuracy is the same quantity; held out it is logged once, as eval/accuracy
                metrics = {k: v for k, v in metrics.items() if k != "rewards/accuracy"}
                metrics["accuracy"] = (sc > sr).float() + 0.5 * (sc == sr).float()
                per_acc += metrics["accuracy"].tolist()
            else:
                losses, metrics, (pol, ref, labels) = self._unpaired(model, b)
                reward = (pol - ref).tolist()
                for it, r, lab in zip(chunk, reward, labels.tolist()):
                    by_row.setdefault(it["row"], {True: [], False: []})[bool(lab)].append(r)
            k = len(b)
            n += k
            sums["loss"] = sums.get("loss", 0.0) + float(losses.sum())
            per_loss += losses.float().tolist()
            for key, v in metrics.items():
                v = v.float()
                sums[key] = sums.get(key, 0.0) + (float(v.sum()) if v.dim() else float(v) * k)
        out: Dict[str, Any] = {f"eval/{k}": v / max(n, 1) for k, v in sums.items()}
        if not self.opts.paired:
            pairs = [(d, u) for g in by_row.values() for d in g[True] for u in g[False]]
            if pairs:  # rows that were pairs split into desirable/undesirable halves
                per_acc = [1.0 if d > u else 0.5 if d == u else 0.0 for d, u in pairs]
                out["eval/accuracy"] = sum(per_acc) / len(pairs)
        out[EVAL_EXAMPLES] = {"eval/loss": per_loss, **({"eval/accuracy": per_acc} if per_acc else {})}
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {}


def assign_kl_partners(items: List[Dict[str, Any]], seed: int) -> None:
    """Give each unpaired item a fixed mismatched completion for KTO's KL reference point.

    Fixed per item (not per batch), so the reference log-probs of the mismatched pair can be
    precomputed and the estimate does not depend on how batches happen to be drawn.
    """
    if len(items) < 2:
        raise ValueError("kto needs at least two examples (the KL reference point pairs each prompt with "
                         "another example's completion)")
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    for a, b in zip(order, order[1:] + order[:1]):
        items[a]["kl_completion_ids"] = items[b]["completion_ids"]


@object_api(DPOConfig, "dpo")
def train_dpo(config: Union[DPOConfig, Dict[str, Any], None] = None, **overrides) -> Dict[str, Any]:
    """Train with a preference loss; the Python twin of ``alignkit dpo``."""
    cfg = as_config(DPOConfig, config, overrides)
    opts = cfg.dpo
    acc = start_run(cfg)
    tok = policy_tokenizer(cfg)
    kind = "preference" if opts.paired else "unpaired"
    data = prepare_data(kind, cfg, tok, acc, seed=cfg.train.seed)
    if not opts.paired:
        assign_kl_partners(data.train, cfg.train.seed)
        if data.eval:
            assign_kl_partners(data.eval, cfg.train.seed)
    model = policy_model(cfg, lambda: load_causal_lm(cfg.model))
    packing = resolve_packing(model, cfg.train.packing, cfg.train.prefix_sharing and opts.paired,
                              cfg.train.max_tokens_per_batch)
    reference = make_reference(cfg, model, data, tok, acc, packing) if opts.needs_reference else None
    if reference is not None and reference.packing is not None:
        packing = reference.packing  # a separate reference model that cannot pack (or share) exactly
    task = PreferenceTask(opts, tok.pad_token_id, reference, cfg.train.logprob_chunk, packing)
    trainer = Trainer(cfg, task, model, data.train, data.eval, accelerator=acc, tokenizer=tok)
    return fit_and_finish(trainer, tok, cfg, data.eval, loss=opts.loss,
                          reference=reference.mode if reference else "none")
