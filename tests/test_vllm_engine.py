"""The optional vLLM engine: skipped unless vllm and a CUDA GPU are present (weight export is tested on CPU
in test_online_rl.py)."""

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (pip install 'alignkit[vllm]')")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a CUDA GPU")


def test_vllm_engine_generates_and_takes_new_weights(tiny_model, tiny_tok):
    from alignkit.config import ModelConfig
    from alignkit.models.loading import load_causal_lm
    from alignkit.rollout.generate import GenerationConfig, generate
    from alignkit.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_model), gpu_memory_utilization=0.2, dtype="float32")
    policy = load_causal_lm(ModelConfig(name_or_path=str(tiny_model))).cuda().eval()
    prompts = [tiny_tok.encode(p) for p in ("ab", "hello", "xyz")]
    greedy = GenerationConfig(max_new_tokens=6, temperature=0.0)
    hf = generate(policy, tiny_tok, prompts, greedy, compute_logprobs=False)
    vl = generate(policy, tiny_tok, prompts, greedy, engine=engine, compute_logprobs=False)
    assert vl.response_ids == hf.response_ids  # same weights, greedy: same tokens
    with torch.no_grad():  # a large change of the output layer changes the greedy answers
        torch.manual_seed(0)
        policy.lm_head.weight.add_(torch.randn_like(policy.lm_head.weight))
    engine.update_weights(policy)
    after = generate(policy, tiny_tok, prompts, greedy, engine=engine, compute_logprobs=False)
    hf_after = generate(policy, tiny_tok, prompts, greedy, compute_logprobs=False)
    assert after.response_ids == hf_after.response_ids != hf.response_ids
    torch.manual_seed(0)
    sampled = engine.generate(prompts, GenerationConfig(max_new_tokens=4, temperature=1.0))
    assert len(sampled) == 3 and all(len(s) <= 4 for s in sampled)


def test_grpo_samples_with_the_vllm_engine(tmp_path, tiny_model, jsonl):
    import json

    from alignkit.train.grpo import train_grpo

    data = jsonl("p.jsonl", [{"prompt": f"w:{c}"} for c in "mnopqrst"])
    train_grpo(**{"model.name_or_path": str(tiny_model), "data.path": str(data), "generation.engine": "vllm",
                  "rewards": ["length:target=3"], "generation.max_new_tokens": 6, "train.max_steps": 2,
                  "train.batch_size": 4, "grpo.num_generations": 4, "optim.lr": 1e-2, "log.progress": False,
                  "log.samples": 0}, output=str(tmp_path / "run"))
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["kl/ref"] > 0
