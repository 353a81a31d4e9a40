"""Packed batches at the model: the inputs that keep attention inside each sequence, and the check
that a model gives the same numbers packed as padded.

A packed row (``data/layout.py``) holds several sequences whose position ids restart at 0.

- Plain packing goes through transformers' own packed-sequence path: no attention mask, position ids
  only. transformers derives the sequence boundaries from the position ids and builds a block-causal
  mask (sdpa, eager, sliding windows included) or calls flash-attention's varlen kernel (GPU).
- Prefix sharing needs "each response sees the prompt and itself", which position ids cannot say, so
  it passes a 4D mask built here: key k is visible to query q when k <= q, k's block is q's own or one
  of its ancestors in the unit's prefix tree (a shared prompt, or a prefix several prompts share), and
  (sliding-window layers) ``pos[q] - pos[k] < window``. Boolean for sdpa, additive for eager;
  flash-attention has no arbitrary masks, so sharing is off there.

``resolve_packing`` runs a tiny probe (three short forwards, no gradient) comparing packed and shared
layouts with separate padded rows on the run's model, and turns off what is not exact, saying why.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Dict, Optional, Tuple

import torch

from alignkit.data.layout import PADDED, Packing, SeqBatch, layout_sequences, pack_units
from alignkit.ops.attention import is_sdpa, segments_of, takes_segments
from alignkit.ops.wrappers import unwrap

log = logging.getLogger("alignkit")


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _attn_implementation(model) -> str:
    cfg = getattr(unwrap(model), "config", None)
    return str(getattr(cfg, "_attn_implementation", None) or "eager")


def _window_mask(allowed: torch.Tensor, pos: torch.Tensor, window: Optional[int]) -> torch.Tensor:
    if not window:
        return allowed
    return allowed & ((pos[:, :, None] - pos[:, None, :]) < window)


def shared_attention_mask(model, batch: SeqBatch, dtype: torch.dtype):
    """The 4D mask (R, 1, L, L) of a prefix-shared batch, or a dict of them by layer type
    (``full_attention`` / ``sliding_attention``) for models that mix both."""
    L = batch.input_ids.shape[1]
    blk, end, pos = batch.block, batch.block_end, batch.position_ids
    causal = torch.ones(L, L, dtype=torch.bool, device=blk.device).tril()
    # query q sees key k when q's block lies in the subtree of k's block: k's block is q's own or one of its
    # ancestors (blocks are numbered depth-first, so that subtree is the range [block, block_end))
    allowed = causal & (blk[:, None, :] <= blk[:, :, None]) & (blk[:, :, None] < end[:, None, :])  # (R, q, k)
    cfg = unwrap(model).config
    window = getattr(cfg, "sliding_window", None)
    types = set(getattr(cfg, "layer_types", None) or [])
    impl = _attn_implementation(model)

    def fmt(m: torch.Tensor) -> torch.Tensor:
        m = m[:, None]  # (R, 1, L, L)
        if is_sdpa(impl):
            return m
        # eager and others add the mask to the scores
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)

    if types and types != {"full_attention"}:
        return {t: fmt(_window_mask(allowed, pos, window if t == "sliding_attention" else None)) for t in types}
    if types == {"full_attention"}:
        return fmt(allowed)
    return fmt(_window_mask(allowed, pos, window))  # e.g. Mistral: every layer uses config.sliding_window


def _sequence_blocks(batch: SeqBatch) -> Tuple[torch.Tensor, torch.Tensor]:
    """(block, block_end) of a plain packed batch: each sequence (and each row's padding) a block of its
    own, starting where the positions restart."""
    blk = (batch.position_ids.reshape(-1) == 0).long().cumsum(0).sub(1).view_as(batch.position_ids)
    return blk, blk + 1


def model_inputs(model, batch: SeqBatch) -> Dict[str, object]:
    """Keyword arguments for ``model(...)`` that give each sequence of ``batch`` the numbers it would
    have alone in a padded row. Packed batches of a model that takes them (``ops/attention.py``) also
    carry their segments, so attention skips the blocks a token cannot see."""
    if not batch.packed:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "position_ids": position_ids(batch.attention_mask)}
    extra = {}
    if takes_segments(unwrap(model).config):
        blk, end = (batch.block, batch.block_end) if batch.shared else _sequence_blocks(batch)
        extra["alignkit_segments"] = segments_of(blk, end, batch.attention_mask)
    if not batch.shared:  # transformers' packed-sequence path (block-causal mask or flash varlen)
        return {"input_ids": batch.input_ids, "attention_mask": None, "position_ids": batch.position_ids, **extra}
    dtype = next(unwrap(model).parameters()).dtype
    if torch.is_autocast_enabled(batch.input_ids.device.type):
        dtype = torch.get_autocast_dtype(batch.input_ids.device.type)
    return {"input_ids": batch.input_ids, "attention_mask": shared_attention_mask(model, batch, dtype),
            "position_ids": batch.position_ids, **extra}


def last_hidden(model, batch: SeqBatch, **kw) -> Tuple[object, torch.Tensor]:
    """(model output, final hidden states (R, L, H)) of one forward over ``batch``."""
    out = model(**model_inputs(model, batch), output_hidden_states=True, use_cache=False, **kw)
    return out, out.hidden_states[-1]


# ------------------------------------------------------------------------------------- the probe
_PROBE = ([3, 4, 5], [6, 7, 8, 9, 10], [11, 12, 13, 14], [15, 16])  # prompt, chosen, rejected, extra
# the prefix-shared probe: two prompts sharing a beginning ([3, 4, 5] + [6, 7] and [3, 4, 5] + [16]), the
# first with two responses, the second with one: a two-level tree, siblings, and a subtree after a subtree
_TREE = [([3, 4, 5], [0, 0, 0], -1, None), ([6, 7], [0, 0], -1, 0), ([8, 9, 10], [1, 1, 1], 0, 1),
         ([11, 12, 13, 14], [1, 1, 1, 1], 1, 1), ([16], [0], -1, 0), ([15, 6, 9], [1, 1, 1], 2, 4)]


@torch.no_grad()
def _probe(model, packing: Packing) -> Tuple[bool, str]:
    """Compare the final hidden states of a packed (or prefix-shared) batch with separate rows."""
    inner = unwrap(model)
    vocab = int(getattr(inner.config, "vocab_size", 0) or 0)
    if vocab < 17:
        return False, "vocabulary too small for the check"
    p, c, r, x = _PROBE
    device = next(inner.parameters()).device
    dtypes = {q.dtype for q in inner.parameters()}
    low = sorted(dtypes & {torch.bfloat16, torch.float16}, key=str)
    # a frozen model whose linear weights were pre-cast for autocast (precast_frozen_linears) only runs
    # under that autocast
    mixed = torch.float32 in dtypes and low
    ctx = torch.autocast(device.type, dtype=low[0]) if mixed else contextlib.nullcontext()
    was = inner.training
    inner.eval()
    try:
        if packing.share_prompt:
            test = pack_units([_TREE], 0, 3)
            t = [seg[0] for seg in _TREE]
            seqs = [t[0] + t[1] + t[2], t[0] + t[1] + t[3], t[0] + t[4] + t[5]]
            offsets = [5, 5, 4]  # the shared layout holds the responses' tokens
        else:
            seqs, offsets = [p + c, x, r], [0, 0, 0]
            test = layout_sequences(seqs, [[0] * len(q) for q in seqs], 0, packing)
            if test.input_ids.shape[0] == len(seqs):
                return False, "unexpected probe layout"  # nothing shares a row: the probe would test nothing
        want, got = [], []
        for k, off in enumerate(offsets):
            where = (test.seq_index == k).nonzero().tolist()  # [(row, col)] in order
            got += where
            want += [(k, off + j) for j in range(len(where))]
        test = test.to(device)
        plain = layout_sequences(seqs, [[0] * len(s) for s in seqs], 0, PADDED).to(device)
        with ctx:
            _, h_plain = last_hidden(model, plain)
            _, h_test = last_hidden(model, test)
    except Exception as e:  # a model that rejects position ids, 4D masks or mask dicts
        return False, f"{type(e).__name__}: {e}"
    finally:
        inner.train(was)
    a = torch.stack([h_plain[i, j] for i, j in want]).float()
    b = torch.stack([h_test[i, j] for i, j in got]).float()
    diff = float((a - b).abs().max())
    tol = (1e-4 if h_plain.dtype == torch.float32 and not mixed else 3e-2) * (1.0 + float(a.abs().max()))
    if not diff <= tol:
        return False, f"the packed forward differs from the padded one (max |diff| {diff:.3g})"
    return True, ""


def resolve_packing(model, pack: bool, share_prompt: bool = False, max_tokens: Optional[int] = None,
                    say=None, switches: Tuple[str, str] = ("train.packing", "train.prefix_sharing")) -> Packing:
    """The layout a run uses: what was asked for, minus what this model cannot do exactly.

    ``say``: where the one-line explanation goes when something is turned off (default: the log).
    ``switches``: the settings that line names for packing and for prefix sharing (the caller's own).
    """
    say = say or log.warning
    name = type(unwrap(model)).__name__
    share_prompt = share_prompt and pack
    impl = _attn_implementation(model)
    on_cpu = next(unwrap(model).parameters()).device.type == "cpu"
    if pack and impl.startswith("flash") and on_cpu:
        pass  # flash-attention runs on the GPU only; its varlen path is transformers' own packed format
    elif pack:
        ok, why = _probe(model, Packing(pack=True))
        if not ok:
            say(f"{switches[0]}: {name} cannot attend within packed sequences exactly ({why}); "
                "using padded batches")
            pack = share_prompt = False
    if share_prompt:
        ok, why = (False, f"attention implementation {impl!r} takes no custom masks") \
            if impl.startswith("flash") else _probe(model, Packing(pack=True, share_prompt=True))
        if not ok:
            say(f"{switches[1]}: {name} cannot share the prompt exactly ({why}); "
                "each response is laid out after its own copy of the prompt")
            share_prompt = False
    return Packing(pack=pack, share_prompt=share_prompt, max_tokens=max_tokens)
