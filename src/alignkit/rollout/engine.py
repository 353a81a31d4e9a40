"""The fast rollout engine (``generation.engine=fast``, the default): our own decode loop.

Where ``transformers.generate`` spends much of a small model's decode step in Python (logits
processors, stopping criteria, cache bookkeeping, the LoRA wrappers of every layer), this loop does
per step exactly one forward of the still-running rows and one sampling op:

- **Prompts grouped by length.** Prompts are sorted by length before they are cut into batches, so a
  batch pads little; results come back in the caller's order.
- **Static KV cache.** One preallocated cache per batch (``transformers.StaticCache``, prompt +
  ``max_new_tokens`` positions), written in place; the model computes logits for the last position
  only (``logits_to_keep=1``). On a GPU, ``generation.compile=true`` compiles the decode step.
- **Shared prompts prefilled once.** The samples of one prompt (``n`` per prompt: a GRPO or RLOO
  group) arrive as identical prompts; each batch prefills its distinct prompts only and copies their
  KV-cache rows and last-position logits to every sample (``Cache.reorder_cache`` with a longer index),
  so a group of ``G`` pays one prompt forward instead of ``G``.
- **Finished rows leave the batch.** When a row samples EOS, it is dropped from the batch and from
  the cache (``Cache.reorder_cache`` with the surviving rows), so later steps only pay for rows still
  running. (Not with ``compile``: a compiled step keeps fixed shapes.)
- **Behaviour log-probs for free.** The log-prob of each sampled token under the sampling
  distribution (logits / temperature, full softmax: top-p/top-k truncation is not reflected, as in
  TRL and OpenRLHF) is taken from the logits the step already computed; no second pass.
- **Pre-packed weights on a CPU.** The bf16 decode copy's linear layers hold their weights only in
  oneDNN's blocked layout (:mod:`alignkit.ops.packed_linear`), packed once per rollout: a plain bf16
  linear re-packs its weight on every call, which at decode's few rows costs more than the product.
- **LoRA merged for the rollout.** :func:`merged_lora` adds each adapter's ``scale * B @ A`` into its
  base weight and switches the adapter off for the duration of the rollout, so decoding runs plain
  linear layers; on exit the base weights are copied back from a saved copy, bit for bit
  (adding then subtracting the delta would not round-trip exactly in floating point). A bf16 decode
  copy takes the merged weights directly instead, leaving the model untouched.

Sampling draws from torch's global RNG (one uniform per row, inverse-CDF: :func:`draw`), so a fixed seed gives the same tokens
on every run. Greedy decoding (temperature 0) gives the tokens of ``model.generate`` (tested).
"""

from __future__ import annotations

import contextlib
import copy as _copy
import weakref
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from alignkit.ops.logprobs import keep_last
from alignkit.ops.packed_linear import PackedLinear, pack_linears, packable_linears, packing_works
from alignkit.ops.wrappers import unwrap
from alignkit.rollout.lean import lean_step


def mergeable_lora(model) -> Iterator[Tuple[torch.nn.Module, List[str]]]:
    """``(LoRA layer, its active adapters)`` for every layer of ``model`` whose adapters can be merged into
    its base weight: active, not merged already, not DoRA or another variant (those are left as they
    are). Nothing for a model without LoRA."""
    try:
        # deferred: peft loads only when LoRA is used
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return
    for module in unwrap(model).modules():
        if not isinstance(module, LoraLayer) or getattr(module, "merged", False) or module.disable_adapters:
            continue
        w = getattr(module.get_base_layer(), "weight", None)
        active = [a for a in module.active_adapters if a in getattr(module, "lora_A", {})]
        if w is None or not active or getattr(module, "use_dora", {}).get(active[0], False):
            continue
        yield module, active


def lora_delta(module, active: Sequence[str]) -> torch.Tensor:
    """``scale * B @ A`` summed over a layer's active adapters: what merging adds to its base weight."""
    return sum(module.get_delta_weight(a) for a in active)


