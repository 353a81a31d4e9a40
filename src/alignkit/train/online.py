"""The one online-RL task: PPO, GRPO, Dr. GRPO, DAPO, GSPO, RLOO and REINFORCE++ are presets of it.

One training step of the shared loop is one rollout batch. :meth:`RLTask.plan` is that step read top to
bottom, one comment per stage: rollout -> reward shaping -> rollout-time log-probs -> KL to the reference
(once per rollout) -> KL placement -> advantage -> whitening -> one :class:`~alignkit.train.loop.Update` per
optimizer update (``epochs x num_minibatches`` over the shuffled rollout). Each stage is a pure function
of :mod:`alignkit.train.rl_stages` or :mod:`alignkit.advantages`, chosen through its registry
(:data:`~alignkit.advantages.ADVANTAGES`, :data:`~alignkit.train.rl_stages.KL_PLACEMENTS`) whose entries
declare what the task must know (a critic, groups, normalized advantages, the KL in the loss); no code
here compares a stage's name. :meth:`RLTask.loss` applies the policy loss
(:data:`~alignkit.losses.policy.RL_POLICY_LOSSES`) with the aggregation
(:data:`~alignkit.losses.policy.AGGREGATIONS`), plus the KL loss term, the value loss (critic) and the
entropy bonus where configured, reading only its micro-batch (:class:`~alignkit.train.rl_batch.RLBatch`
carries the rollout's KL coefficient and critic warm-up flag). No algorithm overrides ``plan``: an
algorithm is a preset (:data:`alignkit.train.rl_config.PRESETS`).

Everything random (sampling, shuffling, extra prompts of dynamic sampling) draws from torch's global
RNG, which checkpoints save and restore, so a resumed run repeats a straight one exactly.

Log-probs of a rollout ("old" = behaviour policy, reference, values) are computed with the very
micro-batches of the first epoch (same rows, same padding, same code path as the loss), so at the
first update the ratio pi/pi_old is exactly 1 and the KL of an unchanged policy to its reference is 0.
With one update per rollout, no critic and a fixed loss-placed KL (:attr:`RLTask.on_policy_stats`) the
loss pass itself gives the old log-probs and the KL/entropy metrics, and only the reference pass runs
before training. Rollout rows and the micro-batch type live in :mod:`alignkit.train.rl_batch`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from transformers import TrainerState

from alignkit.advantages import (ADVANTAGES, AdaptiveKLController, AdvantageInputs, FixedKLController,
                                 RunningMoments, whiten)
from alignkit.api import current, given_adapter_policy, object_api, policy_model, policy_tokenizer, reference_model
from alignkit.config import as_config
from alignkit.data.layout import SeqBatch, SharedRows, share_row_prompts
from alignkit.eval.markers import marker_correlations
from alignkit.eval.metrics import distinct_n
from alignkit.losses.policy import AGGREGATIONS, RL_POLICY_LOSSES, aggregate_token_losses, kl_penalty_loss
from alignkit.losses.value import explained_variance, value_loss
from alignkit.models.default import resolve_model_path
from alignkit.models.loading import load_causal_lm, precast_frozen_linears
from alignkit.ops.logprobs import TokenLogprobs, row_logprobs
from alignkit.ops.masked import masked_mean
from alignkit.ops.packing import resolve_packing
from alignkit.ops.wrappers import unwrap
from alignkit.rewards import build_reward
from alignkit.rollout.generate import Rollout, generate
from alignkit.train import metric_keys as K
from alignkit.train.common import console, fit_and_finish, prepare_data, start_run
from alignkit.train.critic import PolicyWithValue, build_critic
from alignkit.train.loop import EVAL_EXAMPLES, Task, Trainer, Update
from alignkit.train.rl_batch import (RLBatch, disable_dropout, last_response_index, loss_aggregation, policy_of,
                                     response_index, rows_of, select_rows)
from alignkit.train.rl_config import RLConfig
from alignkit.train.rl_stages import KL_PLACEMENTS, kl_to_reference, place_kl, shape_rewards
from alignkit.train.rundir import release


def _cuda_devices() -> List[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


class RLTask(Task):
    """The online-RL task; its stages are chosen by ``cfg.algo`` (an :class:`RLOptions` section)."""

    def __init__(self, cfg, tokenizer, reward, gold=None, ref_model=None, adapter_ref: bool = False, engine=None,
                 prompts: Sequence[Dict[str, Any]] = ()):
        self.cfg, self.tok, self.gen = cfg, tokenizer, cfg.generation
        self.opts = o = cfg.algo
        self.name = cfg.preset_name
        self.reward, self.gold = reward, gold
        self.ref_model, self.adapter_ref, self.engine = ref_model, adapter_ref, engine
        self.temperature = cfg.generation.temperature or 1.0
        self.samples_per_prompt = o.num_generations
        self.advantage, self.placement = ADVANTAGES.get(o.advantage), KL_PLACEMENTS.get(o.kl_placement)
        self.policy_loss = RL_POLICY_LOSSES.get(o.policy_loss)
        self.agg, self.token_units = loss_aggregation(o.aggregation)
        self.max_tokens = cfg.train.max_tokens_per_batch  # micro-batches by tokens (schedule); None: rows
        self.max_len = cfg.generation.max_new_tokens
        self.agg_max_len = self.max_len if AGGREGATIONS.get(self.agg).needs_max_len else None
        self.critic = self.advantage.needs_critic
        self.kl_ctl = AdaptiveKLController(o.kl_coef, o.kl_target, o.kl_horizon) if o.adaptive_kl \
            else FixedKLController(o.kl_coef)
        self.moments = RunningMoments() if o.normalize_reward else None
        self.prompts = list(prompts)  # the pool dynamic sampling draws extra prompts from
        self.steps_done = 0  # rollouts so far (critic warm-up); saved in checkpoints
        self._engine_stale = True  # the engine starts from the checkpoint on disk, not from resumed weights
        #: a group's samples share their prompt in every pass (set by build_task after checking the models)
        self.share_prompts = False

    # ------------------------------------------------------------------ set-up
    def param_groups(self, model):
        """With a critic and ``value.lr``: the critic (value head or separate critic) in its own group."""
        lr = self.cfg.value.lr
        if not self.critic or lr is None:
            return None
        inner = unwrap(model)
        critic = inner.value_head if inner.value_head is not None else inner.critic
        ids = {id(p) for p in critic.parameters()}
        trainable = [p for p in inner.parameters() if p.requires_grad]
        return [{"params": [p for p in trainable if id(p) not in ids]},
                {"params": [p for p in trainable if id(p) in ids], "lr": lr}]

    @property
    def rollout_plan(self):
        """The step's rollout shape on this run's processes (:meth:`OnlineRLConfig.rollout_plan`)."""
        return self.cfg.rollout_plan(self.world)

    def batch_shape(self, cfg) -> Tuple[int, int]:
        """Prompts per process per step: ``train.batch_size x train.grad_accum``, or, given TRL's batch in
        completions (``completions_per_device``), ``completions_per_device x steps_per_generation /
        num_generations`` in one piece."""
        plan = self.rollout_plan
        return (plan.prompts, 1) if plan.trl else super().batch_shape(cfg)

    def update_shape(self) -> Tuple[int, int]:
        """(epochs, minibatches per epoch) of optimizer updates per rollout."""
        return self.opts.epochs, self.rollout_plan.updates

    @property
    def several_updates(self) -> bool:
        epochs, updates = self.update_shape()  # the plan's updates: capped by the rollout, or TRL's batch keys
        return epochs * updates > 1

    def forward(self, model, seq: SeqBatch, with_entropy: bool = True, detach_value: bool = False,
                shared: Optional[SharedRows] = None) -> Tuple[TokenLogprobs, Optional[torch.Tensor]]:
        """Per-token log-probs (with entropy) of the policy and, with a critic, values (B, T-1).
        ``shared``: the same rows with each prompt once; the results come back in the rows' label space."""
        if self.critic:
            return model(input_ids=seq.input_ids, attention_mask=seq.attention_mask, loss_mask=seq.loss_mask,
                         with_entropy=with_entropy, detach_value=detach_value, shared=shared)
        return self._logprobs(model, seq, shared, with_entropy), None

    def _logprobs(self, model, seq: SeqBatch, shared: Optional[SharedRows], with_entropy: bool) -> TokenLogprobs:
        return row_logprobs(model, seq, shared, temperature=self.temperature, with_entropy=with_entropy,
                            chunk_size=self.cfg.train.logprob_chunk)

    def _share(self, seq: SeqBatch) -> Optional[SharedRows]:
        """The prefix-shared layout of host-side rows when the run shares prompts (None: the rows as they are)."""
        return share_row_prompts(seq, self.tok.pad_token_id) if self.share_prompts else None

    def collate(self, items):  # rollouts replace collation (see plan)
        return items

    def units(self, mb) -> float:
        return float(mb.mask.sum()) if self.token_units else float(len(mb))

    @property
    def on_policy_stats(self) -> bool:
        """One update per rollout, no critic, the KL in the loss at a fixed coefficient (the GRPO family's
        defaults): the loss pass runs at the rollout-time weights, so it *is* the old-log-prob pass. The
        no-grad policy pass is skipped; the ratio is exactly 1 (old log-probs = the pass's own, detached)
        and the KL and entropy metrics come from the loss pass (same numbers: grad and no-grad passes
        compute alike, ops/attention.py). Only the reference pass runs before training."""
        return (not self.several_updates and not self.critic and self.placement.in_loss
                and isinstance(self.kl_ctl, FixedKLController) and self.kl_ctl.value > 0)

    @property
    def has_reference(self) -> bool:
        return self.ref_model is not None or self.adapter_ref

    # ------------------------------------------------------------------ helpers
    def _device(self, model):
        return self.acc.device if self.acc is not None else next(unwrap(model).parameters()).device

    def _autocast(self):
        return self.acc.autocast() if self.acc is not None else contextlib.nullcontext()

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """All processes' values (for global means and statistics); the tensor itself on one process."""
        if self.acc is None or self.acc.num_processes == 1:
            return t
        return self.acc.gather(t.to(self.acc.device)).cpu()

    @property
    def world(self) -> int:
        return self.acc.num_processes if self.acc is not None else 1

    # ------------------------------------------------------------------ rollout
    def trainer_state(self):
        """TRL's ``trainer_state`` argument of reward functions: a ``transformers.TrainerState`` with the
        rollouts done so far (``global_step``) and ``max_steps`` (0 when the run is set by epochs)."""
        return TrainerState(global_step=self.steps_done, max_steps=self.cfg.train.max_steps or 0,
                            num_train_epochs=self.cfg.train.epochs)

    def _reward_kwargs(self, ro: Rollout, where: str) -> Dict[str, Any]:
        """What the reward sources get beside prompts, texts and rows (reward functions read some of it)."""
        if not hasattr(self.reward, "check_inputs"):  # a plain RewardSource
            return {}
        return {"completion_ids": ro.response_ids, "trainer_state": self.trainer_state(), "where": where}

    @torch.no_grad()
    def score(self, ro: Rollout, items: List[Dict[str, Any]], prefix: str = "",
              where: str = "") -> Tuple[torch.Tensor, Dict[str, float]]:
        """Rewards (N,) of a rollout and its metrics: rewards/mean, std, each component (as
        ``rewards/<name>`` and TRL's ``rewards/<name>/mean``, ``/std``), gold, rollout/length_mean,
        rollout/eos_rate, diversity/distinct_2. Each row's prompt text and rewards are recorded in
        ``ro.info`` (the completions table). ``where`` names the batch in a reward function's error."""
        prompts = [items[i]["prompt"] for i in ro.prompt_index]
        rows = [items[i].get("fields", {}) for i in ro.prompt_index]
        n_prompts = len(set(ro.prompt_index))
        where = where or (f"at step {self.steps_done + 1} (rollout of {n_prompts} prompts x "
                          f"{max(1, len(ro) // max(n_prompts, 1))} = {len(ro)} completions)")
        kw = self._reward_kwargs(ro, where)
        raw = torch.tensor(self.reward(prompts, ro.texts, rows, **kw), dtype=torch.float32)  # (N,)
        every = self._gather(raw)
        m = {f"{prefix}rewards/mean": float(every.mean()),
             f"{prefix}rewards/std": float(every.std()) if every.numel() > 1 else 0.0}
        components = dict(getattr(self.reward, "last_components", {}))
        for name, vals in components.items():
            if name in ("mean", "std", "gold"):
                continue
            allv = self._gather(torch.tensor(vals, dtype=torch.float32))
            ok = allv[~torch.isnan(allv)]  # None entries (a function that does not apply) are left out
            if ok.numel():  # unweighted per-component mean (and TRL's keys for the same numbers)
                m[f"{prefix}rewards/{name}"] = m[f"{prefix}rewards/{name}/mean"] = float(ok.mean())
                m[f"{prefix}rewards/{name}/std"] = float(ok.std()) if ok.numel() > 1 else 0.0
        if self.gold is not None:
            gkw = self._reward_kwargs(ro, where) if hasattr(self.gold, "check_inputs") else {}
            gold = torch.tensor(self.gold(prompts, ro.texts, rows, **gkw), dtype=torch.float32)
            m[f"{prefix}rewards/gold"] = float(self._gather(gold).mean())
        ro.info = [{"prompt": items[i].get("prompt_text", items[i]["prompt"]),
                    "rewards": {k: (None if v[r] != v[r] else v[r]) for k, v in components.items()},
                    "reward": float(raw[r])} for r, i in enumerate(ro.prompt_index)]
        m[f"{prefix}rollout/length_mean"] = float(self._gather(ro.response_lengths).mean())
        m[f"{prefix}rollout/eos_rate"] = float(self._gather(ro.ended.float()).mean())
        m[f"{prefix}diversity/distinct_2"] = distinct_n(ro.texts, 2)
        # does the reward pay for length, hedges, lists or agreement? (this process's rollout)
        m.update(marker_correlations(raw.tolist(), ro.texts, ro.response_lengths.tolist(), prefix))
        return raw, m

    @torch.no_grad()
    def rollout(self, model, items: List[Dict[str, Any]]) -> Tuple[Rollout, torch.Tensor, Dict[str, float]]:
        """Sample ``samples_per_prompt`` responses per item (consecutive rows per prompt) and score them.
        Returns the rollout, the sequence rewards used for training (missing-EOS penalty applied) and
        the metrics."""
        policy = policy_of(model)
        if self.engine is not None and self._engine_stale:
            self.engine.update_weights(policy)
            self._engine_stale = False
        # one draw from the global stream (identical on every process, restored on resume), then a
        # per-process seed so that processes do not sample with the same random numbers
        seed = int(torch.randint(0, 2**31 - 1, (1,)))
        with torch.random.fork_rng(devices=_cuda_devices()):
            torch.manual_seed(seed + 1000003 * (self.acc.process_index if self.acc is not None else 0))
            ro = generate(policy, self.tok, [it["prompt_ids"] for it in items], self.gen,
                          n=self.samples_per_prompt, engine=self.engine, compute_logprobs=False)
        raw, metrics = self.score(ro, items)
        return ro, raw, metrics

    # ------------------------------------------------------------------ dynamic sampling (DAPO)
    def draw_prompts(self, n: int) -> List[Dict[str, Any]]:
        """``n`` more prompts for this process, drawn from the training prompts with torch's global RNG
        (one draw for every process, identical on each, so each takes its own share; resumable)."""
        if not self.prompts:
            raise ValueError("dynamic sampling needs the task's prompt pool (RLTask(prompts=...))")
        world, rank = self.world, (self.acc.process_index if self.acc is not None else 0)
        idx = torch.randint(0, len(self.prompts), (n * world,)).tolist()
        return [self.prompts[i] for i in idx[rank * n:(rank + 1) * n]]

    def sample(self, model, items: List[Dict[str, Any]]) -> Tuple[Rollout, torch.Tensor, Dict[str, float]]:
        """The rollout stage: :meth:`rollout` of the step's prompts; with ``dynamic_sampling`` (Yu et al.
        2025, eq. 11) groups whose rewards are all equal are dropped and more prompts are sampled until
        the batch holds ``len(items)`` informative groups or ``max_sampling_rounds`` rounds were run
        (then dropped groups top it up, counted). The reward metrics are those of the step's own prompts."""
        o = self.opts
        ro, raw, metrics = self.rollout(model, items)
        if not o.dynamic_sampling:
            metrics[K.SAMPLING_ROUNDS] = 1.0
            return ro, raw, metrics
        G, target = self.samples_per_prompt, len(items)
        kept: List[Tuple[Rollout, torch.Tensor, List[int]]] = []  # (rollout, its rewards, rows of one group)
        spare: List[Tuple[Rollout, torch.Tensor, List[int]]] = []
        rounds = dropped = 0
        while True:
            rounds += 1
            grouped = raw.view(-1, G)
            informative = (grouped.max(dim=1).values > grouped.min(dim=1).values).tolist()
            for g, ok in enumerate(informative):
                (kept if ok else spare).append((ro, raw, list(range(g * G, (g + 1) * G))))
            dropped += informative.count(False)
            short = torch.tensor([float(max(0, target - len(kept)))])
            if float(self._reduce(short)[0]) == 0 or rounds >= o.max_sampling_rounds:
                break
            ro, raw, _ = self.rollout(model, self.draw_prompts(target))
        chosen = kept[:target]
        n_short = target - len(chosen)
        chosen += spare[:n_short]
        metrics.update({K.SAMPLING_ROUNDS: float(rounds),
                        K.DROPPED_GROUPS: float(self._reduce(torch.tensor([float(dropped)]))[0]),
                        K.SHORT_GROUPS: float(self._reduce(torch.tensor([float(n_short)]))[0])})
        ro = select_rows([(r, rows) for r, _, rows in chosen], self.tok.pad_token_id)
        raw = torch.cat([rw[torch.tensor(rows)] for _, rw, rows in chosen])
        return ro, raw, metrics

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a 1-D tensor over processes (itself on one process)."""
        if self.acc is None or self.acc.num_processes == 1:
            return t
        return self.acc.reduce(t.to(self.acc.device), reduction="sum").cpu()

    # ------------------------------------------------------------------ the stages
    def plan(self, model, items, micro_batch_size: int) -> Iterator[Update]:
        """One step of online RL (GRPO, PPO, ... by preset), its stages in order: each is a pure function
        (:mod:`alignkit.train.rl_stages`, :mod:`alignkit.advantages`) chosen through its registry and given
        values. Everything the loss needs rides on the micro-batches."""
        o, G = self.opts, self.samples_per_prompt
        # 1. rollout: G completions per prompt, scored (DAPO's dynamic sampling keeps informative groups)
        ro, raw, metrics = self.sample(model, items)
        sched = self._schedule_rollout(ro, micro_batch_size)
        mask = ro.sequences.loss_mask[:, 1:].float()  # (N, T-1) response tokens
        N, T1 = mask.shape
        lengths = [len(r) for r in ro.response_ids]
        warmup = self.critic and self.steps_done < self.cfg.value.warmup_steps  # the critic trains alone
        self.steps_done += 1
        # 2. reward shaping: missing-EOS and overlong penalties, running normalization, clipping
        scores = shape_rewards(raw, ro.ended, ro.response_lengths, missing_eos_penalty=self.cfg.missing_eos_penalty,
                               overlong_buffer=o.overlong_buffer, overlong_factor=o.overlong_penalty,
                               max_len=self.max_len, moments=self.moments, reward_clip=o.reward_clip,
                               gather=self._gather)
        # 3. rollout-time log-probs (old policy, reference) and values, on the first epoch's micro-batches;
        #    an on-policy run takes the old log-probs and its KL/entropy metrics from the loss pass instead
        stats: Dict[str, torch.Tensor] = {}
        deferred = self.has_reference and self.on_policy_stats
        metric_scale = None
        if self.has_reference or self.several_updates or self.critic:
            stats = self.rollout_stats(model, ro, sched[:len(sched) // o.epochs], ref=self.has_reference,
                                       policy=not deferred)
            if deferred:
                metric_scale = self._loss_metric_scale(mask)
            else:
                metrics[K.ENTROPY] = float(masked_mean(stats["entropy"], mask))
        # 4. KL to the reference, once per rollout: the metrics, the adaptive controller's input, the penalty
        beta = self.kl_ctl.value
        kl = None
        if self.has_reference and not deferred:
            k1, kl = kl_to_reference(stats["old_logps"], stats["ref_logps"], mask, o.kl_estimator)  # (N, T-1)
            metrics.update(self._kl_metrics(k1, kl, mask, beta))
            self.kl_ctl.update(metrics[K.KL_PENALTY], N * self.world)
        # 5. KL placement: into the token rewards, the sequence reward, or (the loss term) nowhere here
        scores, token_rewards = place_kl(o.kl_placement, scores, kl, beta, last_response_index(ro.prompt_lengths,
                                                                                                lengths))
        metrics[K.REWARD_SHAPED] = float(self._gather(scores).mean())
        if G > 1:
            grouped = self._gather(raw).view(-1, G)
            metrics[K.ZERO_STD_GROUPS] = float((grouped.max(1).values == grouped.min(1).values).float().mean())
        # 6. advantage: the registered estimator, given values and the hyper-parameters it names
        judged = (token_rewards * mask).sum(-1) if self.placement.token_rewards else scores
        inputs = AdvantageInputs(scores=judged, token_rewards=token_rewards, mask=mask, group_size=G,
                                 values=stats.get("values"), response_index=response_index(ro.prompt_lengths,
                                                                                           lengths, T1),
                                 reduce=self._reduce if self.world > 1 else None)
        targets = self.advantage(inputs, o)
        adv = targets["advantages"]
        # 7. whitening over the response tokens (an estimator that normalizes already is left as it is)
        if o.whiten_advantages and not self.advantage.normalized:
            if adv.dim() == 1:
                adv = adv[:, None] * mask
            adv = whiten(adv, mask, self._reduce if (o.whiten_scope == "global" and self.world > 1) else None)
        tok_adv = adv if adv.dim() == 2 else adv[:, None].expand(N, T1)
        metrics[K.ADV_MEAN] = float(masked_mean(tok_adv, mask))
        metrics[K.ADV_STD] = float(masked_mean((tok_adv - masked_mean(tok_adv, mask)).square(), mask).sqrt())
        if self.critic:
            metrics.update({K.EXPLAINED_VARIANCE: float(explained_variance(stats["values"], targets["returns"], mask)),
                            K.VALUE_MEAN: float(masked_mean(stats["values"], mask))})
        # 8. updates: epochs x minibatches of micro-batches, each carrying its targets and the rollout's values
        per_row = {"advantages": adv,
                   "old_logps": stats.get("old_logps") if (self.several_updates or self.critic) else None,
                   "ref_logps": stats.get("ref_logps") if (self.placement.in_loss and beta > 0) else None,
                   "returns": targets.get("returns"), "old_values": stats.get("values"),
                   # TRL's mask_truncated_completions: responses cut at max_new_tokens leave the loss
                   "keep": ro.ended.float() if o.mask_truncated_completions else None}
        rollout = {"beta": beta, "warmup": warmup, "metric_scale": metric_scale}
        yield from self.yield_updates(ro, sched, per_row, metrics, table=self.completions_table(ro, tok_adv, mask),
                                      rollout=rollout)

    def _schedule_rollout(self, ro: Rollout, micro_batch_size: int) -> List[List[List[int]]]:
        """The rollout's :meth:`schedule`. A micro-batch holds micro_batch_size prompts with all their samples
        (an item of the rollout batch is a prompt, as an offline item is a row), so each group's prompt runs
        once in it; TRL's batch: micro-batches of completions_per_device sequences."""
        plan = self.rollout_plan
        micro_rows = plan.micro_rows if plan.trl else micro_batch_size * self.samples_per_prompt
        return self.schedule(len(ro), micro_rows, lengths=ro.sequences.attention_mask.sum(-1).tolist(),
                             groups=ro.prompt_index if self.share_prompts else None)

    def _kl_metrics(self, k1: torch.Tensor, penalty: torch.Tensor, mask: torch.Tensor, beta: float
                    ) -> Dict[str, float]:
        """kl/ref (k1, nats per sequence), kl/ref_token (per token), kl/penalty (the named estimator, per
        sequence) and kl/coef over every process's rollout, from :func:`kl_to_reference`."""
        m = {K.KL_REF: float(self._gather(k1.sum(-1)).mean())}
        m[K.KL_REF_TOKEN] = float(self._gather(k1.sum()[None]).sum() / self._gather(mask.sum()[None]).sum()
                                  .clamp(min=1.0))
        return {**m, K.KL_PENALTY: float(self._gather(penalty.sum(-1)).mean()), K.KL_COEF: beta}

    def completions_table(self, ro: Rollout, tok_adv: torch.Tensor, mask: torch.Tensor) -> Optional[List[Dict[str, Any]]]:
        """This process's rows of the step's rollout for the completions table: prompt, completion, each
        reward, the total and the advantage (a token-level advantage as its mean over the response). Every
        row with ``log_completions``; else the first rows (a couple of groups) for report.html."""
        if ro.info is None or (self.acc is not None and not self.acc.is_main_process):
            return None
        adv = (tok_adv * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        n = len(ro) if self.cfg.log_completions else min(len(ro), max(8, 2 * self.samples_per_prompt), 16)
        return [{"prompt": ro.info[r]["prompt"], "completion": ro.texts[r], **ro.info[r]["rewards"],
                 "reward": ro.info[r]["reward"], "advantage": float(adv[r]), "ended": bool(ro.ended[r])}
                for r in range(n)]

    def loss(self, model, mb: RLBatch):
        """Policy loss (registry entry) + beta * KL (a loss-placed KL) + vf_coef * value loss - entropy bonus,
        each aggregated the same way; during critic warm-up the value loss alone. Reads the micro-batch only:
        its targets and its rollout's beta, warm-up flag and metric scale (:meth:`plan`)."""
        o = self.opts
        deferred = mb.metric_scale is not None
        tl, values = self.forward(model, mb.seq, with_entropy=o.ent_coef > 0 or deferred,
                                  detach_value=mb.warmup, shared=mb.shared)
        mask = mb.mask
        kw = {"aggregation": self.agg, "max_len": self.agg_max_len}
        units = max(self.units(mb), 1e-12)
        metrics: Dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=mask.device)
        if not mb.warmup:
            pg = self.policy_loss.fn(tl.logps, mb.old_logps, mb.advantages, mask, clip_eps=o.clip_eps,
                                     clip_eps_high=o.clip_eps_high, **kw)
            total = pg.losses.sum()
            metrics.update(pg.metrics)
            metrics[K.POLICY_LOSS] = pg.losses.detach().sum() / units
            if mb.ref_logps is not None:
                total = total + mb.beta * kl_penalty_loss(tl.logps, mb.ref_logps, mask, estimator=o.kl_estimator,
                                                          **kw).sum()
            if o.ent_coef:
                total = total - o.ent_coef * aggregate_token_losses(tl.entropy, mask, self.agg,
                                                                    max_len=kw["max_len"]).sum()
        if deferred:
            metrics.update(self._rollout_metrics_from_loss_pass(tl, mb, units))
        if values is not None:
            vf = value_loss(values, mb.old_values, mb.returns, mask, clip_range=o.vf_clip, **kw)
            total = total + o.vf_coef * vf.losses.sum()
            metrics.update({K.VALUE_LOSS: vf.losses.detach().sum() / units, **vf.metrics})
        return total, metrics

    def _loss_metric_scale(self, mask: torch.Tensor) -> Dict[str, float]:
        """The factors that turn a micro-batch's sums into the loop's per-unit means (``sum_k v_k w_k / W``,
        W the update's units) of a per-sequence and a per-token metric: W / sequences and W / tokens,
        all counted over every process."""
        n_seq = float(self._reduce(torch.tensor([float(mask.shape[0])]))[0])
        n_tok = max(float(self._reduce(mask.sum()[None])[0]), 1.0)
        units = n_tok if self.token_units else n_seq
        return {"seq": units / max(n_seq, 1.0), "tok": units / n_tok}

    @torch.no_grad()
    def _rollout_metrics_from_loss_pass(self, tl: TokenLogprobs, mb: RLBatch, units: float
                                        ) -> Dict[str, torch.Tensor]:
        """kl/ref, kl/ref_token, kl/penalty, kl/coef and entropy of this micro-batch's rows, from the loss
        pass (:attr:`on_policy_stats`), as the values the loop averages over the update into the rollout
        metrics :meth:`plan` would have computed from a separate no-grad pass."""
        mask, c = mb.mask, mb.metric_scale
        k1, pen = kl_to_reference(tl.logps.detach(), mb.ref_logps, mask, self.opts.kl_estimator)
        per = lambda total, kind: total / units * c[kind]  # noqa: E731
        return {K.KL_REF: per(k1.sum(), "seq"), K.KL_REF_TOKEN: per(k1.sum(), "tok"),
                K.KL_PENALTY: per(pen.sum(), "seq"), K.KL_COEF: mask.new_tensor(mb.beta),
                K.ENTROPY: per((tl.entropy.detach() * mask).sum(), "tok")}

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"kl_ctl": self.kl_ctl.state_dict(), "steps_done": self.steps_done}
        if self.moments is not None:
            state["reward_moments"] = self.moments.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "kl_ctl" in state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.steps_done = int(state.get("steps_done", 0))
        if self.moments is not None and "reward_moments" in state:
            self.moments.load_state_dict(state["reward_moments"])

    def schedule(self, n_rows: int, micro: int, lengths: Sequence[int], groups: Optional[Sequence[int]] = None
                 ) -> List[List[List[int]]]:
        """Row indices: updates -> micro-batches -> rows. Each epoch reshuffles (torch's global RNG)
        and splits the rollout into ``num_minibatches`` minibatches of near-equal size, each into
        micro-batches of ``micro`` rows or, with ``train.max_tokens_per_batch``, of consecutive rows while
        their ``lengths`` (prompt + response tokens) fit (:meth:`Task.split`). ``groups`` (each row's
        prompt, with prefix sharing): a minibatch's rows are ordered group by group, so a micro-batch
        holds whole groups and runs each prompt once; which rows form a minibatch is unchanged, and the
        order inside one never changes its update (normalization by global units)."""
        epochs, nmb = self.update_shape()
        if nmb > n_rows:
            raise ValueError(f"num_minibatches={nmb} is more than the {n_rows} sequences of a rollout batch")
        out = []
        for _ in range(epochs):
            perm = torch.randperm(n_rows).tolist()
            bounds = [round(k * n_rows / nmb) for k in range(nmb + 1)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                rows = perm[a:b]
                if groups is not None:
                    first: Dict[int, int] = {}
                    for r in rows:
                        first.setdefault(groups[r], len(first))
                    rows = sorted(rows, key=lambda r: first[groups[r]])  # stable: the shuffle within a group stays
                out.append(self.split(rows, micro, tokens=lambda row: int(lengths[row])))
        return out

    @torch.no_grad()
    def ref_logps(self, model, seq: SeqBatch, shared: Optional[SharedRows] = None) -> torch.Tensor:
        """(B, T-1) reference log-probs: the frozen model, or the policy with its LoRA adapter off."""
        if self.ref_model is not None:
            return self._logprobs(self.ref_model, seq, shared, with_entropy=False).logps
        policy = policy_of(model)
        with policy.disable_adapter():
            return self._logprobs(policy, seq, shared, with_entropy=False).logps

    @torch.no_grad()
    def rollout_stats(self, model, ro: Rollout, first_epoch: List[List[List[int]]], *, ref: bool,
                      policy: bool = True) -> Dict[str, torch.Tensor]:
        """(N, T-1) old log-probs, entropy, values (actor-critic) and reference log-probs of the rollout,
        computed over the first epoch's micro-batches (every row exactly once). ``policy=False``: the
        reference log-probs only (:attr:`on_policy_stats`)."""
        seq = ro.sequences
        N, T1 = seq.input_ids.shape[0], seq.input_ids.shape[1] - 1
        out: Dict[str, torch.Tensor] = {}
        device, inner = self._device(model), unwrap(model)
        for update in first_epoch:
            for rows in update:
                sub = rows_of(seq, rows)
                shared = self._share(sub)
                sub, shared = sub.to(device), shared.to(device) if shared is not None else None
                t = sub.input_ids.shape[1] - 1
                with self._autocast():
                    parts = {}
                    if policy:
                        tl, values = self.forward(inner, sub, shared=shared)
                        parts = {"old_logps": tl.logps, "entropy": tl.entropy}
                        if values is not None:
                            parts["values"] = values
                    if ref:
                        parts["ref_logps"] = self.ref_logps(model, sub, shared)
                idx = torch.tensor(rows, dtype=torch.long)
                for k, v in parts.items():
                    dst = out.setdefault(k, torch.zeros(N, T1))
                    dst[idx, :t] = v.detach().float().cpu()
        return out

    def micro_batch(self, ro: Rollout, rows: List[int], per_row: Dict[str, Optional[torch.Tensor]],
                    rollout: Optional[Dict[str, Any]] = None) -> RLBatch:
        """Slice the rollout and its (N, T-1) / (N,) targets to ``rows``, trimmed to their length; ``rollout``:
        the rollout's own values the loss reads (beta, warmup, metric_scale)."""
        sub = rows_of(ro.sequences, rows)
        idx = torch.tensor(rows, dtype=torch.long)
        t = sub.input_ids.shape[1] - 1
        kw = {}
        for k, v in per_row.items():
            if v is not None:
                kw[k] = v[idx, :t] if v.dim() == 2 else v[idx]
        return RLBatch(sub.input_ids, sub.attention_mask, sub.loss_mask, **kw, shared=self._share(sub),
                       **(rollout or {}))

    def yield_updates(self, ro: Rollout, sched, per_row, metrics: Dict[str, float],
                      table: Optional[List[Dict[str, Any]]] = None,
                      rollout: Optional[Dict[str, Any]] = None) -> Iterator[Update]:
        """One :class:`Update` per scheduled update; the rollout's metrics (and its table) ride on the first."""
        for k, update in enumerate(sched):
            yield Update([self.micro_batch(ro, rows, per_row, rollout) for rows in update], metrics if k == 0 else {},
                         table=table if k == 0 else None, table_to_trackers=self.cfg.log_completions)
        self._engine_stale = True  # the policy changed: push it to the engine before the next rollout

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model, items, batch_size: int) -> Dict[str, float]:
        """Reward of ``eval_samples`` samples per held-out prompt, drawn with a fixed seed (the training
        RNG stream is left untouched)."""
        policy = policy_of(model)
        with torch.random.fork_rng(devices=_cuda_devices()):
            torch.manual_seed(self.cfg.train.seed + 7919)
            ro = generate(policy, self.tok, [it["prompt_ids"] for it in items], self.gen,
                          n=self.cfg.eval_samples, compute_logprobs=False)
        _, m = self.score(ro, list(items), prefix="eval/",
                          where=f"in the evaluation at step {self.steps_done} ({len(ro)} completions of held-out prompts)")
        # a rule reward named accuracy: each prompt's mean over its samples, for the held-out alert's
        # paired test (the prompt is the unit: its samples are not independent)
        acc = getattr(self.reward, "last_components", {}).get("accuracy")
        if acc is not None and len(acc) == len(ro.prompt_index):
            by_prompt: Dict[int, List[float]] = {}
            for i, v in zip(ro.prompt_index, acc):
                if v is not None:  # a TRL reward function may not apply to a sample
                    by_prompt.setdefault(int(i), []).append(float(v))
            m[EVAL_EXAMPLES] = {"eval/rewards/accuracy": [sum(v) / len(v) for v in by_prompt.values()]}
        return m



