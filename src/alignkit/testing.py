"""Tiny random models and tokenizers for tests, examples and benchmarks (no network needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer(chat_template: Optional[str] = CHATML):
    """A character-level tokenizer (printable ASCII + newline) with ChatML specials; pad == eos."""
    # deferred: transformers is slow to import; it loads when a model does
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    if chat_template:
        tok.chat_template = chat_template
    return tok


def tiny_llama(tokenizer, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0):
    # deferred: torch and transformers (slow imports) load when a model does
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=None)
    return LlamaForCausalLM(cfg)


def save_tiny_model(path: Path, seed: int = 0, **kw) -> Path:
    """Write a tiny random Llama and its tokenizer to ``path`` (loadable with from_pretrained)."""
    path = Path(path)
    tok = tiny_tokenizer()
    model = tiny_llama(tok, seed=seed, **kw)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


#: architectures :func:`tiny_causal_lm` builds; each has something the plain ``hidden @ W.T`` head or a
#: naive packed batch would get wrong (softcap, scale, sliding windows, learned absolute positions)
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma2", "cohere", "granite", "gpt2")


def tiny_causal_lm(kind: str, vocab_size: int = 97, hidden: int = 32, layers: int = 2, seed: int = 0,
                   **overrides):
    """A tiny random causal LM of architecture ``kind`` (one of :data:`TINY_ARCHITECTURES`), built from a
    local config (no download), with the logit post-processing of its family switched on."""
    # deferred: torch and transformers (slow imports) load when a model does
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0,
                            bos_token_id=None, eos_token_id=None, **overrides)
        return tf.GPT2LMHeadModel(cfg)
    common = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    family = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 6}),
        "gemma2": (tf.Gemma2Config, tf.Gemma2ForCausalLM, {"final_logit_softcapping": 0.5, "head_dim": 8,
                                                           "sliding_window": 6}),
        "cohere": (tf.CohereConfig, tf.CohereForCausalLM, {"logit_scale": 3.0}),
        "granite": (tf.GraniteConfig, tf.GraniteForCausalLM, {"logits_scaling": 0.25}),
    }
    if kind not in family:
        raise ValueError(f"unknown tiny architecture {kind!r}; choose one of {', '.join(TINY_ARCHITECTURES)}")
    cfg_cls, model_cls, extra = family[kind]
    return model_cls(cfg_cls(**{**common, **extra, **overrides}))
