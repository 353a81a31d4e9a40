"""Rollouts: batched sampling from the policy, for every generating command.

The default engine (``generation.engine=fast``, :mod:`alignkit.rollout.engine`) is our own decode loop:
static KV cache, prompts grouped by length, finished rows leaving the batch, LoRA merged into the
weights for the rollout, behaviour log-probs from the sampling step. ``hf`` is transformers'
``generate`` (the reference path); ``vllm`` the optional GPU engine (:mod:`alignkit.rollout.vllm_engine`).

Prompts are left-padded for generation (position ids follow the attention mask, so padding does not
shift them); the result is re-packed right-padded as prompt + response with a response mask, ready
for :func:`alignkit.ops.logprobs.token_logprobs`. Responses stop at EOS; a response that hits
``max_new_tokens`` first is marked as not ended (``ended=False``) and carries no EOS.

``logprobs`` are the behaviour policy's log-probs of the sampled tokens at the sampling temperature
(full softmax: top-p/top-k truncation is not reflected, as in TRL and OpenRLHF): from the sampling
step itself with the fast engine, else from one extra forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Sequence

import torch
from pydantic import Field

from alignkit.config import Section
from alignkit.data.layout import SeqBatch, pad_sequences, share_row_prompts
from alignkit.models.loading import native_bf16, resolve_dtype
from alignkit.ops.logprobs import DEFAULT_CHUNK, row_logprobs
from alignkit.ops.wrappers import unwrap
from alignkit.rollout.engine import FastEngine
from alignkit.runtime import keep_host_memory


class GenerationConfig(Section):
    max_new_tokens: int = Field(64, gt=0)
    """Longest response in tokens; longer ones are cut and marked as not ended."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (0: greedy). Must be >= 0: logits are divided by it, and a negative
    temperature samples the least likely tokens first."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling: keep the smallest token set with this much probability. Must be in (0, 1]: a
    probability mass, and 0 keeps no token."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens (0: all). Must be >= 0: a count of tokens."""
    batch_size: int = Field(16, gt=0)
    """Sequences generated per forward batch."""
    engine: Literal["fast", "hf", "vllm"] = "fast"
    """fast: alignkit's decode loop (static KV cache, length grouping, finished rows leave the batch, LoRA
    merged for the rollout; CPU or GPU); hf: transformers generate; vllm: vLLM on a GPU (optional extra,
    alignkit[vllm])."""
    compile: bool = False
    """fast engine on a GPU: torch.compile the one-token decode step (pays for long generations; the
    first rollout compiles)."""
    dtype: Literal["auto", "float32", "bfloat16", "model"] = "auto"
    """fast engine: the dtype of the weights that decode. auto: a bf16 copy of an fp32 model wherever bf16
    is native (a GPU, or a CPU with AMX/AVX512-BF16; ~1.9x faster decoding on the 2-core VM), the model
    itself elsewhere; model: always the model's own weights (bit-exact with the training forward)."""


@dataclass
class Rollout:
    """N sampled responses. Row i answers prompt ``prompt_index[i]``."""

    sequences: SeqBatch  # (N, T) prompt + response, right-padded; loss_mask = response tokens (+EOS)
    prompt_lengths: List[int]
    response_ids: List[List[int]]
    texts: List[str]  # decoded responses without special tokens
    ended: torch.Tensor  # (N,) bool: the response reached EOS
    prompt_index: List[int]
    logprobs: Optional[torch.Tensor] = None  # (N, T-1) behaviour log-probs on the response mask
    info: Optional[List[dict]] = None  # per row, what a scorer recorded (online RL: prompt text and rewards)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([len(r) for r in self.response_ids], dtype=torch.float32)


def _left_pad(prompts: Sequence[List[int]], pad_id: int, device):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, T - len(p):] = 1
    return ids.to(device), attn.to(device)


def _cut_at_eos(tokens: List[int], eos_ids: set) -> tuple:
    for j, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[: j + 1], True
    return tokens, False


@torch.no_grad()
def hf_generate(model, tokenizer, prompts: Sequence[List[int]], cfg: GenerationConfig) -> List[List[int]]:
    """Sampled response token lists (raw, up to max_new_tokens, possibly past EOS)."""
    model = unwrap(model)
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    out: List[List[int]] = []
    try:
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start:start + cfg.batch_size]
            ids, attn = _left_pad(chunk, pad_id, device)
            kwargs = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id,
                          eos_token_id=tokenizer.eos_token_id, use_cache=True)
            if cfg.temperature > 0:
                kwargs.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k or None)
            else:
                kwargs.update(do_sample=False)
            gen = model.generate(input_ids=ids, attention_mask=attn, **kwargs)
            for row in gen[:, ids.shape[1]:].tolist():
                out.append(row)
    finally:
        model.train(was_training)
    return out


_FAST = {}


