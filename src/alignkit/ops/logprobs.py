"""Per-token log-probabilities of the labels without materializing [B, T, V] fp32 logits.

The backbone runs once; the LM head, log-softmax and gather run over chunks of positions, and when
there is more than one chunk each is checkpointed, so the backward pass recomputes a chunk's logits
instead of keeping them all.
Peak extra memory is O(chunk x V) instead of O(B x T x V). ``reference_logprobs`` is the slow,
obvious version the tests check against.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from alignkit.data.layout import SeqBatch, SharedRows
from alignkit.ops.packing import model_inputs, position_ids  # noqa: F401  (position_ids: re-exported)
from alignkit.ops.masked import masked_mean, masked_sum
from alignkit.ops.wrappers import unwrap

#: label positions per chunk when a caller does not say (``train.logprob_chunk``'s default). A constant:
#: every caller passes its own run's setting explicitly, nothing is carried between runs.
DEFAULT_CHUNK = 1024


@dataclass
class TokenLogprobs:
    logps: torch.Tensor  # (B, T-1) log p(x_{t+1} | x_<=t), 0 where mask is 0
    mask: torch.Tensor  # (B, T-1) float, 1 on label tokens
    entropy: Optional[torch.Tensor] = None  # (B, T-1) when asked for; 0 where mask is 0 (chunked path)
    # packed batches: the sequence each label belongs to (B, T-1), -1 none; per-sequence reductions use it
    seq_index: Optional[torch.Tensor] = None
    num_seqs: int = 0

    def _per_seq(self, x: torch.Tensor) -> torch.Tensor:
        """(num_seqs,) sums of ``x`` (0 off the labels) over each packed sequence's labels."""
        out = torch.zeros(self.num_seqs + 1, dtype=x.dtype, device=x.device)
        return out.index_add(0, self.seq_index.reshape(-1) + 1, x.reshape(-1))[1:]  # bin 0 takes index -1

    def sum(self) -> torch.Tensor:
        """(B,) summed log-prob of each sequence's label tokens (B = sequences, also when packed)."""
        if self.seq_index is not None:
            return self._per_seq(torch.where(self.mask != 0, self.logps, torch.zeros_like(self.logps)))
        return masked_sum(self.logps, self.mask, -1)

    def lengths(self) -> torch.Tensor:
        return self._per_seq(self.mask) if self.seq_index is not None else self.mask.sum(-1)

    def mean(self) -> torch.Tensor:
        """(B,) mean log-prob per label token (0 for a row without labels)."""
        if self.seq_index is not None:
            return self.sum() / self.lengths().clamp(min=1)
        return masked_mean(self.logps, self.mask, -1)


@dataclass(frozen=True)
class LogitPost:
    """The model's own post-processing of ``hidden @ W.T + b``, read from its config.

    - ``scale``: Cohere's ``logit_scale`` (logits * s) and Granite's ``logits_scaling`` (logits / s);
    - ``softcap``: Gemma 2/3's ``final_logit_softcapping`` (c * tanh(logits / c)).
    Anything else a model does to its logits is caught by :func:`_head_agrees`, which compares this
    head with the model's own logits once per model and falls back to full logits on a mismatch.
    """

    scale: float = 1.0
    softcap: Optional[float] = None

    @classmethod
    def of(cls, model) -> "LogitPost":
        cfg = getattr(unwrap(model), "config", None)
        scale = 1.0
        if getattr(cfg, "logit_scale", None) is not None:  # Cohere, Cohere2
            scale *= float(cfg.logit_scale)
        if getattr(cfg, "logits_scaling", None) is not None:  # Granite, GraniteMoE
            scale /= float(cfg.logits_scaling)
        cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2, Gemma 3
        return cls(scale, float(cap) if cap else None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], post: LogitPost):
    return post(F.linear(hidden, weight, bias))


#: fp32 elements of one row block in :class:`_LabelLogprobs` on a CPU: 2 MiB, about one core's L2 cache
CPU_BLOCK_ELEMENTS = 2**19