@contextlib.contextmanager
def merged_lora(model) -> Iterator[int]:
    """Merge every active LoRA adapter of ``model`` into its base weight for the ``with`` block.

    Yields the number of merged layers (0 for a model without LoRA: then nothing happens). Inside,
    the adapters are switched off (the merged base computes the same function); on exit each base
    weight gets its saved original back (``copy_``, bit-identical) and each adapter its previous
    on/off state. Works under ``torch.no_grad`` only (rollouts never need gradients). A rollout that
    decodes a copy of the model in another dtype does not use this: the copy takes the merged weights
    directly (:meth:`FastEngine.decode_model`), and the model is never touched.
    """
    saved: List[Tuple[torch.nn.Module, torch.Tensor, bool]] = []
    try:
        with torch.no_grad():
            for module, active in list(mergeable_lora(model)):
                w = module.get_base_layer().weight
                saved.append((module, w.detach().clone(), module._disable_adapters))
                w.add_(lora_delta(module, active).to(w.dtype))
                module._disable_adapters = True
        yield len(saved)
    finally:
        with torch.no_grad():
            for module, original, was_disabled in saved:
                module.get_base_layer().weight.copy_(original)
                module._disable_adapters = was_disabled


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0,
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Next tokens (B,) and their behaviour log-probs (B,) from last-position logits (B, V).

    temperature 0: argmax, log-prob under the plain softmax. Otherwise sample from
    softmax(logits / temperature) restricted to the top-k tokens and the top-p nucleus (the smallest
    set whose probability reaches top_p, the most likely token always kept); the log-prob is taken
    under the untruncated tempered softmax.
    """
    logits = logits.float()
    if temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / temperature if temperature != 1.0 else logits
    if not (top_k and top_k < scaled.shape[-1]) and top_p >= 1.0:
        # plain sampling: one softmax serves both the draw and the log-prob (a sampled token has p > 0)
        probs = torch.softmax(scaled, -1)
        tokens = draw(probs)
        return tokens, probs.gather(-1, tokens[:, None]).squeeze(-1).log()
    logp = torch.log_softmax(scaled, -1)
    masked = scaled
    if top_k and top_k < scaled.shape[-1]:
        kth = scaled.topk(top_k, dim=-1).values[:, -1:]
        masked = masked.masked_fill(masked < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = masked.sort(-1, descending=True)
        probs = torch.softmax(srt, -1)
        # drop a token when the tokens before it already reach top_p (the first one always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        masked = masked.scatter(-1, idx, srt.masked_fill(drop, float("-inf")))
    tokens = draw(torch.softmax(masked, -1))
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def draw(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of ``probs`` (B, V) by inverse-CDF sampling: a uniform u per row (torch's global
    RNG) and the first token whose cumulative probability exceeds u. Exact for the categorical
    distribution (a zero-probability token has an empty interval and is never drawn), and on a CPU
    many times faster than ``torch.multinomial`` over a large vocabulary."""
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, device=probs.device, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


def length_groups(prompts: Sequence[Sequence[int]], batch_size: int) -> List[List[int]]:
    """Prompt indices in batches of ``batch_size``, longest prompts first (stable for ties)."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _cache_kwarg(model) -> str:
    """The forward argument that takes the KV cache: ``cache`` in newer transformers, else
    ``past_key_values``."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: (*args, **kwargs)
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _make_cache(model, batch: int, max_len: int, static: bool):
    # deferred: transformers is slow to import; it loads when a model does
    from transformers import DynamicCache, StaticCache

    if static:
        try:
            return StaticCache(config=model.config, max_cache_len=max_len)
        except Exception:  # noqa: BLE001 - a model whose config StaticCache cannot read: dynamic cache
            pass
    return DynamicCache(config=model.config)


