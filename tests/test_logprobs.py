"""Chunked log-probs equal the full log-softmax (values and gradients), under any padding."""

import pytest
import torch

from alignkit.data.layout import SeqBatch, pad_sequences
from alignkit.ops.logprobs import reference_logprobs, token_logprobs
from alignkit.testing import TINY_ARCHITECTURES, tiny_causal_lm, tiny_llama


def _batch(tok):
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27]]
    masks = [[0, 0, 1, 1, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]
    return pad_sequences(seqs, masks, tok.pad_token_id)


@pytest.mark.parametrize("chunk", [3, 1024])  # several checkpointed chunks; one chunk, not checkpointed
def test_chunked_matches_reference_values_and_grads(tiny_tok, chunk):
    model = tiny_llama(tiny_tok)
    b = _batch(tiny_tok)
    fast = token_logprobs(model, b, chunk_size=chunk, with_entropy=True)
    fast.sum().sum().backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref = reference_logprobs(model, b)
    ref.sum().sum().backward()
    g_ref = [p.grad.clone() for p in model.parameters()]
    assert torch.allclose(fast.logps, ref.logps, atol=1e-5)
    assert torch.allclose(fast.entropy * fast.mask, ref.entropy * ref.mask, atol=1e-5)
    assert fast.lengths().tolist() == [4.0, 2.0, 5.0]
    for a, r in zip(g_fast, g_ref):
        assert torch.allclose(a, r, atol=1e-5)


def test_left_right_and_no_padding_agree(tiny_tok):
    model = tiny_llama(tiny_tok).eval()
    seq, mask = [5, 6, 7, 8, 9], [0, 0, 1, 1, 1]
    alone = token_logprobs(model, pad_sequences([seq], [mask], 0)).sum()
    right = token_logprobs(model, pad_sequences([seq, [1] * 8], [mask, [0] * 8], 0)).sum()[0]
    # left padding: 3 pad tokens in front, masks shifted accordingly
    pad = tiny_tok.pad_token_id
    left = SeqBatch(torch.tensor([[pad] * 3 + seq]), torch.tensor([[0] * 3 + [1] * 5]), torch.tensor([[0] * 3 + mask]))
    left_lp = token_logprobs(model, left).sum()[0]
    assert torch.allclose(alone[0], right, atol=1e-5)
    assert torch.allclose(alone[0], left_lp, atol=1e-5)


@pytest.mark.parametrize("kind", TINY_ARCHITECTURES)
def test_chunked_equals_full_logits_on_every_architecture(kind, recwarn):
    """Gemma 2's softcap, Cohere's logit_scale and Granite's logits_scaling are applied by the chunked
    head (they were skipped: log-probs off by nats), values and gradients."""
    model = tiny_causal_lm(kind)
    seqs = [[5, 6, 7, 8, 9, 10, 11, 12], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]]
    masks = [[0, 0, 1, 1, 1, 1, 1, 1], [0, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1]]
    b = pad_sequences(seqs, masks, 0)
    full = token_logprobs(model, b, chunk_size=0, with_entropy=True)  # the model's own logits
    full.sum().sum().backward()
    g_full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    fast = token_logprobs(model, b, chunk_size=4, with_entropy=True)
    fast.sum().sum().backward()
    # the chunked head itself is right (no fallback to the model's full logits was needed), also
    # when the architecture is not on the known list and is checked against its own logits
    assert not [w for w in recwarn if "full logits" in str(w.message)]
    model.config.model_type = "unlisted"
    checked = token_logprobs(model, b, chunk_size=4)
    assert not [w for w in recwarn if "full logits" in str(w.message)]
    assert torch.allclose(checked.logps, full.logps, atol=1e-5)
    assert torch.allclose(fast.logps, full.logps, atol=1e-5), (fast.logps - full.logps).abs().max()
    assert torch.allclose(fast.entropy * fast.mask, full.entropy * full.mask, atol=1e-5)
    for p, g in zip(model.parameters(), g_full):
        assert torch.allclose(p.grad, g, atol=1e-5)
    ref = reference_logprobs(model, b)
    assert torch.allclose(fast.logps, ref.logps, atol=1e-5)


def test_unknown_logit_processing_falls_back_to_the_models_own_logits():
    """A model that does something to its logits that the chunked head does not know about."""
    model = tiny_causal_lm("llama")
    inner_forward = model.forward

    def forward(*a, **kw):
        out = inner_forward(*a, **kw)
        out.logits = out.logits * 2.0 + 1.0  # e.g. a multiplier no config key we know describes
        return out

    model.forward = forward
    model.config.model_type = "mystery"  # not a type whose head we know: checked against its own logits
    b = pad_sequences([[5, 6, 7, 8, 9]], [[0, 0, 1, 1, 1]], 0)
    with pytest.warns(UserWarning, match="full logits"):
        fast = token_logprobs(model, b, chunk_size=4)
    full = token_logprobs(model, b, chunk_size=0)
    assert torch.allclose(fast.logps, full.logps, atol=1e-6)
    assert not torch.allclose(fast.logps, reference_logprobs(tiny_causal_lm("llama"), b).logps, atol=1e-2)


