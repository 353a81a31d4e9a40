"""The fast rollout engine: same greedy tokens as transformers' generate, reproducible sampling,
behaviour log-probs equal to a separate forward pass, LoRA merged for the rollout and restored bit
for bit."""

import pytest
import torch

from alignkit import hardware
from alignkit.ops.packed_linear import PackedLinear, pack_linears, packing_works
from alignkit.rollout.engine import FastEngine, draw, length_groups, merged_lora, sample_next
from alignkit.rollout.generate import GenerationConfig, _cut_at_eos, batched_logprobs, generate, hf_generate

pytestmark = pytest.mark.hw  # behaviour depends on the CPU class: run again as an AVX2 CPU (docs/hardware.md)


@pytest.fixture(scope="module")
def model_and_prompts():
    from alignkit.testing import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama(tok, hidden=64, layers=2, heads=4).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 90, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7, 7, 2, 10, 1)]
    return tok, model, prompts


@pytest.mark.parametrize("static,batch", [(True, 4), (False, 3), (True, 16)])
def test_greedy_tokens_equal_transformers_generate(model_and_prompts, static, batch):
    tok, model, prompts = model_and_prompts
    cfg = GenerationConfig(max_new_tokens=24, temperature=0, batch_size=batch)
    fast, _ = FastEngine(static_cache=static).generate(model, prompts, cfg, [tok.eos_token_id], tok.pad_token_id)
    ref = [_cut_at_eos(r, {tok.eos_token_id})[0] for r in hf_generate(model, tok, prompts, cfg)]
    assert fast == ref
    assert any(len(r) < 24 for r in ref) and any(len(r) == 24 for r in ref)  # rows left the batch early


@pytest.mark.parametrize("static", [True, False])
def test_shared_prompts_are_prefilled_once_and_give_generate_tokens(model_and_prompts, static):
    tok, model, prompts = model_and_prompts
    group = [p for p in prompts[:3] for _ in range(4)]  # 3 prompts x 4 samples, as GRPO sends them
    cfg = GenerationConfig(max_new_tokens=12, temperature=0, batch_size=12)
    rows = []  # input shape of every model forward: the prefill is the first (lean decode steps skip forward)
    hook = model.register_forward_pre_hook(lambda m, a, kw: rows.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        fast, _ = FastEngine(static_cache=static).generate(model, group, cfg, [tok.eos_token_id], tok.pad_token_id)
    finally:
        hook.remove()
    assert rows[0] == (3, max(len(p) for p in prompts[:3]))  # 3 distinct prompts prefilled, not 12
    ref = [_cut_at_eos(r, {tok.eos_token_id})[0] for r in hf_generate(model, tok, group, cfg)]
    assert fast == ref


def test_seeded_sampling_repeats_and_logprobs_match_a_forward_pass(model_and_prompts):
    tok, model, prompts = model_and_prompts
    cfg = GenerationConfig(max_new_tokens=16, temperature=0.8, top_p=0.9, top_k=40, batch_size=4, dtype="model")
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(generate(model, tok, prompts, cfg, n=2))
    a, b = runs
    assert a.response_ids == b.response_ids and torch.equal(a.logprobs, b.logprobs)
    torch.manual_seed(124)
    assert generate(model, tok, prompts, cfg, n=2).response_ids != a.response_ids
    # the engine's log-probs (no second pass) equal a separate forward pass at the sampling temperature
    ref = batched_logprobs(model, a.sequences, temperature=0.8)
    mask = a.sequences.loss_mask[:, 1:].bool()
    assert torch.allclose(a.logprobs[mask], ref[mask], atol=1e-5)
    assert torch.all(a.logprobs[~mask] == 0)


def test_sample_next_truncation():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, -3.0]]).repeat(2000, 1)
    torch.manual_seed(0)
    tok, lp = sample_next(logits, 1.0, top_k=2)
    assert set(tok.tolist()) == {0, 1}
    assert torch.allclose(lp, torch.log_softmax(logits[0], -1)[tok])  # untruncated tempered softmax
    p = torch.softmax(logits[0], -1)  # 0.61, 0.22, ...: top_p=0.7 keeps the first two
    tok, _ = sample_next(logits, 1.0, top_p=0.7)
    assert set(tok.tolist()) == {0, 1}
    tok, _ = sample_next(logits, 1.0, top_p=float(p[0]) * 0.99)
    assert set(tok.tolist()) == {0}
    tok, lp = sample_next(logits[:1], 0.0)
    assert tok.tolist() == [0] and torch.allclose(lp, torch.log_softmax(logits[0], -1)[:1])


