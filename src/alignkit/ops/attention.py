"""SDPA attention that runs in fp32 under CPU bf16 autocast.

Why: under bf16 autocast, SDPA is on the CPU's lower-precision list, and PyTorch's CPU flash-attention
kernel is much slower backwards in bf16 than in fp32 (torch 2.13, 2-core AMX VM, SmolLM2-135M shape
4 x 153 tokens x 9 heads with a prefix-sharing mask: forward + backward 10.5 ms in bf16, 4.9 ms in fp32).
It was the largest single item of a DPO step's backward (30% of it).

``alignkit_sdpa`` is transformers' own ``sdpa`` function with one change: on a CPU under bf16 autocast it
casts q, k, v (and a float mask) to fp32, runs SDPA with autocast off, and casts the output to bf16, the
dtype autocast's SDPA returns. The inputs keep the precision they arrive in (under autocast q and k are
fp32 after the rotary embedding; v is bf16), so the result is at least as close to the fp32 reference as
the bf16 kernel's. It does this with and without a gradient, so a no-grad pass (old log-probs, a frozen
reference under autocast) gives exactly the numbers of the training pass. On a GPU, in fp32, and for bf16
models run without autocast (the rollout engine's decode copy) it is exactly ``sdpa``.

It is registered under its own name with transformers' attention and mask registries (a name added to
a table, not a setting that changes other models), and :func:`use_for` switches a loaded CPU model from
``sdpa`` to it. The name is not written to ``config.json``: a saved model loads with transformers'
defaults anywhere.

**Segment attention** for packed and prefix-shared rows. A packed row's attention is block-sparse: a
token sees its own sequence, or (prefix sharing) its own segment and the prompt segments above it. A
dense L x L with a mask computes every block anyway: a 512-token row of four 128-token sequences costs
a SmolLM2-135M training step 23% more than four rows (Zen 4, bf16 autocast), and a row of eight shared
prompt trees 449 tokens long spent 27% of a reward-model step in attention. With the layout passed as
``alignkit_segments`` (:func:`segments_of`, through the model's forward keyword arguments, which
transformers hands to the attention function) each segment's queries attend only to the keys they may
see: gathered, one SDPA over all segments at once, scattered back. Same numbers up to the order of
sums (the start-of-run probe of ``ops/packing.py`` checks them against separate rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

NAME = "alignkit_sdpa"


@dataclass
class Segments:
    """Where the segments of one bucket (:func:`segments_of`) have their queries and visible keys in a
    packed batch's flattened ``(R * L)`` tokens.

    Segment ``s`` has ``nq`` query tokens and sees ``nk`` keys: its ancestors' tokens (all visible), then
    its own (causal). Shapes: ``q_index`` (S, Lq) and ``k_index`` (S, Lk) token indices (0 in padded
    slots), ``mask`` (S, 1, Lq, Lk) bool (a padded query slot sees key 0 only, so no row is empty),
    ``q_slot``/``q_token`` (N,) the flat slot in (S * Lq) of each real query and its token index."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    mask: torch.Tensor
    q_slot: torch.Tensor
    q_token: torch.Tensor


def segments_of(block: torch.Tensor, block_end: torch.Tensor, attention_mask: torch.Tensor) -> List[Segments]:
    """The segments of a packed layout (``data/layout.py``): ``block`` (R, L) numbered depth-first, each
    block's subtree ``[block, block_end)``. Blocks of padding only are left out (their outputs are 0).

    Segments are padded to the longest in one SDPA call, so they go in buckets of similar size (sorted by
    keys, a bucket grows while its padded area stays within 1.25x of its real one, plus 4096 slots of
    slack so that small segments share a call): one 1000-token sequence packed with twenty of 50 tokens
    costs two calls, not twenty-one 1000 x 1000 products."""
    blk, end, real = block.reshape(-1).tolist(), block_end.reshape(-1).tolist(), attention_mask.reshape(-1).tolist()
    tokens: dict = {}
    for i, b in enumerate(blk):
        tokens.setdefault(b, []).append(i)
    segs: List[Tuple[List[int], List[int]]] = []  # (query tokens, key tokens: ancestors' then its own)
    stack: List[int] = []  # the open blocks whose subtree holds the current one
    for b in sorted(tokens):
        while stack and end[tokens[stack[-1]][0]] <= b:
            stack.pop()
        own = tokens[b]
        if any(real[i] for i in own):
            segs.append((own, [i for a in stack for i in tokens[a]] + own))
        stack.append(b)
    buckets: List[List[Tuple[List[int], List[int]]]] = []
    area = mq = mk = 0
    for q, k in sorted(segs, key=lambda x: (len(x[1]), len(x[0]))):
        nq, nk = len(q), len(k)
        if buckets and (len(buckets[-1]) + 1) * max(mq, nq) * max(mk, nk) <= 1.25 * (area + nq * nk) + 4096:
            buckets[-1].append((q, k))
            area, mq, mk = area + nq * nk, max(mq, nq), max(mk, nk)
        else:
            buckets.append([(q, k)])
            area, mq, mk = nq * nk, nq, nk
    return [_bucket(b, block.device) for b in buckets]