def decode_dtype(cfg: GenerationConfig, device_type: str) -> Optional[torch.dtype]:
    """The fast engine's decode dtype for ``generation.dtype`` on ``device_type`` (None: the model's own)."""
    if cfg.dtype == "model":
        return None
    if cfg.dtype == "auto":
        return torch.bfloat16 if native_bf16(device_type) else None
    return resolve_dtype(cfg.dtype)


def fast_engine(cfg: GenerationConfig, device_type: str = "cpu"):
    """The process's fast engine for these settings (it keeps compiled decode steps and its decode
    copy of the weights between rollouts)."""
    key = (bool(cfg.compile), decode_dtype(cfg, device_type))
    if key not in _FAST:
        _FAST[key] = FastEngine(compile=key[0], dtype=key[1])
    return _FAST[key]


def generate(model, tokenizer, prompts: Sequence[List[int]], cfg: GenerationConfig, *, n: int = 1,
             engine=None, compute_logprobs: bool = True) -> Rollout:
    """Sample ``n`` responses for each prompt (token-id lists). Returns a :class:`Rollout`.

    ``engine``: an external engine object (vLLM) with ``generate(prompts, cfg)``; otherwise
    ``cfg.engine`` picks the fast decode loop or transformers' ``generate``.
    """
    keep_host_memory()  # each decode step's buffers are reused instead of faulted in afresh
    expanded = [p for p in prompts for _ in range(n)]
    index = [i for i in range(len(prompts)) for _ in range(n)]
    eos = {tokenizer.eos_token_id}
    step_logps = None
    if engine is not None:
        raw = engine.generate(expanded, cfg)
    elif cfg.engine == "hf":
        raw = hf_generate(model, tokenizer, expanded, cfg)
    else:
        device_type = next(unwrap(model).parameters()).device.type
        raw, step_logps = fast_engine(cfg, device_type).generate(model, expanded, cfg, sorted(eos),
                                                                 tokenizer.pad_token_id)
    responses, ended, kept_logps = [], [], []
    for j, toks in enumerate(raw):
        r, e = _cut_at_eos(toks, eos)
        lp = step_logps[j][:len(r)] if step_logps is not None else None
        if not r:  # an empty generation still needs one token to score; use EOS
            r, e, lp = [tokenizer.eos_token_id], True, None
        responses.append(r)
        ended.append(e)
        kept_logps.append(lp)
    seqs = [p + r for p, r in zip(expanded, responses)]
    masks = [[0] * len(p) + [1] * len(r) for p, r in zip(expanded, responses)]
    batch = pad_sequences(seqs, masks, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    ro = Rollout(batch, [len(p) for p in expanded], responses, texts, torch.tensor(ended), index)
    if compute_logprobs:
        if step_logps is not None and all(lp is not None for lp in kept_logps):
            # the engine's own log-probs, placed in label space: token k of row i sits at column p_i - 1 + k
            out = torch.zeros(len(seqs), batch.input_ids.shape[1] - 1)
            for i, (p, lp) in enumerate(zip(expanded, kept_logps)):
                out[i, len(p) - 1:len(p) - 1 + len(lp)] = torch.tensor(lp)
            ro.logprobs = out
        else:
            ro.logprobs = batched_logprobs(model, batch, temperature=cfg.temperature or 1.0,
                                           batch_size=cfg.batch_size)
    return ro


@torch.no_grad()
def batched_logprobs(model, batch: SeqBatch, temperature: float = 1.0, batch_size: int = 16,
                     chunk_size: Optional[int] = None, share_prompts: bool = False, pad_id: int = 0) -> torch.Tensor:
    """(N, T-1) log-probs of ``batch`` (right-padded ``prompt + response`` rows) under ``model`` without
    gradients, in chunks of ``batch_size`` rows (``chunk_size``: label positions per head chunk, 0 = full
    logits; default ``DEFAULT_CHUNK``).

    ``share_prompts``: rows of a chunk with the same prompt (the samples of one prompt, consecutive) run
    as one ``[prompt][response 1][response 2]...`` unit (:func:`~alignkit.data.layout.share_row_prompts`),
    so each prompt's forward runs once per chunk; only for a model whose probe allows it
    (:func:`~alignkit.ops.packing.resolve_packing` with ``share_prompt=True``). ``pad_id`` fills the
    shared rows' tails."""
    chunk_size = DEFAULT_CHUNK if chunk_size is None else chunk_size
    model_u = unwrap(model)
    device = next(model_u.parameters()).device
    parts = []
    for s in range(0, len(batch), batch_size):
        sub = SeqBatch(batch.input_ids[s:s + batch_size], batch.attention_mask[s:s + batch_size],
                       batch.loss_mask[s:s + batch_size])
        shared = share_row_prompts(sub, pad_id) if share_prompts else None
        sub, shared = sub.to(device), shared.to(device) if shared is not None else None
        tl = row_logprobs(model_u, sub, shared, temperature=temperature, chunk_size=chunk_size)
        parts.append(tl.logps.float().cpu())
    return torch.cat(parts)
