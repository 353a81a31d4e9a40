"""Machinery shared by the online-RL trainers (PPO, GRPO, RLOO).

One training step of the shared loop is one rollout batch. :meth:`OnlineTask.plan` samples from the
current policy, scores the samples, computes advantages (the algorithm's business), then yields one
list of micro-batches per optimizer update: ``epochs x num_minibatches`` updates over the shuffled
rollout. Everything random (sampling, shuffling) draws from torch's global RNG, which checkpoints
save and restore, so a resumed run repeats a straight one exactly.

Log-probs of a rollout ("old" = behaviour policy, reference, values) are computed with the very
micro-batches of the first epoch (same rows, same padding, same code path as the loss), so at the
first update the ratio pi/pi_old is exactly 1 and the KL of an unchanged policy to its reference is 0.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from alignkit.data.collate import SeqBatch
from alignkit.eval.metrics import distinct_n
from alignkit.ops.logprobs import TokenLogprobs, token_logprobs
from alignkit.ops.wrappers import unwrap
from alignkit.rollout.generate import Rollout, generate
from alignkit.train.loop import Task, Trainer, Update


def policy_of(model):
    """The causal LM inside ``model`` (a policy+value wrapper exposes it as ``.policy``)."""
    m = unwrap(model)
    inner = getattr(m, "policy", None)
    return inner if isinstance(inner, torch.nn.Module) else m


def _cuda_devices() -> List[int]:
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


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


def to_response_space(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(N, T-1)`` -> ``(N, R)`` right-aligned-to-zero responses (what GAE needs), 0 where invalid."""
    return torch.where(valid, x.gather(1, index), torch.zeros((), dtype=x.dtype))