def _bucket(segs: Sequence[Tuple[List[int], List[int]]], device) -> Segments:
    S, Lq, Lk = len(segs), max(len(q) for q, _ in segs), max(len(k) for _, k in segs)
    q_index = torch.zeros((S, Lq), dtype=torch.long)
    k_index = torch.zeros((S, Lk), dtype=torch.long)
    for s, (q, k) in enumerate(segs):
        q_index[s, :len(q)] = torch.tensor(q)
        k_index[s, :len(k)] = torch.tensor(k)
    nq = torch.tensor([len(q) for q, _ in segs])[:, None, None]
    na = torch.tensor([len(k) - len(q) for q, k in segs])[:, None, None]  # ancestors' keys
    j = torch.arange(Lq)[None, :, None]
    t = torch.arange(Lk)[None, None, :]
    mask = ((t < na) | ((t - na >= 0) & (t - na <= j))) & (t < na + nq) & (j < nq)
    mask |= (j >= nq) & (t == 0)
    slot = (torch.arange(Lq)[None, :] < nq[:, :, 0]).reshape(-1).nonzero().squeeze(1)
    return Segments(q_index.to(device), k_index.to(device), mask[:, None].to(device), slot.to(device),
                    q_index.reshape(-1)[slot].to(device))


def _segment_attention(module, query, key, value, buckets: Sequence[Segments], **kwargs):
    """Attention of packed rows segment by segment: (R, H, L, D) in, (R, L, H, D) out like sdpa's."""
    # deferred: transformers is slow to import; it loads when a model does
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    R, H, L, D = query.shape

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        flat = x.transpose(1, 2).reshape(R * L, x.shape[1], x.shape[3])  # (R * L, heads, D)
        S, n = index.shape
        return flat.index_select(0, index.reshape(-1)).view(S, n, x.shape[1], x.shape[3]).transpose(1, 2)

    res = None
    for seg in buckets:
        out, _ = sdpa_attention_forward(module, gather(query, seg.q_index), gather(key, seg.k_index),
                                        gather(value, seg.k_index), seg.mask, is_causal=False,
                                        **kwargs)  # (S, Lq, H, Dv)
        flat = out.reshape(-1, H, out.shape[-1]).index_select(0, seg.q_slot)
        if res is None:
            res = flat.new_zeros((R * L, H, out.shape[-1]))
        res = res.index_copy(0, seg.q_token, flat)
    return res.view(R, L, H, -1), None


def _attention(module, query, key, value, attention_mask, alignkit_segments=None, **kwargs):
    # deferred: transformers is slow to import; it loads when a model does
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attend(q, k, v, m):
        if alignkit_segments is not None:  # the layout replaces the mask
            return _segment_attention(module, q, k, v, alignkit_segments, **kwargs)
        return sdpa_attention_forward(module, q, k, v, m, **kwargs)

    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if query.device.type != "cpu" or not autocast_bf16:
        return attend(query, key, value, attention_mask)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = attend(query.float(), key.float(), value.float(), attention_mask)
    return out.to(torch.bfloat16), weights


def register() -> str:
    """Add ``alignkit_sdpa`` to transformers' attention and mask tables (idempotent); returns the name."""
    # deferred: transformers is slow to import; it loads when a model does
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def takes_segments(model_config) -> bool:
    """Whether a model runs :class:`Segments` attention: ``alignkit_sdpa`` on every layer, no sliding
    window (its positions limit is not in the segment mask), no attention logit softcap."""
    cfg = model_config
    if getattr(cfg, "_attn_implementation", None) != NAME or getattr(cfg, "sliding_window", None):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False
    return not getattr(cfg, "attn_logit_softcapping", None)


def is_sdpa(impl: str) -> bool:
    """Whether an attention implementation name takes sdpa's masks (boolean, 4D)."""
    return impl in ("sdpa", NAME)


def use_for(model) -> bool:
    """Switch ``model`` (a transformers model on the CPU using ``sdpa``) to ``alignkit_sdpa``. Returns
    whether it did; models elsewhere or on another attention implementation are left alone."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa" or torch.cuda.is_available():
        return False
    if next(model.parameters()).device.type != "cpu" or not hasattr(model, "set_attn_implementation"):
        return False
    register()
    model.set_attn_implementation(NAME)
    return cfg._attn_implementation == NAME