def test_inverse_cdf_draw_follows_the_distribution():
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(40000, 1)
    torch.manual_seed(0)
    freq = torch.bincount(draw(probs), minlength=5).float() / 40000
    assert freq[1] == 0 and freq[4] == 0  # zero-probability tokens are never drawn
    assert torch.allclose(freq, probs[0], atol=0.01)
    torch.manual_seed(5)
    a = draw(probs[:50])
    torch.manual_seed(5)
    assert torch.equal(a, draw(probs[:50]))


def test_length_groups():
    prompts = [[1] * n for n in (3, 8, 1, 8, 5)]
    assert length_groups(prompts, 2) == [[1, 3], [4, 0], [2]]


def test_lora_merge_for_rollout_restores_base_weights_bit_identically(model_and_prompts):
    from alignkit.config import LoraConfig
    from alignkit.models.loading import apply_lora
    from alignkit.testing import tiny_llama

    tok, _, prompts = model_and_prompts
    policy = apply_lora(tiny_llama(tok, hidden=64, layers=2, heads=4), LoraConfig(enabled=True, r=4, alpha=8))
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    cfg = GenerationConfig(max_new_tokens=12, temperature=0, batch_size=4)
    torch.manual_seed(0)
    unmerged = [_cut_at_eos(r, {tok.eos_token_id})[0] for r in hf_generate(policy, tok, prompts, cfg)]
    seq = generate(policy, tok, prompts[:4], GenerationConfig(max_new_tokens=8, temperature=0), compute_logprobs=False)
    adapter_lp = batched_logprobs(policy, seq.sequences)
    with merged_lora(policy) as n_merged:
        assert n_merged > 0
        merged_lp = batched_logprobs(policy, seq.sequences)  # the merged base computes the same function
        assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters() if "base_layer" in n)
    assert torch.allclose(adapter_lp, merged_lp, atol=1e-5)
    for n, p in policy.named_parameters():
        assert torch.equal(p, before[n]), n  # bit-identical, adapters included
    import warnings

    with warnings.catch_warnings():  # the cache goes by the wrapped model's own argument name, not a deprecated one
        warnings.simplefilter("error", FutureWarning)
        fast, _ = FastEngine().generate(policy, prompts, cfg, [tok.eos_token_id], tok.pad_token_id)
    assert fast == unmerged
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    # a bf16 decode copy takes the merged weights itself (the policy is never written to): its greedy
    # tokens are those of the bf16 cast of the merged model decoded as it is, in three rollouts around
    # adapter updates
    engine = FastEngine(dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(3)
    for round_ in range(3):
        bf16, _ = engine.generate(policy, prompts, cfg, [tok.eos_token_id], tok.pad_token_id)
        with merged_lora(policy):
            want_model = _bf16_params(policy)
        want, _ = FastEngine().generate(want_model, prompts, cfg, [tok.eos_token_id], tok.pad_token_id)
        assert bf16 == want, round_
        assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    assert all(not m.disable_adapters for m in policy.modules() if hasattr(m, "lora_A"))
    for n, p in policy.named_parameters():  # still trainable exactly as before
        assert p.requires_grad == ("lora_" in n)


def _bf16_params(model):
    """A copy of ``model`` with its parameters (not its buffers) in bf16: what the engine decodes with."""
    import copy

    out = copy.deepcopy(model)
    for p in out.parameters():
        p.data = p.data.to(torch.bfloat16)
    return out


@pytest.mark.parametrize("isa", [None, "avx2"])
def test_bf16_decode_copy_gives_generate_tokens_of_bf16_weights_and_follows_updates(model_and_prompts, isa,
                                                                                    monkeypatch):
    """``dtype=bf16`` decodes a bf16 copy of an fp32 model: greedy tokens equal transformers' generate on
    the bf16 weights, the fp32 model is untouched, and a later call sees the model's updated weights.
    ``isa="avx2"``: the fallback of a CPU without oneDNN bf16 (plain bf16 linears), forced on every machine."""
    import copy

    if isa:
        monkeypatch.setenv("ALIGNKIT_CPU_ISA", isa)

    tok, model0, prompts = model_and_prompts
    model = copy.deepcopy(model0)
    cfg = GenerationConfig(max_new_tokens=16, temperature=0, batch_size=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = FastEngine(dtype=torch.bfloat16)
    for round_ in range(2):
        fast, logps = engine.generate(model, prompts, cfg, [tok.eos_token_id], tok.pad_token_id)
        ref = [_cut_at_eos(r, {tok.eos_token_id})[0] for r in hf_generate(_bf16_params(model), tok, prompts, cfg)]
        assert fast == ref, round_
        assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in model.named_parameters())
        with torch.no_grad():  # change the model: the next call must decode the new weights, not stale ones
            g = torch.Generator().manual_seed(round_)  # its own seed: the test does not depend on the order
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert engine._shadow is not None and engine._shadow[0]() is model  # one copy, refilled in place
    # where oneDNN packs bf16 weights (packing_works), its linear layers (7 per decoder layer and the head)
    # decode with pre-packed weights, re-packed with each refill (else round 1 would have decoded the old
    # weights); elsewhere (an AVX2 CPU, ALIGNKIT_CPU_ISA=avx2) they stay plain bf16 linears, the fallback
    copy = engine._shadow[1]
    packed = packing_works()
    assert sum(isinstance(m, PackedLinear) for m in copy.modules()) == (2 * 7 + 1 if packed else 0)
    # the packed layers' weights exist only packed: the copy's parameters are the embedding (the tied
    # head's weight) and the norms; unpacked, it holds every weight in bf16
    assert sum(p.numel() for p in copy.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if not packed or "embed" in n or "norm" in n)
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    import gc

    del model
    gc.collect()
    assert engine._shadow is None  # the copy goes with its source model (the engine outlives runs)


def test_generation_dtype_auto_follows_native_bf16(monkeypatch):
    from alignkit.rollout import generate as gen_mod

    cfg = GenerationConfig()
    monkeypatch.setattr(gen_mod, "native_bf16", lambda device_type=None: True)
    assert gen_mod.decode_dtype(cfg, "cpu") == torch.bfloat16
    assert gen_mod.decode_dtype(cfg.model_copy(update={"dtype": "model"}), "cpu") is None
    monkeypatch.setattr(gen_mod, "native_bf16", lambda device_type=None: False)
    assert gen_mod.decode_dtype(cfg, "cpu") is None
    assert gen_mod.decode_dtype(cfg.model_copy(update={"dtype": "bfloat16"}), "cpu") == torch.bfloat16


def test_native_bf16_measures_a_cpu_without_amx(monkeypatch):
    """AMX means bf16; AVX512-BF16 alone means bf16 only where a measured bf16 product beats fp32 by
    BF16_MIN_SPEEDUP (some Xeons expose the flag and run bf16 2x slower than fp32); neither means fp32.
    The CPU class is hardware.cpu_isa: here the chip's flags are faked and nothing caps them."""
    from alignkit.models import loading

    flags = set()
    monkeypatch.setattr(hardware, "_has", lambda flag: flag in flags)
    monkeypatch.setattr(hardware, "is_x86", lambda: True)
    monkeypatch.setattr(hardware, "isa_cap", lambda: None)
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: True)
    speed = {"x": 3.0}
    monkeypatch.setattr(loading, "cpu_bf16_speedup", lambda: speed["x"])
    assert not loading.native_bf16("cpu")
    flags.add("_is_avx512_bf16_supported")
    assert loading.native_bf16("cpu")
    speed["x"] = 0.5
    assert not loading.native_bf16("cpu")
    speed["x"] = loading.BF16_MIN_SPEEDUP
    assert loading.native_bf16("cpu")
    speed["x"] = 0.5
    flags.add("_is_amx_tile_supported")
    assert loading.native_bf16("cpu")  # AMX: no measurement needed
    assert not loading.native_bf16("mps")
    monkeypatch.setattr(hardware, "onednn_bf16", lambda: False)  # oneDNN without bf16 kernels: no bf16
    assert not loading.native_bf16("cpu")