def from_response_space(y: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of :func:`to_response_space`: ``(N, R)`` -> ``(N, width)``, 0 off the responses."""
    out = torch.zeros(y.shape[0], width, dtype=y.dtype)
    return out.scatter_add(1, index, torch.where(valid, y, torch.zeros((), dtype=y.dtype)))


def last_response_index(prompt_lengths: Sequence[int], response_lengths: Sequence[int]) -> torch.Tensor:
    """(N,) column of each response's last token (EOS, or the cut-off token) in label space."""
    return torch.tensor([p - 1 + r - 1 for p, r in zip(prompt_lengths, response_lengths)], dtype=torch.long)


def loss_aggregation(name: str) -> Tuple[str, bool]:
    """(aggregation for the loss function, units are tokens). token_mean becomes a plain sum here
    and the loop divides by the global token count of the update (alignkit.losses.policy docstring)."""
    return ("sum", True) if name == "token_mean" else (name, False)


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

    def to(self, device) -> "RLBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if getattr(self, f.name) is not None})

    @property
    def seq(self) -> SeqBatch:
        return SeqBatch(self.input_ids, self.attention_mask, self.loss_mask)

    @property
    def mask(self) -> torch.Tensor:
        return self.loss_mask[:, 1:].float()  # (B, T-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def rows_of(seq: SeqBatch, rows: Sequence[int]) -> SeqBatch:
    """Rows of a right-padded batch, trimmed to their own longest sequence."""
    idx = torch.tensor(list(rows), dtype=torch.long)
    T = int(seq.attention_mask[idx].sum(-1).max())
    return SeqBatch(seq.input_ids[idx, :T], seq.attention_mask[idx, :T], seq.loss_mask[idx, :T])


class OnlineTask(Task):
    """Base of the online-RL tasks: rollout, rewards, metrics, schedule, log-prob passes, evaluation."""

    samples_per_prompt = 1

    def __init__(self, cfg, tokenizer, reward, gold=None, ref_model=None, adapter_ref: bool = False, engine=None):
        self.cfg, self.tok, self.gen = cfg, tokenizer, cfg.generation
        self.reward, self.gold = reward, gold
        self.ref_model, self.adapter_ref, self.engine = ref_model, adapter_ref, engine
        self.temperature = cfg.generation.temperature or 1.0
        self.acc = None  # Task.setup(accelerator): cross-process means, autocast
        self._engine_stale = True  # the engine starts from the checkpoint on disk, not from resumed weights

    # ------------------------------------------------------------------ hooks for subclasses
    def update_shape(self) -> Tuple[int, int]:
        """(epochs, minibatches per epoch) of optimizer updates per rollout."""
        return 1, 1

    def forward(self, model, seq: SeqBatch) -> Tuple[TokenLogprobs, Optional[torch.Tensor]]:
        """Per-token log-probs (with entropy) of the policy and, for actor-critic, values (B, T-1)."""
        return token_logprobs(model, seq, temperature=self.temperature, with_entropy=True,
                              chunk_size=self.cfg.train.logprob_chunk), None

    def collate(self, items):  # rollouts replace collation (see plan)
        return items

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
    @torch.no_grad()
    def score(self, ro: Rollout, items: List[Dict[str, Any]], prefix: str = "") -> Tuple[torch.Tensor, Dict[str, float]]:
        """Rewards (N,) of a rollout and its metrics: rewards/mean, std, each component, gold,
        rollout/length_mean, rollout/eos_rate, diversity/distinct_2."""
        prompts = [items[i]["prompt"] for i in ro.prompt_index]
        rows = [items[i].get("fields", {}) for i in ro.prompt_index]
        raw = torch.tensor(self.reward(prompts, ro.texts, rows), dtype=torch.float32)  # (N,)
        every = self._gather(raw)
        m = {f"{prefix}rewards/mean": float(every.mean()),
             f"{prefix}rewards/std": float(every.std()) if every.numel() > 1 else 0.0}
        for name, vals in getattr(self.reward, "last_components", {}).items():
            if name not in ("mean", "std", "gold"):  # unweighted per-component means
                m[f"{prefix}rewards/{name}"] = float(self._gather(torch.tensor(vals)).mean())
        if self.gold is not None:
            gold = torch.tensor(self.gold(prompts, ro.texts, rows), dtype=torch.float32)
            m[f"{prefix}rewards/gold"] = float(self._gather(gold).mean())
        m[f"{prefix}rollout/length_mean"] = float(self._gather(ro.response_lengths).mean())
        m[f"{prefix}rollout/eos_rate"] = float(self._gather(ro.ended.float()).mean())
        m[f"{prefix}diversity/distinct_2"] = distinct_n(ro.texts, 2)
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
        scores = raw.clone()
        if self.cfg.missing_eos_penalty:
            scores = torch.where(ro.ended, scores, scores - self.cfg.missing_eos_penalty)
        return ro, scores, metrics

    def schedule(self, n_rows: int, micro: int) -> List[List[List[int]]]:
        """Row indices: updates -> micro-batches -> rows. Each epoch reshuffles (torch's global RNG)
        and splits the rollout into ``num_minibatches`` minibatches of near-equal size."""
        epochs, nmb = self.update_shape()
        if nmb > n_rows:
            raise ValueError(f"num_minibatches={nmb} is more than the {n_rows} sequences of a rollout batch")
        out = []
        for _ in range(epochs):
            perm = torch.randperm(n_rows).tolist()
            bounds = [round(k * n_rows / nmb) for k in range(nmb + 1)]
            for a, b in zip(bounds[:-1], bounds[1:]):
                chunk = perm[a:b]
                out.append([chunk[i:i + micro] for i in range(0, len(chunk), micro)])
        return out

    @torch.no_grad()
    def ref_logps(self, model, seq: SeqBatch) -> torch.Tensor:
        """(B, T-1) reference log-probs: the frozen model, or the policy with its LoRA adapter off."""
        if self.ref_model is not None:
            return token_logprobs(self.ref_model, seq, temperature=self.temperature, with_entropy=False,
                                  chunk_size=self.cfg.train.logprob_chunk).logps
        policy = policy_of(model)
        with policy.disable_adapter():
            return token_logprobs(policy, seq, temperature=self.temperature, with_entropy=False,
                                  chunk_size=self.cfg.train.logprob_chunk).logps

    @torch.no_grad()
    def rollout_stats(self, model, ro: Rollout, first_epoch: List[List[List[int]]], *, ref: bool
                      ) -> Dict[str, torch.Tensor]:
        """(N, T-1) old log-probs, entropy, values (actor-critic) and reference log-probs of the rollout,
        computed over the first epoch's micro-batches (every row exactly once)."""
        seq = ro.sequences
        N, T1 = seq.input_ids.shape[0], seq.input_ids.shape[1] - 1
        out: Dict[str, torch.Tensor] = {}
        device, inner = self._device(model), unwrap(model)
        for update in first_epoch:
            for rows in update:
                sub = rows_of(seq, rows).to(device)
                t = sub.input_ids.shape[1] - 1
                with self._autocast():
                    tl, values = self.forward(inner, sub)
                    parts = {"old_logps": tl.logps, "entropy": tl.entropy}
                    if values is not None:
                        parts["values"] = values
                    if ref:
                        parts["ref_logps"] = self.ref_logps(model, sub)
                idx = torch.tensor(rows, dtype=torch.long)
                for k, v in parts.items():
                    dst = out.setdefault(k, torch.zeros(N, T1))
                    dst[idx, :t] = v.detach().float().cpu()
        return out

    def micro_batch(self, ro: Rollout, rows: List[int], per_row: Dict[str, Optional[torch.Tensor]]) -> RLBatch:
        """Slice the rollout and its (N, T-1) / (N,) targets to ``rows``, trimmed to their length."""
        sub = rows_of(ro.sequences, rows)
        idx = torch.tensor(rows, dtype=torch.long)
        t = sub.input_ids.shape[1] - 1
        kw = {}
        for k, v in per_row.items():
            if v is not None:
                kw[k] = v[idx, :t] if v.dim() == 2 else v[idx]
        return RLBatch(sub.input_ids, sub.attention_mask, sub.loss_mask, **kw)

    def yield_updates(self, ro: Rollout, sched, per_row, metrics: Dict[str, float]) -> Iterator[Update]:
        """One :class:`Update` per scheduled update; the rollout's metrics ride on the first."""
        for k, update in enumerate(sched):
            yield Update([self.micro_batch(ro, rows, per_row) for rows in update], metrics if k == 0 else {})
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
        _, m = self.score(ro, list(items), prefix="eval/")
        return m

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> Dict[str, Any]:
        return {}


class OnlineTrainer(Trainer):
    """The shared loop; saving and report samples use the policy alone (not a policy+value wrapper)."""

    def unwrapped(self):
        return policy_of(self.acc.unwrap_model(self.model))


def load_reference(cfg, accelerator, needed: bool):
    """(frozen reference model or None, use the policy with its adapter off)."""
    from alignkit.models.loading import load_causal_lm

    if not needed:
        return None, False
    if cfg.lora.enabled and not cfg.ref_model:
        return None, True
    ref_cfg = cfg.model.model_copy(update={"name_or_path": cfg.ref_model or cfg.model.name_or_path,
                                           "gradient_checkpointing": False})
    # the policy's dtype, run under the same autocast: at step 0 reference == policy exactly, on a GPU too
    ref = load_causal_lm(ref_cfg).to(accelerator.device).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    disable_dropout(ref)
    return ref, False


def run_online(cfg, build) -> Dict[str, Any]:
    """Shared body of train_ppo/train_grpo/train_rloo. ``build(cfg, tok, policy, reward, gold, engine, acc)``
    returns ``(task, model)`` where ``model`` is what the optimizer trains (policy, or policy+value)."""
    from alignkit.models.default import resolve_model_path
    from alignkit.models.loading import apply_lora, load_causal_lm, load_tokenizer
    from alignkit.rewards import build_reward
    from alignkit.train.common import fit_and_finish, prepare_data, start_run

    acc = start_run(cfg)
    tok = load_tokenizer(cfg.model)
    data = prepare_data("prompt", cfg, tok, acc, seed=cfg.train.seed)
    reward = build_reward(cfg.rewards)
    gold = build_reward(cfg.gold_reward) if cfg.gold_reward else None
    policy = load_causal_lm(cfg.model)
    disable_dropout(policy)
    if cfg.lora.enabled:
        policy = apply_lora(policy, cfg.lora)
    engine = None
    if cfg.generation.engine == "vllm":
        from alignkit.rollout.vllm_engine import make_engine

        engine = make_engine(resolve_model_path(cfg.model.name_or_path), tok, seed=cfg.train.seed)
    task, model = build(cfg, tok, policy, reward, gold, engine, acc)
    trainer = OnlineTrainer(cfg, task, model, data.train, data.eval, accelerator=acc, tokenizer=tok)
    return fit_and_finish(trainer, tok, cfg, data.eval)