class OnlineTrainer(Trainer):
    """The shared loop; saving and report samples use the policy alone (not a policy+value wrapper)."""

    def unwrapped(self):
        return policy_of(self.acc.unwrap_model(self.model))


def load_reference(cfg, accelerator, needed: bool):
    """(frozen reference model or None, use the policy with its adapter off)."""
    if not needed:
        return None, False
    if (cfg.lora.enabled and not cfg.ref_model and current().ref_model is None) or given_adapter_policy():
        return None, True
    ref_cfg = cfg.model.model_copy(update={"name_or_path": cfg.ref_model or cfg.model.name_or_path,
                                           "gradient_checkpointing": False})
    # the policy's dtype, run under the same autocast: at step 0 reference == policy exactly, on a GPU too
    ref = reference_model(ref_cfg, cfg.ref_model).to(accelerator.device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    precast_frozen_linears(ref, accelerator)  # bit-identical under autocast, without a cast per forward
    disable_dropout(ref)
    return ref, False


def build_task(cfg, tok, policy, reward, gold, engine, acc, prompts=()):
    """(task, trainable model) for ``cfg``: loads the reference when a KL term is on, and wraps policy +
    critic into one module when the advantage estimator needs a critic (gae)."""
    o = cfg.algo
    needed = KL_PLACEMENTS.get(o.kl_placement).uses_reference and (o.kl_coef > 0 or o.adaptive_kl)
    ref, adapter = load_reference(cfg, acc, needed=needed)
    model = policy
    if ADVANTAGES.get(o.advantage).needs_critic:
        critic = None if cfg.value.shared else build_critic(cfg, tok)
        model = PolicyWithValue(policy, critic, temperature=cfg.generation.temperature or 1.0,
                                logprob_chunk=cfg.train.logprob_chunk)
    task = RLTask(cfg, tok, reward, gold, ref, adapter, engine, prompts=prompts)
    task.share_prompts = share_group_prompts(cfg, policy, ref)
    return task, model


def share_group_prompts(cfg, policy, ref=None) -> bool:
    """Whether the rows of a rollout share their prompts in the loss and log-prob passes (a group's
    samples their prompt, different prompts the beginning they have in common, such as a chat template's
    system prompt): ``train.packing`` and ``train.prefix_sharing`` on, no separate critic (its values
    come from a padded forward; the shared value head reads the shared layout), and the policy (and a
    separate reference model) give the same numbers shared as in rows of their own (the probe of
    :func:`~alignkit.ops.packing.resolve_packing`)."""
    separate_critic = ADVANTAGES.get(cfg.algo.advantage).needs_critic and not cfg.value.shared
    if separate_critic or not (cfg.train.packing and cfg.train.prefix_sharing):
        return False
    return all(resolve_packing(m, True, share_prompt=True).share_prompt for m in (policy, ref) if m is not None)


def _without_dropout(model):
    disable_dropout(model)
    return model


def run_online(cfg) -> Dict[str, Any]:
    """Shared body of every online-RL command (train_ppo, train_grpo, train_rloo, train_rl). Prints the
    rollout's shape first (prompts x generations = completions per step, processes); the run directory's
    lock is released on every way out."""
    acc = start_run(cfg)
    try:
        return _run_online(cfg, acc)
    except BaseException:
        if acc.is_main_process:  # a refused reward function, a timeout, ...: the run directory is free again
            release(cfg.output)
        raise


def _run_online(cfg, acc) -> Dict[str, Any]:
    plan = cfg.rollout_plan(acc.num_processes)
    if acc.is_main_process:
        console().print(plan.describe(), markup=False, highlight=False)
    tok = policy_tokenizer(cfg)
    data = prepare_data("prompt", cfg, tok, acc, seed=cfg.train.seed)
    reward = build_reward(cfg.rewards, timeout_s=cfg.reward_timeout_s)
    gold = build_reward(cfg.gold_reward, timeout_s=cfg.reward_timeout_s) if cfg.gold_reward else None
    columns = {k for it in [*data.train, *data.eval] for k in it.get("fields", {})}
    for r in (reward, gold):  # a reward function that cannot be called with this data: one line, no model loaded
        if r is not None:
            r.check_inputs(columns)
    if current().model is not None:
        disable_dropout(current().model)  # before LoRA: the adapters' dropout stays as lora.dropout sets it
    policy = policy_model(cfg, lambda: _without_dropout(load_causal_lm(cfg.model)))
    engine = None
    if cfg.generation.engine == "vllm":
        from alignkit.rollout.vllm_engine import make_engine  # deferred: vllm is an optional GPU extra

        engine = make_engine(resolve_model_path(cfg.model.name_or_path), tok, seed=cfg.train.seed)
    task, model = build_task(cfg, tok, policy, reward, gold, engine, acc, prompts=data.train)
    trainer = OnlineTrainer(cfg, task, model, data.train, data.eval, accelerator=acc, tokenizer=tok)
    return fit_and_finish(trainer, tok, cfg, data.eval)


@object_api(RLConfig, "online")
def train_rl(config=None, **overrides) -> Dict[str, Any]:
    """Run any preset (``preset=dapo``, ...); the Python twin of ``alignkit rl``."""
    return run_online(as_config(RLConfig, config, overrides))