def test_cpu_bf16_speedup_times_both_products_once(monkeypatch):
    """The measurement divides fp32's best time by bf16's, runs once per process per shape, and sees
    the products it claims to time (a fake linear that is 4x slower in fp32 gives 4x)."""
    from alignkit.models import loading

    loading.cpu_bf16_speedup.cache_clear()
    seen = []
    clock = {"t": 0.0}

    def fake_linear(a, b):
        seen.append((tuple(a.shape), tuple(b.shape), a.dtype))
        clock["t"] += 4.0 if a.dtype == torch.float32 else 1.0

    monkeypatch.setattr(torch.nn.functional, "linear", fake_linear)
    import time

    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    assert loading.cpu_bf16_speedup(rows=8, n_in=16, n_out=32, repeats=3) == pytest.approx(4.0)
    assert loading.cpu_bf16_speedup(rows=8, n_in=16, n_out=32, repeats=3) == pytest.approx(4.0)
    assert len(seen) == 8  # warm-up + 3 per dtype, and the second call came from the cache
    assert {s[:2] for s in seen} == {((8, 16), (32, 16))}
    assert [s[2] for s in seen].count(torch.bfloat16) == 4
    loading.cpu_bf16_speedup.cache_clear()


def test_cpu_bf16_speedup_takes_turns_so_a_load_burst_hits_both_dtypes(monkeypatch):
    """A burst of load from other processes (every product 3x slower) that starts halfway through the
    measurement: timed in turns, each dtype still has quiet samples and the true 4x is measured. (Timed
    one dtype after the other, as before, the burst fell on bf16 alone and gave 4/3 = 1.33x.)"""
    from alignkit.models import loading

    loading.cpu_bf16_speedup.cache_clear()
    calls = []
    clock = {"t": 0.0}

    def fake_linear(a, b):
        calls.append(a.dtype)
        base = 4.0 if a.dtype == torch.float32 else 1.0
        clock["t"] += base * (3.0 if len(calls) > 7 else 1.0)  # calls 8 onwards: the burst

    monkeypatch.setattr(torch.nn.functional, "linear", fake_linear)
    import time

    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])
    assert loading.cpu_bf16_speedup(rows=8, n_in=16, n_out=32, repeats=5) == pytest.approx(4.0)
    # warm-ups first, then fp32 and bf16 in turn
    assert calls[:6] == [torch.float32, torch.bfloat16] * 3
    loading.cpu_bf16_speedup.cache_clear()