def _row_blocks(z: torch.Tensor):
    """Row slices of z (N, V) that each fit CPU_BLOCK_ELEMENTS in fp32; one slice on a GPU, where every
    extra kernel launch costs more than the memory traffic it saves."""
    n, v = z.shape
    rows = n if z.device.type != "cpu" else max(1, CPU_BLOCK_ELEMENTS // max(v, 1))
    return [slice(s, min(s + rows, n)) for s in range(0, n, rows)]


def _scaled_fp32(block: torch.Tensor, temperature: float, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``block / tau`` in fp32. Without ``out``: ``block`` itself when it is fp32 and tau is 1 (callers
    only read it), else a new tensor. With ``out`` (fp32, block's shape): written there, so a caller may
    change the result in place without touching the saved logits."""
    if out is None and block.dtype == torch.float32 and temperature == 1.0:
        return block
    if out is None:
        return block.to(torch.float32, copy=True).div_(temperature) if temperature != 1.0 else block.float()
    return torch.div(block, temperature, out=out) if temperature != 1.0 else out.copy_(block)


class _LabelLogprobs(torch.autograd.Function):
    """``log softmax(z / tau)[y]`` per row, and optionally the entropy, with a hand-written backward.

    Shapes: ``logits`` z (N, V) in any float dtype (bf16 under autocast), ``labels`` y (N,); outputs (N,)
    in fp32. Forward, per row: ``logZ = logsumexp(z / tau)``, ``logp = z_y / tau - logZ`` and, with
    ``p = exp(z / tau - logZ)``, ``H = logZ - sum_j p_j z_j / tau``. Backward, from
    d logp_i / d z_ij = (1[j = y_i] - p_ij) / tau and dH_i / d z_ij = -p_ij (ls_ij + H_i) / tau with
    ``ls = z / tau - logZ``:

        grad_z = (g_lp * onehot(y) - p * (g_lp + g_H * (ls + H))) / tau

    Only z itself (already alive: the head's output) and logZ (N,) are saved. Both passes walk the rows in
    blocks of about 2 MiB of fp32 on a CPU (:func:`_row_blocks`), so the fp32 copy, exp and scaling of a
    block stay in cache and no (N, V) fp32 tensor is ever written. Autograd's own graph for the same
    formula (cast, logsumexp, gather, sub) passes over a full (N, V) fp32 block about ten times in the
    backward. On the 2-core CPU, for a SmolLM2 head chunk of 490 x 49152 under bf16 autocast, this took
    the non-matmul part of forward + backward from 118 ms (autograd) to 28 ms. With fp32 logits (fp32
    training, e.g. on a CPU where bf16 is slower) no block is copied: at tau 1 the forward reads the
    logits in place, and the backward works inside the gradient's own rows (489 x 49152 fp32, forward +
    backward: 44 -> 27 ms on 2 Xeon cores).
    ``reference_logprobs`` (plain autograd) is the slow version the tests check this against.
    """

    @staticmethod
    def forward(ctx, logits, labels, temperature: float, with_entropy: bool):
        n = logits.shape[0]
        logz = torch.empty(n, dtype=torch.float32, device=logits.device)  # (N,)
        ent = torch.zeros(n, dtype=torch.float32, device=logits.device)  # (N,)
        for rows in _row_blocks(logits):
            z = _scaled_fp32(logits[rows], temperature)  # (b, V) fp32, cache-sized on a CPU; z itself if it is
            lz = torch.logsumexp(z, -1)  # fp32 at tau 1, read only here
            logz[rows] = lz
            if with_entropy:  # H = logZ - sum_j p_j z_j
                ent[rows] = lz - (z - lz.unsqueeze(-1)).exp_().mul_(z).sum(-1)
        z_y = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1).float()
        logp = z_y / temperature - logz  # (N,)
        ctx.save_for_backward(logits, labels, logz, ent)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        ctx.mark_non_differentiable(labels)
        return logp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        logits, labels, logz, ent = ctx.saved_tensors
        if g_lp is None:
            g_lp = torch.zeros_like(logz)
        use_h = ctx.with_entropy and g_ent is not None
        grad = torch.empty_like(logits)  # (N, V) in z's dtype, written block by block
        direct = grad.dtype == torch.float32  # fp32 logits: work in grad's own rows, no copy in or out
        for rows in _row_blocks(logits):
            if direct and ctx.temperature == 1.0:  # log p = z - logZ straight into grad's rows
                ls = torch.sub(logits[rows], logz[rows].unsqueeze(-1), out=grad[rows])
            else:
                ls = _scaled_fp32(logits[rows], ctx.temperature, out=grad[rows] if direct else None)
                ls = ls.sub_(logz[rows].unsqueeze(-1))  # log p
            g = g_lp[rows].unsqueeze(-1)
            if use_h:  # -p * (g_lp + g_H * (ls + H))
                p = ls.exp()
                blk = ls.add_(ent[rows].unsqueeze(-1)).mul_(g_ent[rows].unsqueeze(-1)).add_(g).mul_(p).neg_()
            else:  # -p * g_lp, in place
                blk = ls.exp_().mul_(-g)
            blk.scatter_add_(-1, labels[rows].unsqueeze(-1), g)  # + g_lp at the label
            if ctx.temperature != 1.0:
                blk.div_(ctx.temperature)
            if blk.data_ptr() != grad[rows].data_ptr():
                grad[rows] = blk
        return grad, None, None, None


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                   with_entropy: bool = False):
    """Log-probs of ``labels`` (N,) under ``logits`` (N, V) at ``temperature``, and the entropy of each row
    (zeros unless ``with_entropy``): both (N,) fp32, differentiable (see :class:`_LabelLogprobs`)."""
    return _LabelLogprobs.apply(logits, labels, float(temperature), bool(with_entropy))


def _chunk_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
                 temperature: float, with_entropy: bool, post: LogitPost = LogitPost()):
    # (N, V) logits for this chunk only, in the head's compute dtype
    return label_logprobs(_head_logits(hidden, weight, bias, post), labels, temperature, with_entropy)


def _output_layer(model):
    head = unwrap(model).get_output_embeddings()
    if head is None or not isinstance(head, torch.nn.Linear) or head.weight.dim() != 2:
        return None  # sharded (FSDP) or unusual heads: fall back to full logits
    return head


#: model types whose causal-LM logits are exactly ``LogitPost(hidden @ W.T + b)`` in transformers 5.x
#: (read from their modeling code). Any other type is checked against its own logits once.
KNOWN_HEADS = frozenset({
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gpt2", "gemma", "gemma2",
    "gemma3_text", "cohere", "cohere2", "granite", "granitemoe", "phi", "phi3", "olmo", "olmo2", "smollm3",
    "starcoder2", "stablelm", "gpt_neox"})

# model -> whether our head reproduces its logits (checked once per model object, for types outside
# KNOWN_HEADS; a fact about the architecture, not a setting, so it cannot leak between runs)
_HEAD_AGREES: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def _head_agrees(model, out, head: torch.nn.Linear, post: LogitPost) -> bool:
    """Whether our head reproduces the model's logits. Known types: yes. Others: compare our head on
    the last position's hidden state with the model's own logits there (``logits_to_keep=1`` computed
    them anyway), once per model (one host read); False means: use full logits."""
    key = unwrap(model)
    if getattr(getattr(key, "config", None), "model_type", None) in KNOWN_HEADS:
        return True
    if key not in _HEAD_AGREES:
        with torch.no_grad():
            own = out.logits[:, -1].float()
            mine = _head_logits(out.hidden_states[-1][:, -1], head.weight, head.bias, post).float()
            diff = float((own - mine).abs().max()) if own.numel() else 0.0
            scale = 1.0 + float(own.abs().max()) if own.numel() else 1.0
        # fp32 agrees to rounding; bf16/fp16 heads (or autocast) to a few units of their precision
        tol = 1e-4 if out.logits.dtype == torch.float32 else 3e-2
        ok = math.isfinite(diff) and diff <= tol * scale
        if not ok:
            warnings.warn(f"{type(key).__name__}: the chunked log-prob head differs from the model's own logits "
                          f"(max |diff| {diff:.3g}); this model's log-probs use its full logits instead "
                          "(correct; more memory, as with train.logprob_chunk=0)", stacklevel=3)
        _HEAD_AGREES[key] = ok
    return _HEAD_AGREES[key]


def keep_last(input_ids: torch.Tensor):
    """``logits_to_keep`` for "the last position only", as an index tensor rather than the int 1.

    Why: the int makes the model slice ``hidden[:, -1:, :]``, a non-contiguous (B, 1, H) view, and on a
    CPU a bf16 linear layer whose weight does not require grad (a frozen model in bf16, or a frozen fp32
    one under bf16 autocast) turns that view into a bmm over a weight expanded to (B, H, V): 1.2 s
    instead of 7 ms for SmolLM2's head at B = 8 (torch 2.13). An index tensor makes the model gather
    a contiguous (B, 1, H) copy instead; same logits."""
    return torch.tensor([input_ids.shape[-1] - 1], device=input_ids.device) if input_ids.shape[-1] > 1 else 1


def _hidden_states(model, inputs, head, post: LogitPost) -> Optional[torch.Tensor]:
    """Final hidden states (B, T, H) from the *wrapped* model's forward, so DDP/accelerate hooks run,
    with the LM head applied to one position only (logits_to_keep=1). None: use full logits (a model
    without logits_to_keep, or one whose logits our head does not reproduce)."""
    try:
        out = model(**inputs, output_hidden_states=True, logits_to_keep=keep_last(inputs["input_ids"]), use_cache=False)
    except TypeError:  # a model without logits_to_keep
        return None
    if getattr(out, "logits", None) is not None and not _head_agrees(model, out, head, post):
        return None
    return out.hidden_states[-1]


def _label_sources(batch: SeqBatch) -> torch.Tensor:
    """(B, T-1) position whose hidden state predicts label ``t`` (token ``t+1``): ``t``, except where a
    prefix-shared layout says otherwise (a response's first token follows its prompt's last)."""
    if batch.label_from is not None:
        return batch.label_from[:, 1:]
    B, T = batch.input_ids.shape
    return torch.arange(T - 1, device=batch.input_ids.device).expand(B, T - 1)


def _full_logps(logits: torch.Tensor, batch: SeqBatch, temperature: float, with_entropy: bool):
    """Log-probs (and entropy) of the labels from full logits (B, T, V)."""
    labels = batch.input_ids[:, 1:]
    if batch.label_from is None:
        logits = logits[:, :-1]
    else:
        logits = logits[torch.arange(logits.shape[0], device=logits.device)[:, None], _label_sources(batch)]
    logp_all = torch.log_softmax(logits.float() / temperature, -1)
    logps = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None
    return logps, ent


def _result(batch: SeqBatch, logps: torch.Tensor, mask: torch.Tensor, ent: Optional[torch.Tensor]) -> TokenLogprobs:
    if batch.seq_index is None:
        return TokenLogprobs(logps * mask, mask, ent)
    return TokenLogprobs(logps * mask, mask, ent, batch.seq_index[:, 1:], batch.num_seqs)


def token_logprobs(model, batch: SeqBatch, *, temperature: float = 1.0, with_entropy: bool = False,
                   chunk_size: int = DEFAULT_CHUNK) -> TokenLogprobs:
    """Log-probs of ``batch.input_ids[:, 1:]`` under ``model``, masked by ``batch.loss_mask[:, 1:]``.

    ``chunk_size``: label positions per checkpointed head chunk (the run's ``train.logprob_chunk``);
    0 computes the model's full logits. The chunked head applies the model's logit post-processing
    (:class:`LogitPost`: softcap, scale, bias). It falls back to full logits when the model is wrapped
    in a way that hides its head (FSDP, custom code) or when its logits differ from our head's
    (checked once per model): correct, just without the memory saving.

    Padded and packed batches alike (``data/layout.py``); for packed ones ``.sum()``/``.lengths()``
    reduce per sequence.
    """
    labels = batch.input_ids[:, 1:]  # (B, T-1)
    mask = batch.loss_mask[:, 1:].float()
    inputs = model_inputs(model, batch)
    head = _output_layer(model)
    post = LogitPost.of(model)
    hidden = _hidden_states(model, inputs, head, post) if head is not None and chunk_size > 0 else None
    if hidden is None:
        logits = model(**inputs, use_cache=False).logits
        logps, ent = _full_logps(logits, batch, temperature, with_entropy)
        return _result(batch, logps, mask, ent)
    B, T1 = labels.shape
    T = T1 + 1
    h = hidden.reshape(B * T, -1)  # (B*T, H), a view
    src = (_label_sources(batch) + torch.arange(B, device=h.device)[:, None] * T).reshape(-1)  # (B*(T-1),)
    flat_labels = labels.reshape(-1)
    flat_mask = mask.reshape(-1).bool()
    # only label positions need the head: prompts and padding are skipped entirely (entropy too: it is
    # 0 off the labels, where nothing reads it)
    idx = flat_mask.nonzero(as_tuple=True)[0]
    out_lp = torch.zeros(B * T1, dtype=torch.float32, device=h.device)
    out_ent = torch.zeros(B * T1, dtype=torch.float32, device=h.device) if with_entropy else None
    # checkpoint each chunk (recompute its logits in the backward) only when there are several: one chunk's
    # logits are alive at the start of the backward either way, so checkpointing a single chunk would only
    # add a head matmul (the common case of short batches)
    recompute = (torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad)
                 and idx.numel() > chunk_size)
    lp_parts, ent_parts = [], []
    for start in range(0, idx.numel(), chunk_size):
        sel = idx[start:start + chunk_size]
        args = (h.index_select(0, src.index_select(0, sel)), head.weight, head.bias,
                flat_labels.index_select(0, sel), temperature, with_entropy, post)
        if recompute:
            lp, ent = checkpoint(_chunk_logps, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logps(*args)
        lp_parts.append(lp)
        ent_parts.append(ent)
    if lp_parts:
        out_lp = out_lp.index_put((idx,), torch.cat(lp_parts))
        if with_entropy:
            out_ent = out_ent.index_put((idx,), torch.cat(ent_parts))
    return _result(batch, out_lp.view(B, T1), mask, out_ent.view(B, T1) if with_entropy else None)


def row_logprobs(model, seq: SeqBatch, shared: Optional[SharedRows] = None, *, temperature: float = 1.0,
                 with_entropy: bool = False, chunk_size: int = DEFAULT_CHUNK) -> TokenLogprobs:
    """:func:`token_logprobs` of the right-padded rows ``seq``, computed on ``shared`` (the same rows with
    each prompt once, :func:`~alignkit.data.layout.share_row_prompts`) when given: the prompt's forward
    runs once per group and the results come back in the rows' ``(B, T-1)`` label space, as if each row
    had been run alone (exact where :func:`~alignkit.ops.packing.resolve_packing`'s probe says so)."""
    tl = token_logprobs(model, shared.batch if shared is not None else seq, temperature=temperature,
                        with_entropy=with_entropy, chunk_size=chunk_size)
    return tl if shared is None else shared_to_rows(tl, seq, shared)


def shared_to_rows(tl: TokenLogprobs, seq: SeqBatch, shared: SharedRows) -> TokenLogprobs:
    """``tl`` of the shared layout ``shared.batch``, in the label space of the rows ``seq``."""
    return TokenLogprobs(shared.to_rows(tl.logps), seq.loss_mask[:, 1:].float(),
                         shared.to_rows(tl.entropy) if tl.entropy is not None else None)


def reference_logprobs(model, batch: SeqBatch, temperature: float = 1.0) -> TokenLogprobs:
    """The plain version: full logits, full log-softmax. For tests and as documentation."""
    logits = model(**model_inputs(model, batch)).logits
    logps, ent = _full_logps(logits, batch, temperature, True)
    return _result(batch, logps, batch.loss_mask[:, 1:].float(), ent)
