"""alignkit_sdpa: sdpa whose CPU training pass under bf16 runs in fp32 (ops/attention.py)."""

import copy
import json

import pytest
import torch

from alignkit.config import ModelConfig
from alignkit.data.layout import PADDED, Packing, layout_pairs
from alignkit.models.loading import load_causal_lm
from alignkit.ops import attention
from alignkit.ops.logprobs import token_logprobs
from alignkit.ops.packing import resolve_packing
from alignkit.testing import tiny_causal_lm

pytestmark = pytest.mark.hw  # behaviour depends on the CPU class: run again as an AVX2 CPU (docs/hardware.md)

SHARED = Packing(pack=True, share_prompt=True)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="the switch is for CPU-only hosts")


def _spy(monkeypatch):
    """Record the dtype SDPA computes in and whether autocast was on around each call."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *a, **kw):
        calls.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return calls


def _pairs():
    g = torch.Generator().manual_seed(0)
    rnd = lambda n: torch.randint(3, 90, (n,), generator=g).tolist()  # noqa: E731
    return [rnd(n) for n in (5, 9, 3)], [rnd(n) for n in (4, 8, 6)], [rnd(n) for n in (7, 3, 5)]


def _run(model, batch, bf16: bool):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tl = token_logprobs(model, batch)
    tl.sum().sum().backward()
    return tl.sum().detach(), [p.grad.clone() for p in model.parameters()]


@no_cuda
def test_loaded_cpu_models_use_it_and_save_plain_configs(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load_causal_lm(ModelConfig(name_or_path=str(tiny_model)))
    assert model.config._attn_implementation == attention.NAME
    model.save_pretrained(tmp_path / "m")
    assert not any("attn" in k for k in json.loads((tmp_path / "m" / "config.json").read_text()))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").config._attn_implementation == "sdpa"


def test_training_pass_runs_in_fp32_and_matches_sdpa(monkeypatch):
    plain = tiny_causal_lm("llama")
    ours = copy.deepcopy(plain)
    assert attention.use_for(ours) == (not torch.cuda.is_available())
    attention.register()
    ours.set_attn_implementation(attention.NAME)  # also on a GPU host: the function is what is tested
    P, C, R = _pairs()
    batch = layout_pairs(P, C, R, 0, SHARED)
    calls = _spy(monkeypatch)
    s_plain, g_plain = _run(plain, batch, bf16=True)
    assert calls and all(c[3] for c in calls)  # plain sdpa: autocast casts q, k, v to bf16 inside
    calls.clear()
    s_ours, g_ours = _run(ours, batch, bf16=True)
    assert calls and all(c[:3] == (torch.float32,) * 3 and not c[3] for c in calls)
    s_ref, g_ref = _run(copy.deepcopy(plain), batch, bf16=False)  # fp32 throughout
    torch.testing.assert_close(s_ours, s_plain, rtol=2e-2, atol=5e-2)
    for a, b, r in zip(g_ours, g_plain, g_ref):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)
    # the fp32 attention brings the bf16 run no further from the fp32 one than the bf16 kernel
    err = lambda gs: sum((a - r).norm() for a, r in zip(gs, g_ref))  # noqa: E731
    assert err(g_ours) <= err(g_plain) * 1.05, (err(g_ours), err(g_plain))


def test_no_grad_passes_give_the_training_numbers_and_fp32_is_exactly_sdpa():
    plain = tiny_causal_lm("llama")
    ours = copy.deepcopy(plain)
    attention.register()
    ours.set_attn_implementation(attention.NAME)
    P, C, R = _pairs()
    batch = layout_pairs(P, C, R, 0, SHARED)
    # under autocast, old log-probs / references (no grad) equal the training pass's log-probs exactly
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            frozen = token_logprobs(ours, batch).logps
        trained = token_logprobs(ours, batch).logps
    assert torch.equal(frozen, trained.detach())
    # fp32 training, and bf16 weights without autocast (the decode copy): exactly sdpa on padded rows
    # (packed rows take segment attention: test_segment_attention_equals_the_masked_rows below)
    batch = layout_pairs(P, C, R, 0, PADDED)
    s_p, g_p = _run(plain, batch, bf16=False)
    s_o, g_o = _run(ours, batch, bf16=False)
    assert torch.equal(s_p, s_o) and all(torch.equal(a, b) for a, b in zip(g_p, g_o))
    with torch.no_grad():
        assert torch.equal(token_logprobs(copy.deepcopy(plain).bfloat16(), batch).logps,
                           token_logprobs(copy.deepcopy(ours).bfloat16(), batch).logps)


def test_segments_by_hand():
    """[1 2 3] shared by [4] (whose responses are [5 6] and [7]) and by [8]: each segment's queries, the
    keys they see (ancestors first, then their own causally), and no empty query row."""
    from alignkit.data.layout import layout_prompted

    b = layout_prompted([([1, 2, 3, 4], [([5, 6], 0), ([7], 1)]), ([1, 2, 3, 8], [([9], 2)])], 0, SHARED)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    buckets = attention.segments_of(b.block, b.block_end, b.attention_mask)
    assert len(buckets) == 1  # small segments share one call
    seg = buckets[0]
    # segments [1 2 3], [4], [5 6], [7], [8], [9], in a bucket sorted by key count; a slot past a segment's
    # tokens holds index 0
    assert seg.q_index.tolist() == [[0, 1, 2], [3, 0, 0], [7, 0, 0], [6, 0, 0], [8, 0, 0], [4, 5, 0]]
    assert seg.k_index.tolist() == [[0, 1, 2, 0, 0, 0], [0, 1, 2, 3, 0, 0], [0, 1, 2, 7, 0, 0],
                                    [0, 1, 2, 3, 6, 0], [0, 1, 2, 7, 8, 0], [0, 1, 2, 3, 4, 5]]
    m = seg.mask[:, 0].int().tolist()
    assert m[5] == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]]  # [5 6]: causal in itself
    assert m[0] == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]]
    assert sorted(seg.q_token.tolist()) == list(range(9))  # every real token is a query exactly once


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_segment_attention_equals_the_masked_rows(kind):
    """Packed and prefix-shared batches (a two-level prompt tree) through segment attention give the
    log-probs and gradients of the same batch through the dense mask (fp32, 1e-5)."""
    from alignkit.data.layout import layout_sequences
    from alignkit.ops.packing import model_inputs

    dense = tiny_causal_lm(kind)
    seg = copy.deepcopy(dense)
    attention.register()
    seg.set_attn_implementation(attention.NAME)
    assert attention.takes_segments(seg.config) and not attention.takes_segments(dense.config)
    P, C, R = _pairs()
    P = [P[0], P[0][:3] + P[1], P[2]]  # two prompts with a common beginning
    g = torch.Generator().manual_seed(1)
    long_ = torch.randint(3, 90, (300,), generator=g).tolist()
    mixed = layout_sequences([long_] + [long_[7 * i:7 * i + 6] for i in range(12)],
                             [[0] + [1] * 299] + [[0] + [1] * 5] * 12, 0, Packing(pack=True))
    buckets = model_inputs(seg, mixed)["alignkit_segments"]
    assert len(buckets) == 2 and buckets[-1].q_index.shape == (1, 300)  # the short ones: not padded to 300
    for batch in (layout_pairs(P, C, R, 0, Packing(pack=True)), layout_pairs(P, C, R, 0, SHARED), mixed):
        assert "alignkit_segments" in model_inputs(seg, batch)
        (s_d, g_d), (s_s, g_s) = (_run(m, batch, bf16=False) for m in (dense, seg))
        torch.testing.assert_close(s_s, s_d, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_s, g_d):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(1.0, float(b.abs().max())))


def test_prefix_sharing_keeps_working_with_it():
    model = tiny_causal_lm("qwen2")
    attention.register()
    model.set_attn_implementation(attention.NAME)
    assert resolve_packing(model, True, True) == SHARED  # boolean 4D masks, like sdpa
    P, C, R = _pairs()
    shared, padded = (_run(model, layout_pairs(P, C, R, 0, p), bf16=True) for p in (SHARED, PADDED))
    torch.testing.assert_close(shared[0], padded[0], rtol=2e-2, atol=5e-2)
