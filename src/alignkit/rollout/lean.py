"""The fast engine's decode step for Llama-style models, with transformers' numbers and a third of its ops.

At a decode step's one token per row, a small model's step is mostly per-op overhead, not arithmetic:
transformers' forward builds a mask, position embeddings and cache bookkeeping, and each decoder layer goes
through a dozen module calls and wrappers. SmolLM2-135M, 16 rows, bf16 decode copy on the 2-core CPU:
about 51 ms a step, of which 19 ms are the linear layers. :class:`LeanStep` runs the same computation as
a flat loop over the layers, op for op what the modeling code does (RMSNorm, rotary embedding, the static
cache write, SDPA on the key/value heads, SwiGLU, the residual adds), and nothing else.

**Exactness is checked, not assumed.** A model qualifies by its architecture (:func:`lean_supported`:
the Llama decoder layer of llama, mistral, qwen2 and qwen3, full attention, SiLU MLP, no logit
post-processing), and then, once per model and adapter state, by a probe (:meth:`LeanStep.agrees`): two
left-padded rows prefilled by the model and decoded three steps both ways must give bit-identical logits.
A model that differs in anything (a config field we do not read, a patched module, an active adapter)
decodes with transformers' forward, as before. Only decode steps are lean: the prefill is the model's own
forward, which fills the same static cache the lean steps then write to.
"""

from __future__ import annotations

import weakref
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F

from alignkit.hardware import lean_decode_allowed

#: model types whose decoder layer is Llama's (Qwen3 adds an RMSNorm over each head's q and k)
LEAN_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def _layers(model) -> Optional[Tuple[torch.nn.Module, List[torch.nn.Module]]]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return (inner, list(layers)) if inner is not None and layers is not None else None