class FastEngine:
    """Batched sampling with our own decode loop (see the module docstring).

    ``generate(model, prompts, cfg, eos_ids, pad_id)`` returns ``(tokens, logprobs)``: for each prompt
    the sampled token ids (up to and including the first EOS, or ``max_new_tokens`` of them) and their
    behaviour log-probs. ``compile=True`` (CUDA only) compiles the one-token decode step with a
    static cache and keeps finished rows in the batch.
    """

    def __init__(self, static_cache: bool = True, compile: bool = False, dtype: Optional[torch.dtype] = None):
        self.static_cache = static_cache
        self.compile = compile
        self.dtype = dtype  # decode weights' dtype; None: the model's own
        self._compiled: Dict[int, object] = {}
        self._shadow: Optional[Tuple[weakref.ref, torch.nn.Module]] = None  # (source model, its decode copy)

    def decodes_a_copy(self, model) -> bool:
        """Whether :meth:`decode_model` decodes a copy of ``model`` in another dtype (else the model itself)."""
        p = next(iter(model.parameters()), None)
        return self.dtype is not None and p is not None and p.is_floating_point() and p.dtype != self.dtype

    @torch.no_grad()
    def decode_model(self, model, rows: int = 16):
        """The module that decodes: ``model`` itself, or (``dtype`` set and different from the model's)
        a copy of it in ``dtype`` holding the model's current weights, refreshed on every call.

        Like vLLM's separate inference weights: a CPU with AMX or a GPU decodes a bf16 copy of an fp32
        policy ~1.9x faster (SmolLM2-135M, 24 x 40 tokens, 2-core VM: 2.6 s against 4.8 s), while the
        policy keeps its fp32 master weights. LoRA adapters are merged into the copy's base weights as they
        are filled (``dtype(W + scale * B @ A)``, the numbers :func:`merged_lora` would give) and switched off
        in the copy; the model itself is not touched, and no fp32 copy of its weights is saved. Only
        parameters are cast: buffers (rotary
        frequencies) keep their dtype. The copy is built once per source model and refilled with
        ``copy_`` afterwards (no new allocation per rollout). On a CPU its bf16 linear layers are
        :class:`PackedLinear` s (``rows``: the decode batch, a blocking hint), packed from the model's
        weights on each refresh; their plain bf16 weights are never kept."""
        if not self.decodes_a_copy(model):
            return model
        if self._shadow is None or self._shadow[0]() is not model:
            self._shadow = None
            packed = packable_linears(model) if self.dtype == torch.bfloat16 and packing_works() else []
            # a weight another module also uses (an output head tied to the input embedding) keeps its
            # plain copy; the other packed weights exist only packed
            uses: Dict[int, int] = {}
            for m in model.modules():
                for p in m.parameters(recurse=False):
                    uses[id(p)] = uses.get(id(p), 0) + 1
            only_packed = {id(w) for w in (model.get_submodule(p).weight for p in packed) if uses[id(w)] == 1}
            # deepcopy with every parameter pre-mapped to an empty one of the copy's dtype: the module tree,
            # buffers and config are copied, the weights are never duplicated in the model's own dtype
            # (tied weights map to one parameter, so they stay tied); the refill below fills them
            memo = {id(p): torch.nn.Parameter(
                torch.empty(0 if id(p) in only_packed else p.shape, dtype=self.dtype if p.is_floating_point() else p.dtype,
                            device=p.device), requires_grad=False) for p in model.parameters()}
            copy = _copy.deepcopy(model, memo)
            if getattr(copy, "config", None) is not None:  # a copy of the config (deepcopy): the dtype it reports
                copy.config.dtype = self.dtype
            pack_linears(copy, rows, source=model, paths=packed)
            # the engine outlives runs (generate.fast_engine keeps it per setting): when the source model
            # is freed, so is its copy
            self._shadow = (weakref.ref(model, self._forget), copy)
        copy = self._shadow[1]
        # refill module by module (the copy's module list lines up with the source's: layers are swapped
        # one for one): adapters on/off as in the source, each mergeable LoRA adapter merged into the
        # copy's base weight (one layer's delta at a time) and switched off there, packed layers re-packed
        merge = {id(m): active for m, active in mergeable_lora(model)}
        delta_of: Dict[int, Tuple[torch.nn.Module, List[str]]] = {}  # base layer -> (LoRA layer, adapters)
        for dst, src in zip(copy.modules(), model.modules()):
            if hasattr(src, "_disable_adapters"):
                dst._disable_adapters = src._disable_adapters
            if id(src) in merge:
                delta_of[id(src.get_base_layer())] = (src, merge[id(src)])
                dst._disable_adapters = True
            own = dict(src.named_parameters(recurse=False))
            if id(src) in delta_of:
                lora, active = delta_of.pop(id(src))
                own["weight"] = own["weight"] + lora_delta(lora, active)
            if isinstance(dst, PackedLinear):
                dst.pack(own["weight"])
                if dst.bias is not None:
                    dst.bias.copy_(own["bias"])
            else:
                for name, p in dst.named_parameters(recurse=False):
                    p.copy_(own[name])
        return copy

    def _forget(self, _ref) -> None:
        """Drop the decode copy of a model that no longer exists."""
        if self._shadow is not None and self._shadow[0] is _ref:
            self._shadow = None

    def _step_fn(self, model):
        if not self.compile:
            return model
        key = id(model)
        if key not in self._compiled:
            self._compiled[key] = torch.compile(model, mode="reduce-overhead", fullgraph=False, dynamic=False)
        return self._compiled[key]

    @torch.no_grad()
    def generate(self, model, prompts: Sequence[Sequence[int]], cfg, eos_ids: Sequence[int], pad_id: int,
                 ) -> Tuple[List[List[int]], List[List[float]]]:
        model = unwrap(model)
        device = next(model.parameters()).device
        tokens: List[Optional[List[int]]] = [None] * len(prompts)
        logps: List[Optional[List[float]]] = [None] * len(prompts)
        was_training = model.training
        model.eval()
        try:
            with contextlib.nullcontext() if self.decodes_a_copy(model) else merged_lora(model):
                decoder = self.decode_model(model, cfg.batch_size)
                decoder.eval()
                for group in length_groups(prompts, cfg.batch_size):
                    out_t, out_l = self._batch(decoder, [prompts[i] for i in group], cfg, eos_ids, pad_id, device)
                    for i, t, l in zip(group, out_t, out_l):
                        tokens[i], logps[i] = t, l
        finally:
            model.train(was_training)
        return tokens, logps  # type: ignore[return-value]

    def _batch(self, model, prompts, cfg, eos_ids, pad_id, device):
        B, L, new = len(prompts), max(len(p) for p in prompts), cfg.max_new_tokens
        compiled = self.compile and device.type == "cuda"
        # identical prompts (the samples of a GRPO/RLOO group, which arrive as consecutive copies) are
        # prefilled once; their cache rows and last logits are then copied to every row that has them
        # (not when compiled: a compiled step keeps the prefill's shapes)
        first: Dict[Tuple[int, ...], int] = {}
        of_row = [first.setdefault(tuple(p), len(first)) for p in prompts] if not compiled else list(range(B))
        unique = list(first) if not compiled else [tuple(p) for p in prompts]
        U = len(unique)
        ids = torch.full((U, L), pad_id, dtype=torch.long)
        attn = torch.zeros((U, L + new), dtype=torch.long)
        for i, p in enumerate(unique):
            ids[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, L - len(p):L] = 1
        ids, attn = ids.to(device), attn.to(device)
        eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=device)
        cache = _make_cache(model, U, L + new, self.static_cache or compiled)
        # prefill: positions follow the attention mask, so left padding does not shift them
        pos = (attn[:, :L].cumsum(-1) - 1).clamp(min=0)
        ckw = _cache_kwarg(model)
        out = model(input_ids=ids, attention_mask=attn if cache.is_compileable else attn[:, :L],
                    position_ids=pos, use_cache=True, **{ckw: cache},
                    cache_position=torch.arange(L, device=device), logits_to_keep=keep_last(ids))
        logits = out.logits[:, -1]
        if U < B:  # one cache row (and logits row) per sample: index_select along the batch dimension
            expand = torch.tensor(of_row, dtype=torch.long, device=device)
            cache.reorder_cache(expand)
            logits, attn = logits.index_select(0, expand), attn.index_select(0, expand)
        plen = attn[:, :L].sum(-1)  # (B,) real prompt tokens: the next position id of each row
        rows = torch.arange(B, device=device)  # original row of each running row
        done = torch.zeros(B, dtype=torch.bool, device=device)  # compiled path: rows past their EOS
        step_tokens, step_logps = [], []  # per step: (B,) tensors over the original rows
        step = self._step_fn(model)
        # decode steps without transformers' per-op overhead where that gives its numbers bit for bit
        lean = None if compiled or not cache.is_compileable else lean_step(
            model, lambda m, b, n: _make_cache(m, b, n, True), ckw)
        for k in range(new):
            tok, lp = sample_next(logits, cfg.temperature, cfg.top_p, cfg.top_k)
            if rows.numel() < B:  # scatter the running rows back to their original places
                tok_b = torch.full((B,), pad_id, dtype=torch.long, device=device).index_copy(0, rows, tok)
                lp_b = torch.zeros(B, device=device).index_copy(0, rows, lp)
            else:
                tok_b, lp_b = tok, lp
            step_tokens.append(tok_b)
            step_logps.append(lp_b)
            if k == new - 1:
                break
            finished = torch.isin(tok, eos)
            if compiled:  # fixed shapes: finished rows keep decoding (cut below); stop when all are done
                done = done | finished
                if k % 8 == 7 and bool(done.all()):
                    break
            elif bool(finished.any()):  # one host read per step; finished rows leave batch and cache
                keep = (~finished).nonzero().squeeze(-1)
                if keep.numel() == 0:
                    break
                rows, tok, attn, plen = rows[keep], tok[keep], attn[keep], plen[keep]
                cache.reorder_cache(keep)
            attn[:, L + k] = 1
            where = torch.tensor([L + k], device=device)
            if lean is not None:
                logits = lean.step(tok, (plen + k)[:, None], cache, where, attn[:, None, None, :].bool())
                continue
            kv = attn if cache.is_compileable else attn[:, :L + k + 1]
            out = step(input_ids=tok[:, None], attention_mask=kv, position_ids=(plen + k)[:, None],
                       use_cache=True, **{ckw: cache}, cache_position=where, logits_to_keep=1)
            logits = out.logits[:, -1]
        T = torch.stack(step_tokens, 1).tolist()  # (B, steps): the one transfer of the batch
        P = torch.stack(step_logps, 1).tolist()
        eos_set = set(int(e) for e in eos_ids)
        res_t, res_l = [], []
        for t, l in zip(T, P):
            cut = next((j + 1 for j, x in enumerate(t) if x in eos_set), len(t))
            res_t.append(t[:cut])
            res_l.append(l[:cut])
        return res_t, res_l
