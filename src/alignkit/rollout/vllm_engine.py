"""Optional vLLM rollout engine for GPUs (``generation.engine=vllm``; ``pip install 'alignkit[vllm]'``).

vLLM samples; the trainer still computes every log-prob it trains on with the HF policy (vLLM's own
log-probs differ slightly, and PPO's ratio must start at exactly 1). After each optimizer update the
policy's weights are pushed into the engine (:meth:`VLLMEngine.update_weights`) before the next
rollout, so rollouts always come from the current policy. The engine runs in this process
("colocated"), sharing the GPU with training: ``gpu_memory_utilization`` caps its share.

vllm is imported lazily, so nothing here needs it until an engine is built.
"""

from __future__ import annotations

import os
import re
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from alignkit.ops.wrappers import unwrap

_PEFT_PREFIX = "base_model.model."


def hf_weights_for_vllm(model) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a causal LM under the names of its plain HF checkpoint.

    A peft model yields its *merged* weights (``W + scale * B @ A``, computed here without touching
    the model) under the base names: ``base_model.model.x.base_layer.weight`` -> ``x.weight``; adapter
    tensors themselves are skipped. That is what a vLLM engine loaded from the base checkpoint expects.
    """
    model = unwrap(model)
    try:
        # deferred: peft loads only when LoRA is used
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover
        LoraLayer = ()
    merged = {}
    if LoraLayer:
        for mname, module in model.named_modules():
            if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
                w = module.base_layer.weight.detach()
                # get_delta_weight: scale * B @ A (with fan_in_fan_out handled by peft) for each adapter
                delta = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
                merged[f"{mname}.base_layer.weight"] = (w + delta.to(w.dtype)) if torch.is_tensor(delta) else w
    for name, tensor in model.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue  # adapter tensors are merged above; a modules_to_save copy replaces its original
        value = merged.get(name, tensor).detach()
        if name.startswith(_PEFT_PREFIX):
            name = name[len(_PEFT_PREFIX):]
        name = re.sub(r"\.modules_to_save\.[^.]+\.", ".", name.replace(".base_layer.", "."))
        yield name, value


def _in_process_model(llm):
    """The engine's torch model when it runs in this process (vLLM V0, or V1 with multiprocessing off)."""
    paths = ("llm_engine.model_executor.driver_worker.model_runner.model",
             "llm_engine.model_executor.driver_worker.worker.model_runner.model",
             "llm_engine.model_executor.driver_worker.worker.model_runner.model.runnable")
    for path in paths:
        obj = llm
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        if hasattr(obj, "load_weights"):
            return obj
    return None


def _load_on_worker(worker, weights):  # runs inside a vLLM worker (collective_rpc)
    worker.model_runner.model.load_weights(weights=weights)


class VLLMEngine:
    """Sampling with vLLM, plus weight sync from the trained policy.

    ``generate(prompt_ids, gen_cfg)`` has the contract of the HF engine: one list of sampled token ids
    per prompt (it may run past EOS; :func:`alignkit.rollout.generate.generate` cuts it). Sampling
    seeds come from torch's global RNG, so a resumed run draws the same rollouts as a straight one.
    """

    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.3, dtype: str = "auto",
                 max_model_len: Optional[int] = None, seed: int = 0, enforce_eager: bool = True, **llm_kwargs):
        # in-process engine so update_weights can reach the model; users may override
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            # deferred: optional GPU extra (vllm)
            import vllm
        except ImportError:
            raise ImportError("generation.engine=vllm needs vLLM on a CUDA machine: pip install 'alignkit[vllm]' "
                              "(or use generation.engine=fast)") from None
        self._vllm = vllm
        kwargs = dict(model=str(model_path), gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
                      enforce_eager=enforce_eager)
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(llm_kwargs)
        self.llm = vllm.LLM(**kwargs)
        self.syncs = 0

    def _params(self, cfg, seed: int):
        return self._vllm.SamplingParams(
            n=1, max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k if cfg.top_k > 0 else -1, seed=seed, skip_special_tokens=False)

    def generate(self, prompt_ids: Sequence[List[int]], cfg) -> List[List[int]]:
        """One sampled continuation (token ids) per prompt; a seed per prompt from torch's RNG."""
        seeds = torch.randint(0, 2**31 - 1, (len(prompt_ids),)).tolist()
        prompts = [{"prompt_token_ids": list(p)} for p in prompt_ids]
        params = [self._params(cfg, s) for s in seeds]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    @torch.no_grad()
    def update_weights(self, model) -> None:
        """Copy the policy's current weights (LoRA merged) into the engine."""
        weights = [(n, t) for n, t in hf_weights_for_vllm(model)]
        target = _in_process_model(self.llm)
        if target is not None:
            target.load_weights(weights)
        elif hasattr(self.llm, "collective_rpc"):  # engine in worker processes: send the tensors over
            self.llm.collective_rpc(_load_on_worker, args=([(n, t.cpu()) for n, t in weights],))
        else:  # pragma: no cover
            raise RuntimeError("cannot reach the vLLM model to update its weights; set "
                               "VLLM_ENABLE_V1_MULTIPROCESSING=0 or upgrade vllm")
        if hasattr(self.llm, "reset_prefix_cache"):  # cached KV blocks belong to the old weights
            self.llm.reset_prefix_cache()
        self.syncs += 1


def make_engine(model_path: str, tokenizer=None, **kwargs) -> VLLMEngine:
    """Build the engine for ``generation.engine=vllm`` (``model_path``: the starting policy's weights)."""
    return VLLMEngine(model_path, **kwargs)