def lean_supported(model) -> bool:
    """Whether ``model``'s architecture is one :class:`LeanStep` computes (before the probe)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in LEAN_TYPES or _layers(model) is None:
        return False
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False
    if getattr(cfg, "_attn_implementation", "sdpa") not in ("sdpa", "alignkit_sdpa"):
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or [])):
        return False  # sliding-window layers (mistral's window, qwen's use_sliding_window)
    if getattr(cfg, "model_type", None) == "mistral" and getattr(cfg, "sliding_window", None):
        return False
    if getattr(cfg, "mlp_bias", False):
        return False
    return all(hasattr(layer, name) for layer in _layers(model)[1]
               for name in ("input_layernorm", "post_attention_layernorm", "self_attn", "mlp"))


def _plain(module) -> Callable:
    """The callable a layer's projection reduces to for a rollout: a LoRA wrapper whose adapters are off
    (merged for the rollout, or the decode copy's) is its base layer; anything else is itself."""
    if getattr(module, "disable_adapters", False) and hasattr(module, "get_base_layer"):
        return module.get_base_layer()
    return module


class LeanStep:
    """One decode step of ``model`` (see the module docstring), writing into its static cache.

    ``step(tokens (B,), position_ids (B, 1), cache, cache_index (1,), mask (B, 1, 1, L) bool)`` returns the
    last-position logits (B, V), the numbers of ``model(input_ids=tokens[:, None], ...).logits[:, -1]``
    with the same static cache."""

    def __init__(self, model):
        self.model = model
        self.inner, layers = _layers(model)
        cfg = model.config
        self.qk_norm = cfg.model_type == "qwen3"
        attn = layers[0].self_attn
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self._bind()

    def _bind(self) -> None:
        """Resolve every projection's callable for the current adapter state (cheap; done per rollout)."""
        def rms(m):
            return m.weight, m.variance_epsilon

        self.layers = []
        for layer in _layers(self.model)[1]:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((rms(layer.input_layernorm), _plain(a.q_proj), _plain(a.k_proj), _plain(a.v_proj),
                                _plain(a.o_proj), rms(a.q_norm) if self.qk_norm else None,
                                rms(a.k_norm) if self.qk_norm else None, rms(layer.post_attention_layernorm),
                                _plain(mlp.gate_proj), _plain(mlp.up_proj), _plain(mlp.down_proj)))
        self.final = rms(self.inner.norm)
        self.head = _plain(self.model.get_output_embeddings())
        self.signature = tuple(id(f) for layer in self.layers for f in layer[1:5] + layer[8:]) + (id(self.head),)

    @staticmethod
    def _norm(x: torch.Tensor, weight_eps) -> torch.Tensor:
        weight, eps = weight_eps  # LlamaRMSNorm.forward, op for op
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2  # apply_rotary_pos_emb: x * cos + rotate_half(x) * sin
        return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)

    def step(self, tokens: torch.Tensor, position_ids: torch.Tensor, cache, cache_index: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        B, D = tokens.shape[0], self.head_dim
        x = self.inner.embed_tokens(tokens[:, None])  # (B, 1, hidden)
        cos, sin = self.inner.rotary_emb(x, position_ids=position_ids)  # (B, 1, D) in x's dtype
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, 1, D) against (B, heads, 1, D)
        for i, (n1, q_proj, k_proj, v_proj, o_proj, qn, kn, n2, gate, up, down) in enumerate(self.layers):
            h = self._norm(x, n1)
            q = q_proj(h).view(B, 1, -1, D)
            k = k_proj(h).view(B, 1, -1, D)
            if qn is not None:  # qwen3: RMSNorm over each head's q and k, before the rotary embedding
                q, k = self._norm(q, qn), self._norm(k, kn)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, 1, D)
            v = v_proj(h).view(B, 1, -1, D).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            layer = cache.layers[i]
            layer.keys.index_copy_(2, cache_index, k)  # StaticLayer.update
            layer.values.index_copy_(2, cache_index, v)
            if self.groups > 1:  # one query token: attention on the key/value heads (transformers' pack_gqa)
                q = q.reshape(B, q.shape[1] // self.groups, self.groups, D)
            o = F.scaled_dot_product_attention(q, layer.keys, layer.values, attn_mask=mask, scale=self.scaling)
            o = o.reshape(B, -1, 1, D).transpose(1, 2).contiguous().reshape(B, 1, -1).contiguous()
            x = x + o_proj(o)
            x = x + down(F.silu(gate(h := self._norm(x, n2))) * up(h))
        return self.head(self._norm(x, self.final))[:, -1]

    @torch.no_grad()
    def agrees(self, make_cache, cache_kwarg: str) -> bool:
        """Whether lean steps give the model's own logits bit for bit: two left-padded rows (lengths 3 and 5)
        prefilled by the model, then three decode steps each way on copies of the same cache."""
        model = self.model
        dev = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 5), generator=g).to(dev)
        L, new = 5, 3
        attn = torch.zeros(2, L + new, dtype=torch.long, device=dev)
        attn[0, 2:L] = 1
        attn[1, :L] = 1
        caches = [make_cache(model, 2, L + new), make_cache(model, 2, L + new)]
        if not all(getattr(c, "is_compileable", False) for c in caches):
            return False
        pos = (attn[:, :L].cumsum(-1) - 1).clamp(min=0)
        for c in caches:
            model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **{cache_kwarg: c},
                  cache_position=torch.arange(L, device=dev), logits_to_keep=1)
        plen = attn[:, :L].sum(-1)
        tok = torch.randint(0, vocab, (2,), generator=g).to(dev)
        for k in range(new):
            attn[:, L + k] = 1
            where = torch.tensor([L + k], device=dev)
            own = model(input_ids=tok[:, None], attention_mask=attn, position_ids=(plen + k)[:, None], use_cache=True,
                        **{cache_kwarg: caches[0]}, cache_position=where, logits_to_keep=1).logits[:, -1]
            mine = self.step(tok, (plen + k)[:, None], caches[1], where, attn[:, None, None, :].bool())
            if own.shape != mine.shape or not torch.equal(own, mine):
                return False
            tok = own.argmax(-1)
        return True


# model -> (adapter-state signature, LeanStep or None): a fact about the model object, kept while it lives
_LEAN: "weakref.WeakKeyDictionary[torch.nn.Module, Tuple[tuple, Optional[LeanStep]]]" = weakref.WeakKeyDictionary()


def lean_step(model, make_cache, cache_kwarg: str) -> Optional[LeanStep]:
    """The checked :class:`LeanStep` for ``model`` in its current adapter state, or None (transformers'
    forward decodes). The probe runs once per model and adapter state; ``ALIGNKIT_LEAN_DECODE=off`` always
    gives None."""
    if not lean_decode_allowed():  # ALIGNKIT_LEAN_DECODE=off: the fallback, on request
        return None
    if hasattr(model, "get_base_model"):  # a peft model: its transformers model, LoRA layers inside
        model = model.get_base_model()
    if not lean_supported(model):
        return None
    known = _LEAN.get(model)
    if known is not None:
        lean = known[1]
        if lean is None:
            return None
        lean._bind()
        if lean.signature == known[0]:
            return lean
    lean = LeanStep(model)
    ok = lean.agrees(make_cache, cache_kwarg)
    _LEAN[model] = (lean.signature, lean if ok else None)
    return lean if ok else None