def test_logprob_chunk_is_per_run_not_inherited(tmp_path, tiny_model, monkeypatch):
    """train.logprob_chunk=0 in one run (e.g. an earlier pipeline stage) no longer leaks into later
    callers such as `alignkit eval`, which use their own setting (it lived in a module global)."""
    import alignkit.ops.logprobs as lp
    from alignkit.rollout.generate import batched_logprobs
    from alignkit.train.sft import train_sft
    from tests.helpers import write_jsonl

    calls = []
    real = lp._chunk_logps
    monkeypatch.setattr(lp, "_chunk_logps", lambda *a, **k: calls.append(1) or real(*a, **k))
    data = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "hi", "completion": "there"}] * 4)
    train_sft({"model": {"name_or_path": str(tiny_model)}, "data": {"path": str(data)}, "output": str(tmp_path / "run"),
               "train": {"batch_size": 2, "max_steps": 1, "logprob_chunk": 0}, "log": {"progress": False}})
    assert calls == []  # the run used full logits as configured
    model = tiny_causal_lm("llama", vocab_size=120)
    batched_logprobs(model, pad_sequences([[5, 6, 7, 8]], [[0, 1, 1, 1]], 0))
    assert calls  # a later caller gets the default chunked head, not the previous run's 0
    assert not hasattr(lp, "set_chunk_size")


def test_ppo_shared_head_honours_full_logits():
    """PolicyWithValue used to turn train.logprob_chunk=0 into 1024; now 0 means the model's full logits."""
    from alignkit.train.ppo import PolicyWithValue

    b = pad_sequences([[5, 6, 7, 8, 9], [5, 6, 7]], [[0, 0, 1, 1, 1], [0, 1, 1]], 0)
    policy = tiny_causal_lm("gemma2")
    full = PolicyWithValue(policy, logprob_chunk=0)(b.input_ids, b.attention_mask, b.loss_mask)[0]
    chunked = PolicyWithValue(policy, logprob_chunk=2)(b.input_ids, b.attention_mask, b.loss_mask)[0]
    assert torch.allclose(full.logps, chunked.logps, atol=1e-5)
    assert torch.allclose(full.logps, reference_logprobs(policy, b).logps, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(TINY_ARCHITECTURES))
def test_keep_last_index_gives_the_last_position_logits(kind):
    """``keep_last`` (an index tensor, so the model gathers a contiguous last position instead of a
    strided view, see its docstring) yields exactly the logits of ``logits_to_keep=1``, in bf16 too."""
    from alignkit.ops.logprobs import keep_last

    model = tiny_causal_lm(kind).eval()
    ids = torch.randint(3, 90, (3, 7), generator=torch.Generator().manual_seed(0))
    assert keep_last(ids).tolist() == [6] and keep_last(ids[:, :1]) == 1
    for dtype in (torch.float32, torch.bfloat16):
        m = model.to(dtype)
        with torch.no_grad():
            want = m(input_ids=ids, logits_to_keep=1).logits
            got = m(input_ids=ids, logits_to_keep=keep_last(ids)).logits
        assert got.shape == want.shape == (3, 1, m.config.vocab_size)
        assert torch.equal(got, want), kind


@pytest.mark.parametrize("block", [2**19, 100])  # one row block; blocks of 2 rows (CPU cache-sized walk)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_label_logprobs_backward_matches_autograd(temperature, dtype, block, monkeypatch):
    """The hand-written backward of label_logprobs equals autograd through the plain formulas, for any
    mix of upstream gradients on the log-probs and the entropies, in one block or several."""
    from alignkit.ops import logprobs
    from alignkit.ops.logprobs import label_logprobs

    monkeypatch.setattr(logprobs, "CPU_BLOCK_ELEMENTS", block)

    g = torch.Generator().manual_seed(0)
    z = (torch.randn(6, 50, generator=g) * 3).to(dtype)
    y = torch.randint(0, 50, (6,), generator=g)
    g_lp, g_h = torch.randn(6, generator=g), torch.randn(6, generator=g)

    def plain(z):
        ls = torch.log_softmax(z.float() / temperature, -1)
        return ls.gather(-1, y[:, None]).squeeze(-1), -(ls.exp() * ls).sum(-1)

    for with_entropy, use_h in [(False, False), (True, False), (True, True)]:
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        lp, h = label_logprobs(za, y, temperature, with_entropy)
        lp_ref, h_ref = plain(zb)
        assert lp.dtype == torch.float32 and torch.allclose(lp, lp_ref, atol=1e-6)
        assert torch.allclose(h, h_ref if with_entropy else torch.zeros(6), atol=1e-5)
        ((lp * g_lp).sum() + ((h * g_h).sum() if use_h else 0)).backward()
        ((lp_ref * g_lp).sum() + ((h_ref * g_h).sum() if use_h else 0)).backward()
        assert za.grad.dtype == dtype
        assert torch.allclose(za.grad.float(), zb.grad.float(), atol=1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("temperature", [0.5, 1.0])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_label_logprobs_leaves_its_inputs_alone_so_a_second_backward_agrees(temperature, with_entropy):
    """fp32 logits are read in place (at tau 1 the forward uses them as they are, and the backward
    works inside the gradient's rows), so nothing may write into them."""
    from alignkit.ops.logprobs import label_logprobs

    z = torch.randn(3, 10, requires_grad=True)
    z0 = z.detach().clone()
    lp, h = label_logprobs(z, torch.tensor([1, 2, 3]), temperature=temperature, with_entropy=with_entropy)
    (lp.sum() + h.sum()).backward(retain_graph=True)
    first = z.grad.clone()
    (lp.sum() + h.sum()).backward()
    assert torch.equal(z.detach(), z0) and torch.allclose(z.grad, 2 * first)
    assert torch.allclose(lp.detach(), torch.log_softmax(z0 / temperature, -1)[range(3), [1, 2, 3]], atol=1e-6)
