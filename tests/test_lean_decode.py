"""The lean decode step: transformers' logits bit for bit on every architecture it takes, the model's own
forward everywhere else (unknown architectures, sliding windows, anything the probe sees differ)."""

import pytest
import torch

from alignkit.rollout import lean as lean_mod
from alignkit.rollout.engine import FastEngine
from alignkit.rollout.generate import GenerationConfig
from alignkit.rollout.lean import LeanStep, lean_supported
from alignkit.testing import tiny_causal_lm

pytestmark = pytest.mark.hw  # behaviour depends on the CPU class: run again as an AVX2 CPU (docs/hardware.md)


def _qwen3(**kw):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen3Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, **kw)
    return tf.Qwen3ForCausalLM(cfg)


def _model(kind, dtype=torch.float32):
    m = _qwen3() if kind == "qwen3" else tiny_causal_lm(kind, **({"sliding_window": None} if kind == "mistral" else {}))
    if kind == "qwen2":  # its q/k/v biases are zero at init: make them count
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.q_proj.bias.normal_(0, 0.5)
                layer.self_attn.k_proj.bias.normal_(0, 0.5)
    return m.to(dtype).eval()


def _prompts(n=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 90, (k,), generator=g).tolist() for k in (5, 9, 3, 12, 7, 2, 10)[:n]]


def _generate(model, eos, lean: bool, monkeypatch, **engine):
    """(tokens, log-probs), and how many decode steps the lean step ran (its probe's steps not counted)."""
    calls = {"n": 0, "probing": False}
    real_step, real_probe = LeanStep.step, LeanStep.agrees

    def counted(self, *a, **k):
        calls["n"] += not calls["probing"]
        return real_step(self, *a, **k)

    def probe(self, *a, **k):
        calls["probing"] = True
        try:
            return real_probe(self, *a, **k)
        finally:
            calls["probing"] = False

    with monkeypatch.context() as mp:
        mp.setattr(LeanStep, "step", counted)
        mp.setattr(LeanStep, "agrees", probe)
        if not lean:
            mp.setattr("alignkit.rollout.engine.lean_step", lambda *a, **k: None)
        cfg = GenerationConfig(max_new_tokens=12, temperature=0, batch_size=4)
        out = FastEngine(**engine).generate(model, _prompts(), cfg, eos, 0)
    return out, calls["n"]


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_steps_give_transformers_tokens_and_logprobs_exactly(kind, dtype, monkeypatch):
    """Greedy decoding with lean steps equals decoding with the model's forward: the same tokens and the
    same behaviour log-probs, bit for bit, also after rows left the batch at EOS."""
    model = _model(kind, dtype)
    assert lean_supported(model)
    (ref_t, ref_l), n_ref = _generate(model, [], False, monkeypatch)
    assert n_ref == 0
    eos = [ref_t[1][3]]  # a token row 1 emits at step 4: some rows stop early and leave the batch
    (ref_t, ref_l), _ = _generate(model, eos, False, monkeypatch)
    (t, lp), n = _generate(model, eos, True, monkeypatch)
    assert n > 0  # the lean path really decoded
    assert any(len(r) < 12 for r in ref_t) and any(len(r) == 12 for r in ref_t)
    assert t == ref_t
    assert lp == ref_l


def test_bf16_decode_copy_decodes_lean(monkeypatch):
    """The engine's bf16 copy of an fp32 policy (packed linear layers) takes lean steps, and they give the
    copy's own forward tokens."""
    model = _model("llama")
    (ref, _), _ = _generate(model, [], False, monkeypatch, dtype=torch.bfloat16)
    (fast, _), n = _generate(model, [], True, monkeypatch, dtype=torch.bfloat16)
    assert n > 0 and fast == ref


def test_unsupported_architectures_decode_with_their_own_forward(monkeypatch):
    assert not lean_supported(tiny_causal_lm("mistral"))  # a sliding window of 6
    assert not lean_supported(_qwen3(layer_types=["full_attention", "sliding_attention"], sliding_window=4,
                                     use_sliding_window=True))
    for kind in ("gemma2", "cohere", "granite", "gpt2"):
        assert not lean_supported(tiny_causal_lm(kind)), kind
    model = _model("llama")
    model.config.hidden_act = "gelu"
    assert not lean_supported(model)


def test_the_probe_refuses_a_model_that_computes_something_else(monkeypatch):
    """A model whose layers do what the lean step does not (here: a patched MLP) fails the probe, decodes
    with its own forward, and gives its own tokens."""
    model = _model("llama")
    mlp = model.model.layers[1].mlp
    real = mlp.forward
    mlp.forward = lambda x: real(x) * 1.5
    lean_mod._LEAN.pop(model, None)
    (ref, _), _ = _generate(model, [], False, monkeypatch)
    (fast, _), n = _generate(model, [], True, monkeypatch)
    assert n == 0 and fast == ref
    assert lean_mod._LEAN[model][1] is None  # remembered: the probe runs once per model


def test_lora_policy_decodes_lean_with_its_adapters_merged(monkeypatch):
    """A LoRA policy: the engine merges its adapters for the rollout, the lean step then calls the merged
    layers, and the tokens and log-probs equal those of the model's own forward on the same merged weights;
    the base weights are bit-identical afterwards."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (fast, fast_lp), n = _generate(model, [], True, monkeypatch)
    (plain, plain_lp), _ = _generate(model, [], False, monkeypatch)
    assert n > 0 and fast == plain and fast_lp == plain_lp
    with torch.no_grad():  # the adapters count: without them the tokens differ
        with model.disable_adapter():
            (bare, _), _ = _generate(model, [], False, monkeypatch)
    assert bare != fast
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
