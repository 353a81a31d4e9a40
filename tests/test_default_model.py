"""The embedded default model (SmolLM2-135M-Instruct) converts once, loads and generates."""

import pytest
import torch

pytestmark = pytest.mark.slow


def test_default_model_loads_and_generates():
    from alignkit.config import ModelConfig
    from alignkit.models.default import default_model_dir
    from alignkit.models.loading import load_causal_lm, load_tokenizer

    path = default_model_dir()
    assert (path / "model.safetensors").exists()
    tok = load_tokenizer(ModelConfig())
    model = load_causal_lm(ModelConfig()).eval()
    assert model.config.num_hidden_layers == 30 and tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
