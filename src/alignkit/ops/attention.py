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
"""

from __future__ import annotations

import torch

NAME = "alignkit_sdpa"


def _attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    autocast_bf16 = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if query.device.type != "cpu" or not autocast_bf16:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(torch.bfloat16), weights


def register() -> str:
    """Add ``alignkit_sdpa`` to transformers' attention and mask tables (idempotent); returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


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