@pytest.mark.skipif(not packing_works(), reason="oneDNN does not pack bf16 weights on this CPU (its probe says no: "
                    f"{hardware.describe()}); the fallback is tested on every machine")
def test_packed_linear_equals_linear_and_skips_what_it_must():
    """PackedLinear gives F.linear's bf16 numbers bit for bit at every row count (decode, prefill, one
    row) and follows a new weight given in fp32; pack_linears leaves fp32 layers and LoRA adapters
    alone (peft's layout: a LoRA layer holds its adapters in ModuleDicts named lora_A / lora_B)."""
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(48, 80).to(torch.bfloat16)
    packed = PackedLinear(lin.weight, lin.bias, rows=4)
    for shape in [(4, 1, 48), (3, 9, 48), (1, 48), (17, 48)]:
        x = torch.randn(*shape, generator=g).to(torch.bfloat16)
        assert torch.equal(packed(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    w32 = torch.randn(80, 48, generator=g)
    packed.pack(w32)
    x = torch.randn(5, 48, generator=g).to(torch.bfloat16)
    assert torch.equal(packed(x), torch.nn.functional.linear(x, w32.to(torch.bfloat16), lin.bias))

    net, lora = _lora_net()
    assert pack_linears(net, 4) == 0  # fp32: left alone
    net = net.to(torch.bfloat16)
    assert pack_linears(net, 4) == 2
    assert isinstance(net[0], PackedLinear) and isinstance(lora.base_layer, PackedLinear)
    assert type(lora.lora_A["default"]) is torch.nn.Linear


def _lora_net():
    lora = torch.nn.Module()
    lora.base_layer = torch.nn.Linear(8, 8)
    lora.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(8, 2)})
    return torch.nn.Sequential(torch.nn.Linear(8, 8), lora), lora


def test_pack_linears_falls_back_to_plain_linears_when_packing_is_off(monkeypatch):
    """On a CPU whose oneDNN has no bf16 kernels (forced here on every machine with ALIGNKIT_CPU_ISA=avx2)
    packing_works says no and pack_linears leaves every layer a plain nn.Linear, with its numbers."""
    monkeypatch.setenv("ALIGNKIT_CPU_ISA", "avx2")
    assert not packing_works()
    net, lora = _lora_net()
    net = net.to(torch.bfloat16)
    x = torch.randn(3, 8).to(torch.bfloat16)
    before = net[0](x)
    assert pack_linears(net, 4) == 0
    assert type(net[0]) is torch.nn.Linear and type(lora.base_layer) is torch.nn.Linear
    assert torch.equal(net[0](x), before)
